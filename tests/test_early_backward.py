"""``MODEL.KS.EARLY_TEACHER_BACKWARD``: each teacher decoded in its own pass whose backward runs in the forward.

Reference: the one stacked pass of every stream (the default), which the official parity tests tie to the official
code. With dropout off both forms must give the same loss terms and the same gradient of every parameter, and the
early form must hold only the student's decoder activations when the forward returns.
"""
import weakref

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import family_config, make_cfg, toy_inputs
from ks_detr.config import student_config
from ks_detr.errors import ConfigError

TINY = ("MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 4, "MODEL.DETR.DIM_FEEDFORWARD", 32,
        "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 3, "MODEL.DETR.NUM_QUERIES", 8,
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.DETR.CHANNELS_LAST", False,
        "MODEL.DETR.DROPOUT", 0.0)
SIZES = ((96, 128), (80, 112))
CASES = [
    ("configs/ks_conditional_detr_r50.yaml", ()),
    ("configs/ks_dab_detr_r50.yaml", ("MODEL.KS.MODE", "share_v")),
    ("configs/ks_dn_detr_r50.yaml", ("MODEL.KS.TEACHER_DECODER_LAYERS", 2)),
    ("configs/ks_deformable_detr_r50.yaml", ()),
    ("configs/ks_deformable_detr_two_stage_r50.yaml", ()),
    ("configs/ks_dn_deformable_detr_r50.yaml", ("MODEL.DETR.TWO_STAGE", True, "MODEL.KS.TEACHER_PROPOSALS", "student")),
    (family_config("dino", ks=True), ("MODEL.DETR.DN.NUM_QUERIES", 6, "MODEL.KS.MODE", "share_a")),
    ("configs/ks_dn_deformable_detr_r50.yaml",
     ("MODEL.KS.RECOMPUTE_DECODER", True, "MODEL.KS.RECOMPUTE_KS_LAYERS", True)),  # both ways of saving memory
]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def losses_grads_and_held(model, inputs):
    """Loss terms, every parameter's gradient, the bytes of the storages that the decoder saved for the backward
    and are still held when the forward returns (parameters left out), and those of the prepared queries."""
    held, inside, queries = weakref.WeakSet(), [], []

    class Saved:  # what the graph holds for one saved tensor; gone with the graph that held it
        def __init__(self, t):
            self.t = t.detach()  # not t: a saved output would hold its own graph alive (a reference cycle)
            if inside:
                held.add(self)

    hooks = [model.decoder.register_forward_pre_hook(lambda *_: inside.append(1)),
             model.decoder.register_forward_hook(lambda *_: inside.clear())]
    prepare = model.prepare_queries

    def recording(*args):
        rows, shared, extras = prepare(*args)
        queries.extend(t.untyped_storage().nbytes() for t in rows.values())
        return rows, shared, extras

    model.prepare_queries = recording
    torch.manual_seed(0)
    with EventStorage(), torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        losses = model(inputs)
    for h in hooks:
        h.remove()
    del model.prepare_queries
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {s.t.untyped_storage().data_ptr(): s.t.untyped_storage().nbytes() for s in list(held)}
    held_bytes = sum(n for ptr, n in storages.items() if ptr not in weights)
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads, held_bytes, sum(queries)


@pytest.mark.parametrize("config,opts", CASES, ids=["conditional", "dab_share_v", "dn_2_teacher_layers", "deformable",
                                                     "deformable_two_stage", "dn_deformable_student_proposals",
                                                     "dino_share_a", "dn_deformable_recompute"])
def test_early_teacher_backward_gives_the_stacked_gradients(config, opts):
    torch.manual_seed(0)
    model = build_model(make_cfg(config, *TINY, *opts))
    model.train()
    inputs = toy_inputs(SIZES, with_empty=False)
    losses, grads, held, _ = losses_grads_and_held(model, inputs)
    model.ks.early_backward = True  # as MODEL.KS.EARLY_TEACHER_BACKWARD True builds it
    assert build_model(make_cfg(config, *TINY, *opts, "MODEL.KS.EARLY_TEACHER_BACKWARD", True)).ks.early_backward
    losses_e, grads_e, held_e, queries = losses_grads_and_held(model, inputs)
    assert losses_e.keys() == losses.keys()
    for k in losses:
        torch.testing.assert_close(losses_e[k], losses[k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads_e.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_e[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if "MODEL.KS.RECOMPUTE_DECODER" in opts:  # the decoder layers keep only their inputs either way
        assert held_e <= held
        return
    # the stacked pass holds every stream's decoder activations (S*B rows); the early form what the baseline (the
    # student alone) holds, and the queries prepared for every stream (the student's rows are views of them)
    student = build_model(student_config(make_cfg(config, *TINY, *opts)))
    student.train()
    held_student = losses_grads_and_held(student, inputs)[2]
    S = model.ks.num_streams
    assert held >= 0.95 * S * held_student, (held, held_student)
    assert held_e <= held_student + queries, (held_e, held_student, queries)


def early_model():
    torch.manual_seed(0)
    model = build_model(make_cfg(CASES[0][0], *TINY, "MODEL.KS.EARLY_TEACHER_BACKWARD", True))
    model.train()
    return model


def test_a_teacher_term_weighted_apart_is_refused():
    """The gradients taken in the forward are those of the summed loss dict: a teacher term weighted apart from
    the others cannot get its own gradient, and the backward says so."""
    model = early_model()
    with EventStorage():
        losses = model(toy_inputs(SIZES, with_empty=False))
    sum(losses.values()).backward()  # as detectron2's trainers: fine
    with EventStorage():
        losses = model(toy_inputs(SIZES, with_empty=False))
    with pytest.raises(RuntimeError, match="every teacher loss term must reach the backward with the same weight"):
        (sum(losses.values()) + losses["loss_class_ks_a"]).backward()


def test_losses_without_grad_mode_are_the_same_values():
    """Validation losses computed under ``torch.no_grad`` (a model in training mode) take no gradient."""
    model = early_model()
    inputs = toy_inputs(SIZES, with_empty=False)
    with EventStorage():
        losses = model(inputs)
        with torch.no_grad():
            values = model(inputs)
    assert values.keys() == losses.keys()
    assert all(not v.requires_grad and torch.allclose(v, losses[k]) for k, v in values.items())


def test_float16_autocast_is_refused():
    """float16 gradients taken before the gradient scaler scales them would underflow: refused at the config
    (SOLVER.AMP, tests/test_config_keys.py) and under a caller's own float16 autocast."""
    model = early_model()
    with EventStorage(), torch.autocast("cpu", dtype=torch.float16), pytest.raises(
            ConfigError, match="MODEL.KS.EARLY_TEACHER_BACKWARD=True under float16 autocast"):
        model(toy_inputs(SIZES, with_empty=False))


@pytest.mark.parametrize("config,opts", [CASES[0], CASES[5]], ids=["conditional", "dn_deformable_two_stage"])
def test_bfloat16_autocast_gives_the_stacked_gradients(config, opts):
    """Under bfloat16 autocast the two forms round differently (other batch shapes): all gradients together within
    1 % (relative norm; measured 0.06-0.24 % over the families)."""
    torch.manual_seed(0)
    model = build_model(make_cfg(config, *TINY, *opts))
    model.train()
    inputs = toy_inputs(SIZES, with_empty=False)
    flat = []
    for early in (False, True):
        model.ks.early_backward = early
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(inputs)
        sum(losses.values()).backward()
        flat.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert ((flat[1] - flat[0]).norm() / flat[0].norm()).item() < 0.01


def test_a_shared_query_input_with_a_gradient_is_refused(monkeypatch):
    """A family's ``prepare_queries`` puts trained tensors in its per-row dict, whose teacher rows get their gradients;
    one among the shared inputs would lose them silently, so the early form refuses it."""
    model = early_model()
    prepare = model.prepare_queries

    def trained_shared(*args):
        rows, shared, extras = prepare(*args)
        return rows, dict(shared, bias=model.query_embed.weight.sum()), extras

    monkeypatch.setattr(model, "prepare_queries", trained_shared)
    with EventStorage(), pytest.raises(TypeError, match=r"shared inputs \['bias'\] need a gradient"):
        model(toy_inputs(SIZES))



def _pass_loss(inp, w, b1, b2):
    """A pass's loss from ``inp`` (8,), computed in float32 (under autocast too); ``b1`` and ``b2`` are added
    to the same tensor, so that autograd hands both the same gradient tensor."""
    with torch.autocast("cpu", enabled=False):
        y = (inp @ w).sin() @ w.t()
    return ((y + b1 + b2) ** 2).sum()


def test_gradients_taken_early_are_those_of_a_backward_after_the_forward():
    """The early gradients run without the forward's autocast (a float32 region stays float32 in the backward, as
    in a backward after the forward), and parameters handed the same gradient tensor keep their own sums."""
    from ks_detr.modeling.ks.early_backward import EarlyBackward

    g = torch.Generator().manual_seed(0)
    x0, w0, b0 = torch.randn(2, 8, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
    grads = []
    for early_mode in (False, True):
        x = x0.clone().requires_grad_()
        w, b1, b2 = (torch.nn.Parameter(t.clone()) for t in (w0, b0, -b0))
        early, losses = EarlyBackward([w, b1, b2]), {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(2):
                if early_mode:
                    early.backward({f"loss_{i}": _pass_loss(early.leaf(x, i), w, b1, b2)})
                else:
                    losses[f"loss_{i}"] = _pass_loss(x[i], w, b1, b2)
            if early_mode:
                losses = early.losses()
        sum(losses.values()).backward()
        grads.append([t.grad for t in (x, w, b1, b2)])
    for name, ref, got in zip(("x", "w", "b1", "b2"), *grads):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=name)
