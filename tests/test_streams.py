"""Knowledge sharing's stacked streams against references computed another way: the stacked decoder
against one decoder pass per stream; the student stream against the baseline with the same weights
(several KS encoder layers); teacher losses alone reaching the shared weights; the teacher loss weight."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import family_config, make_cfg, toy_inputs
from ks_detr.checkpoint import student_state_dict
from ks_detr.config import student_config

FAMILIES = ["conditional_detr", "dab_detr", "dn_detr", "deformable_detr", "dn_deformable_detr",
            "dn_deformable_detr two-stage", "dino"]
TINY = ("MODEL.DETR.NUM_QUERIES", 10, "MODEL.DETR.ENC_LAYERS", 3, "MODEL.DETR.DEC_LAYERS", 2,
        "MODEL.DETR.HIDDEN_DIM", 64, "MODEL.DETR.DIM_FEEDFORWARD", 64, "MODEL.DETR.DROPOUT", 0.0,
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)


def ks_cfg(family, *opts):
    family, _, variant = family.partition(" ")
    two_stage = ("MODEL.DETR.TWO_STAGE", True) if variant else ()
    return make_cfg(family_config(family, ks=True), *TINY, *two_stage, *opts)


def spy_decode(model):
    """Record every decode call's arguments, CPU RNG state (the denoising noise) and result."""
    calls, decode = [], model.decode

    def spy(*args):
        state = torch.get_rng_state()
        calls.append((args, state, decode(*args)))
        return calls[-1][2]

    model.decode = spy
    return calls, decode


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_decoder_equals_one_pass_per_stream(family):
    """One decoder call on the S*B stacked memories (denoising queries shared, multi-scale context
    repeated, two-stage: every stream selects its own) equals S calls, one per stream's memory."""
    torch.manual_seed(0)
    model = build_model(ks_cfg(family, "MODEL.KS.TEACHER_PROPOSALS", "own"))
    calls, decode = spy_decode(model)
    torch.manual_seed(1)
    with EventStorage():
        model(toy_inputs(with_empty=False))
    (memory, mask, pos, targets, ctx, S), rng, (hs, boxes, extras) = calls[0]
    B = len(targets)
    assert S == 3 and memory.shape[0] == S * B and pos.shape[0] == B  # pos: one per image, for every stream
    assert (memory[B:] - memory[:B].repeat(2, 1, 1)).abs().amax(dim=(1, 2)).min() > 1e-3  # streams differ
    for s in range(S):
        rows = slice(s * B, (s + 1) * B)
        torch.set_rng_state(rng)  # the same denoising noise as the stacked call
        one_ctx = None if ctx is None else ctx.first(B)
        hs_s, boxes_s, extras_s = decode(memory[rows], mask[rows], pos, targets, one_ctx, 1)
        assert torch.allclose(hs_s, hs[:, rows], atol=1e-5), s
        assert torch.allclose(boxes_s, boxes[:, rows], atol=1e-5), s
        assert extras_s.get("dn") == extras.get("dn")
        if "enc" in extras:
            assert torch.allclose(extras_s["enc"]["pred_boxes"], extras["enc"]["pred_boxes"][rows], atol=1e-5)


def train_losses(model, seed=1):
    torch.manual_seed(seed)
    with EventStorage():
        return model(toy_inputs(with_empty=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_student_stream_is_the_baseline_with_several_ks_layers(family):
    """KS layers 0 and 2 of a 3-layer encoder (a plain layer runs on the stacked streams between them):
    the student rows of the memory, and every student loss, equal the baseline model's with the
    student's weights; the teachers never leak into the student in the forward."""
    torch.manual_seed(0)
    cfg = ks_cfg(family, "MODEL.KS.ENCODER_LAYERS", [0, -1])
    ks, base = build_model(cfg), build_model(student_config(cfg))
    base.load_state_dict(student_state_dict(ks.state_dict(), ks.ks.teacher_parameter_names(ks)))
    (ks_calls, _), (base_calls, _) = spy_decode(ks), spy_decode(base)
    ks_losses, base_losses = train_losses(ks), train_losses(base)
    B = 2
    assert ks_calls[0][0][5] == 3 and base_calls[0][0][5] == 1
    assert torch.allclose(ks_calls[0][0][0][:B], base_calls[0][0][0], atol=1e-5)
    student = {k: v for k, v in ks_losses.items() if "_ks_" not in k}
    assert len(student) < len(ks_losses) and student.keys() == base_losses.keys()
    for k, v in student.items():
        assert torch.allclose(v, base_losses[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_losses_alone_reach_the_shared_weights(family):
    """No detach: the teacher losses' gradient reaches what teachers share with the student (the KS
    layer's student projections, out-projection and FFN, earlier layers, input projection, decoder,
    heads, backbone) and the teacher-only parameters."""
    torch.manual_seed(0)
    model = build_model(ks_cfg(family))
    losses = train_losses(model)
    sum(v for k, v in losses.items() if "_ks_" in k).backward()
    deformable = "deformable" in family or family == "dino"
    shared = ["input_proj", "encoder.layers.0.", "encoder.layers.2.self_attn." + (
        "value_proj" if deformable else "in_proj_weight"), "encoder.layers.2.linear1", "decoder.", "class_embed",
        "bbox_embed", "backbone.res5"]
    teacher = ["ks_smlp."] + [f"encoder.layers.2.self_attn.{n}" for n in (
        ("value_proj_teacher", "attention_weights_teacher") if deformable else ("teacher_in_proj_weight",))]
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for prefix in shared + teacher:
        reached = [n for n, g in grads.items() if n.startswith(prefix) and g is not None and g.abs().sum() > 0]
        assert reached, prefix


def test_teacher_loss_weight_scales_the_teacher_losses_only():
    torch.manual_seed(0)
    model = build_model(ks_cfg("dn_detr"))
    one = train_losses(model)
    model.ks.teacher_weight = 0.25  # as MODEL.KS.TEACHER_LOSS_WEIGHT 0.25 builds it
    assert build_model(ks_cfg("dn_detr", "MODEL.KS.TEACHER_LOSS_WEIGHT", 0.25)).ks.teacher_weight == 0.25
    quarter = train_losses(model)
    assert one.keys() == quarter.keys() and sum("_ks_" in k for k in one) == 12
    for k in one:
        expected = one[k] * 0.25 if "_ks_" in k else one[k]
        assert torch.allclose(quarter[k], expected, rtol=1e-6), k


def saved_bytes_and_grads(model, layers, method):
    """What autograd saves for the backward of one KS training forward (each storage once): the bytes
    of all saved tensors, the sizes of those saved inside ``layers`` (calls of their ``method``), the
    largest first argument (the layer input) of those calls in bytes, the losses and every gradient."""
    seen, inside, largest_input = {}, [], [0]

    def watched(fn):
        def run(*args, **kwargs):
            largest_input[0] = max(largest_input[0], args[0].numel() * args[0].element_size())
            inside.append(1)
            try:
                return fn(*args, **kwargs)
            finally:
                inside.pop()
        return run

    for layer in layers:
        setattr(layer, method, watched(getattr(layer, method)))

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), bool(inside)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = train_losses(model)
    for layer in layers:
        delattr(layer, method)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    saved_inside = [b for b, i in seen.values() if i]
    return sum(b for b, _ in seen.values()), saved_inside, largest_input[0], losses, grads


@pytest.mark.parametrize("part", ["decoder", "ks_layers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_gives_the_same_gradients_and_keeps_nothing_inside(family, part):
    """MODEL.KS.RECOMPUTE_DECODER / RECOMPUTE_KS_LAYERS: every decoder layer / KS encoder layer is
    recomputed in the backward (dropout draws the same masks again): the same losses and gradients.
    No tensor saved inside a decoder layer is held from the forward; a KS layer, recomputed in two
    pieces (attention; norms and FFN), holds only the pieces' inputs, none larger than its stacked
    streams (S*B, N, C): no attention weights, samples or FFN activations (the peak-memory effect
    is measured by tools/benchmark.py)."""
    torch.manual_seed(0)
    model = build_model(ks_cfg(family, "MODEL.DETR.DROPOUT", 0.1))
    if part == "decoder":
        stack, layers, method, key = model.decoder, list(model.decoder.layers), "forward", "RECOMPUTE_DECODER"
    else:
        stack, method, key = model.encoder, "forward_ks", "RECOMPUTE_KS_LAYERS"
        layers = [model.encoder.layers[i] for i in sorted(model.ks.encoder_layers)]
    _, inside, layer_input, losses, grads = saved_bytes_and_grads(model, layers, method)
    stack.recompute = True  # as MODEL.KS.<key> True builds it
    assert build_model(ks_cfg(family, f"MODEL.KS.{key}", True)).get_submodule(
        "decoder" if part == "decoder" else "encoder").recompute
    _, inside_r, _, losses_r, grads_r = saved_bytes_and_grads(model, layers, method)
    if part == "decoder":
        assert inside and not inside_r
    else:  # the input comes as the student alone (B rows) or as all S streams
        stacked = layer_input * model.ks.num_streams if len(model.ks.encoder_layers) == 1 else layer_input
        assert max(inside) > stacked and inside_r and max(inside_r) <= stacked
    assert losses.keys() == losses_r.keys() and all(torch.equal(losses[k], losses_r[k]) for k in losses)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
