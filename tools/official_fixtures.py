#!/usr/bin/env python
"""Golden references from the official code: tiny models of every family, one train step, saved as fixtures.

Each case builds a tiny model with the official KS-DETR code (df0f2f6; Conditional, DAB, DN, Deformable and
DN-Deformable DETR, baseline and KS) or detrex (e244e6c; DINO), runs one training forward + backward on a fixed
padded batch, an eval forward on the same images, and saves under ``--output`` (``tests/fixtures/official``):
the inputs, the weights (official names), the raw outputs, every loss term, the gradient of every parameter
and, for the cases of ``--steps-cases``, the weights after ``--steps`` AdamW steps of the official recipe.
``tests/test_official_parity.py`` loads the weights through ``tools/convert_checkpoint.py`` into our model and
compares everything.

Setup, once (as for ``tools/side_by_side.py``; the two codebases are read from their own checkouts):

    git clone https://github.com/edocanonymous/KS-DETR OFFICIAL && git -C OFFICIAL checkout df0f2f6
    git clone https://github.com/IDEA-Research/detrex DETREX && git -C DETREX checkout e244e6c
    ln -sfn ../../configs OFFICIAL/detrex/config/configs
    ln -sfn ../../configs DETREX/detrex/config/configs
    pip install timm einops fairscale      # their imports; their C++/CUDA ops are not needed on the CPU

Regenerate (CPU, float64, about a minute):

    python tools/official_fixtures.py --official-root OFFICIAL --detrex-root DETREX

Shims (applied to the official models only, in the worker process, all size-related):
  - the backbone is a narrow detectron2 ResNet-50 (stem 4, res2 8 channels, bottleneck 2; FrozenBN, torchvision
    style) instead of the 64-wide one, and its last FrozenBN per bottleneck is scaled by 0.1 so random features
    stay bounded;
  - ``get_sine_pos_embed`` (detrex) is called with ``num_pos_feats = C / 2`` instead of its default 128, which
    only fits C = 256;
  - an empty ``detrex._C`` module stands for the uncompiled CUDA ops (on the CPU their deformable attention
    takes its pure-PyTorch path), and an empty ``wandb`` module for detrex's logging imports;
  - ``Tensor.cuda()`` returns the tensor itself and ``Tensor.to("cuda")`` stays on the CPU (DN-DETR's criterion
    and DINO's denoising move their indices with them);
  - the targets' normalised boxes (float32, as detectron2's ``Boxes``) are given to the model in float64, and
    detrex's position embeddings (computed in float32) are cast to float64;
  - the zero-initialised last box layers get small random weights and the deformable sampling offsets a random
    fraction of a pixel (see ``official_model``), so that every parameter has a well-defined gradient;
  - dropout 0 and denoising noise 0 (label flips and box jitter draw random numbers in a different order in each
    codebase), so the step is deterministic.
"""
import argparse
import functools
import json
import os
import subprocess
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
C, HEADS, FFN, QUERIES = 16, 2, 32, 12
ENC, DEC = 2, 3
SIZES = ((160, 192), (128, 150), (96, 160))  # the first fills the padded batch; the last has no boxes
BOXES = ([[10.0, 20, 100, 120], [50, 60, 70, 90], [120, 30, 190, 150]], [[5.0, 8, 140, 100]], [])
LABELS = ([1, 5, 1], [3], [])
NUM_CLASSES = 7
KS_CFG = "projects/ks_detr/configs/ks_{f}_detr/ks_{f}_detr_r50_{ep}ep{ks}.py"
KS_SUFFIX = "_smlp_qkv_triple_attn"
# case -> (codebase, LazyConfig path, our config, our extra KEY VALUE pairs, LazyConfig overrides of the model)
CASES = {}
for _f, _ep in (("conditional", 50), ("dab", 50), ("dn", 50), ("deformable", 12), ("dn_deformable", 12)):
    for _ks in (False, True):
        CASES[f"{'ks_' if _ks else ''}{_f}"] = (
            "official", KS_CFG.format(f=_f, ep=_ep, ks=KS_SUFFIX if _ks else ""),
            f"configs/{'ks_' if _ks else ''}{_f}_detr_r50.yaml", (), {})
for _mode, _name in (("share_v", "share_v"), ("share_a", "share_a")):  # the official dual-attention ablations
    CASES[f"ks_dab_{_mode}"] = ("official", f"projects/ks_detr/configs/ks_dab_detr/ks_dab_detr_r101_50ep_smlp_dual_attn_"
                                f"{_name}.py", "configs/ks_dab_detr_r50.yaml", ("MODEL.KS.MODE", _mode), {})
# no two-stage case: the official KS DN-Deformable code asserts `query_embed should be None in two-stage`
CASES["dino"] = ("detrex", "projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py",
                 "configs/dino_r50_4scale_12ep.yaml", (), {})
STEPS_CASES = ("ks_conditional", "ks_dab", "ks_dn", "ks_deformable", "ks_dn_deformable")  # with a trajectory
STEPS = 20


def narrow_resnet(out_features, freeze_at=1):
    """detectron2's ResNet-50 at 1/16 of the width (what ``ours_config`` asks of ``build_resnet_backbone``)."""
    from detectron2.modeling.backbone import BasicStem, BottleneckBlock, ResNet
    stages, in_ch, out_ch, mid = [], 4, 8, 2
    for n, stride in zip((3, 4, 6, 3), (1, 2, 2, 2)):
        stages.append(ResNet.make_stage(BottleneckBlock, n, stride_per_block=[stride] + [1] * (n - 1),
                                        in_channels=in_ch, bottleneck_channels=mid, out_channels=out_ch,
                                        norm="FrozenBN", stride_in_1x1=False))
        in_ch, out_ch, mid = out_ch, out_ch * 2, mid * 2
    return ResNet(BasicStem(3, 4, norm="FrozenBN"), stages, out_features=list(out_features)).freeze(freeze_at)


def ours_opts(case):
    """Our ``KEY VALUE`` overrides giving the same tiny model as the official case."""
    extra = CASES[case][3]
    denoising = "dn" in case.split("_") or case == "dino"
    return ["MODEL.DETR.HIDDEN_DIM", C, "MODEL.DETR.NHEADS", HEADS, "MODEL.DETR.DIM_FEEDFORWARD", FFN,
            "MODEL.DETR.ENC_LAYERS", ENC, "MODEL.DETR.DEC_LAYERS", DEC, "MODEL.DETR.NUM_QUERIES", QUERIES,
            "MODEL.DETR.NUM_TOPK_TEST", QUERIES, "MODEL.DETR.NUM_CLASSES", NUM_CLASSES, "MODEL.DETR.DROPOUT", 0.0,
            *(("MODEL.DETR.DN.LABEL_NOISE", 0.0, "MODEL.DETR.DN.BOX_NOISE", 0.0) if denoising else ()),
            "MODEL.RESNETS.STEM_OUT_CHANNELS", 4, "MODEL.RESNETS.RES2_OUT_CHANNELS", 8,
            "MODEL.RESNETS.WIDTH_PER_GROUP", 2, "MODEL.RESNETS.NUM_GROUPS", 1, *extra]


def official_numerics(case):
    """Our KEY VALUE switches to the numerics of the case's reference code (``ks_detr.config.official_numerics``)."""
    from detectron2.config import CfgNode
    from ks_detr.config import official_numerics as switches
    codebase, _, config = CASES[case][:3]
    cfg = CfgNode(CfgNode.load_yaml_with_base(os.path.join(REPO, config), allow_unsafe=False))
    return switches(cfg.MODEL.META_ARCHITECTURE, "ks-detr" if codebase == "official" else "detrex")


def batch(double=True, seed=0):
    """The fixed batch: (images (3, h, w) in [0, 255], gt boxes xyxy (M, 4), labels (M,)) per image; the
    trajectory alternates seed 0 and 1 (other pixels, the same boxes)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    return [(torch.rand(3, h, w, generator=g, dtype=torch.float64).mul(255).to(dtype),
             torch.tensor(b, dtype=dtype).reshape(-1, 4), torch.tensor(l, dtype=torch.int64))
            for (h, w), b, l in zip(SIZES, BOXES, LABELS)]


def eval_batch(tensors, codebase):
    """The eval pass's images: all, or for detrex only the first (it fills the padded batch): detrex evaluates
    without a padding mask (batch 1), which our models do not imitate."""
    return tensors[:1] if codebase == "detrex" else tensors


def to_inputs(tensors, with_instances=True):
    from detectron2.structures import Boxes, Instances
    inputs = []
    for image, boxes, labels in tensors:
        x = {"image": image, "height": image.shape[-2], "width": image.shape[-1]}
        if with_instances:
            inst = Instances(tuple(image.shape[-2:]))
            inst.gt_boxes, inst.gt_classes = Boxes(boxes), labels
            x["instances"] = inst
        inputs.append(x)
    return inputs


# ---- the official side (runs in a worker whose cwd is the checkout) -------------------------------------
def shim_sine_embed():
    """detrex's ``get_sine_pos_embed`` with ``num_pos_feats = C / 2`` in every module that imported it."""
    import detrex.layers.position_embedding as pe
    patched = functools.partial(pe.get_sine_pos_embed, num_pos_feats=C // 2)
    for name, module in list(sys.modules.items()):
        if (name.startswith("projects.") or name.startswith("detrex.")) and hasattr(module, "get_sine_pos_embed"):
            module.get_sine_pos_embed = patched


def set_tiny(node, path=""):
    """Shrink every width, head count, layer count and query count in a LazyConfig model tree."""
    from omegaconf import DictConfig
    for key in list(node.keys()):
        value = node[key]
        if isinstance(value, DictConfig):
            set_tiny(value, f"{path}.{key}")
            continue
        if key in ("embed_dim", "out_channels") and value == 256:
            node[key] = C
        elif key == "num_channels" and value == 256:
            node[key] = C
        elif key == "num_pos_feats" and value == 128:
            node[key] = C // 2
        elif key == "num_heads":
            node[key] = HEADS
        elif key == "feedforward_dim":
            node[key] = FFN
        elif key in ("attn_dropout", "ffn_dropout", "dropout"):
            node[key] = 0.0
        elif key == "num_queries":
            node[key] = QUERIES
        elif key == "select_box_nums_for_evaluation":
            node[key] = QUERIES
        elif key == "num_classes":
            node[key] = NUM_CLASSES
        elif key in ("label_noise_prob", "label_noise_ratio"):
            node[key] = 0.0
        elif key in ("box_noise_scale",):
            node[key] = 0.0
        elif key == "encoder_layer_config":
            node[key] = f"regular_{ENC}" if "-" not in value else f"regular_{ENC - 1}-{value.split('-')[-1]}"
        elif key == "decoder_layer_config":
            node[key] = f"regular_{DEC}"
        elif key == "num_layers" and path.endswith(("encoder", "decoder")):
            node[key] = ENC if path.endswith("encoder") else DEC
        elif key == "eval_decoder_layer":
            node[key] = DEC - 1


def official_model(spec, overrides):
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.config import LazyCall as L
    from detectron2.layers import ShapeSpec
    cfg = LazyConfig.load(spec)
    cfg = LazyConfig.apply_overrides(cfg, [f"model.{k}={v}" for k, v in overrides.items()])
    m = cfg.model
    set_tiny(m)
    out_features = list(m.backbone.out_features)
    m.backbone = L(narrow_resnet)(out_features=out_features, freeze_at=1)
    if "in_channels" in m:
        m.in_channels = 64  # res5 of the narrow ResNet
    if "neck" in m:
        for key, ch in zip(list(m.neck.input_shapes), (16, 32, 64)[-len(m.neck.input_shapes):]):
            m.neck.input_shapes[key] = ShapeSpec(channels=ch)
        m.neck.norm_layer.num_groups = C
    if "criterion" in m and "weight_dict" in m.criterion:
        pass
    m.device = "cpu"
    shim_sine_embed()
    torch.manual_seed(0)
    model = instantiate(m)
    if hasattr(model, "select_box_nums_for_evaluation"):  # detrex DINO: a constructor default
        model.select_box_nums_for_evaluation = QUERIES
    with torch.no_grad():
        for name, module in model.backbone.named_modules():
            if name.endswith("conv3.norm"):
                module.weight.mul_(0.1)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "bbox_embed" in name and not p.any():  # zero-initialised last box layers pass no gradient
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if name.endswith("sampling_offsets.bias"):  # initial offsets put the encoder's sampling points exactly
                p.add_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)  # on pixel centres, where bilinear
                # sampling has no gradient (its kinks): 1e-8 apart, the two codebases' gradients differ by 50 %
    return model


def single(t):
    """A float tensor in float32 for the fixture file (weights: exact; gradients: rounded to 6e-8)."""
    return t.detach().float() if t.is_floating_point() else t.detach().clone()


def as_double(targets):
    """detectron2's ``Boxes`` are float32: the model's targets (normalised in float32) are given in float64."""
    import torch
    return [{k: v.double() if torch.is_floating_point(v) else v for k, v in t.items()} for t in targets]


def shimmed_model(case, double=True):
    """The official model of ``case`` (initialised in float32, so its weights are stored in float32 exactly),
    in float64 when ``double``: the default dtype too (every tensor the code makes without one), detrex's
    float32 position embeddings cast, and the targets given in float64."""
    import torch
    _, spec, _, _, overrides = CASES[case]
    model = official_model(spec, overrides)
    if double:
        torch.set_default_dtype(torch.float64)
        model.double()
        for module in model.modules():
            if "PositionEmbedding" in type(module).__name__:
                module.register_forward_hook(lambda mod, args, out: out.double())
    prepare_targets = model.prepare_targets
    model.prepare_targets = lambda *a, **k: as_double(prepare_targets(*a, **k))
    return model


def run_official(case, double=True):
    """One train step and one eval pass of the official case: the fixture dict."""
    import torch
    from detectron2.utils.events import EventStorage
    codebase = CASES[case][0]
    model = shimmed_model(case, double)
    tensors = batch(double)
    state = {k: single(v) for k, v in model.state_dict().items()}
    seen = {}
    model.train()
    with EventStorage():
        losses = model(to_inputs(tensors))
        sum(losses.values()).backward()
    params = list(model.named_parameters(remove_duplicate=False))  # shared heads and aliases under every name
    grads = {n: single(p.grad) for n, p in params if p.grad is not None}
    no_grad = [n for n, p in params if p.requires_grad and p.grad is None]
    inference = model.inference

    def spy_inference(box_cls, box_pred, *a, **k):
        seen["eval_logits"], seen["eval_boxes"] = box_cls.detach().clone(), box_pred.detach().clone()
        return inference(box_cls, box_pred, *a, **k)

    model.inference = spy_inference
    model.eval()
    with torch.no_grad():
        model(to_inputs(eval_batch(tensors, codebase), with_instances="ks" in type(model).__name__.lower()))
    return {"state_dict": state, "grads": grads, "no_grad": no_grad,
            "losses": {k: v.detach().clone() for k, v in losses.items()}, **seen}


def official_trajectory(case, state, double=True):
    """``STEPS`` steps of the official recipe from ``state``: the case's LazyConfig optimizer (detrex AdamW,
    backbone lr x 0.1, no weight decay on norms), its lr schedule and detrex's gradient clipping (L2 norm of
    all gradients to ``train.clip_grad.params.max_norm``), on batches alternating seed 0 and 1.
    Returns the losses summed per step and how far each weight moved (after - before, in float64, stored in
    float32)."""
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.solver import LRMultiplier
    from detectron2.utils.events import EventStorage
    cfg = LazyConfig.load(CASES[case][1])
    model = shimmed_model(case, double)
    model.load_state_dict(state)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    scheduler = LRMultiplier(optimizer, multiplier=instantiate(cfg.lr_multiplier), max_iter=cfg.train.max_iter)
    clip = dict(cfg.train.clip_grad.params) if cfg.train.clip_grad.enabled else None
    model.train()
    losses = []
    with EventStorage():
        for step in range(STEPS):
            loss = sum(model(to_inputs(batch(double, step % 2))).values())
            optimizer.zero_grad()
            loss.backward()
            if clip:
                params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, **clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    moved = {k: single(v - state[k].to(v.dtype)) for k, v in model.state_dict().items() if v.is_floating_point()}
    return {"step_losses": torch.tensor(losses, dtype=torch.float64), "steps_moved": moved}


def worker(case, out, double):
    sys.path.insert(0, os.getcwd())  # the checkout's `detrex` and `projects` packages
    import torch
    torch.set_num_threads(2)
    torch.Tensor.cuda = lambda self, *a, **k: self  # DN-DETR / DINO move their indices to the GPU
    to = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: to(self, *("cpu" if str(x).startswith("cuda") else x for x in a), **k)
    import types
    sys.modules["detrex._C"] = types.ModuleType("detrex._C")  # its CUDA ops; the CPU path is pure PyTorch
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # detrex's event writers import it
    fixture = run_official(case, double)
    if case in STEPS_CASES:
        torch.set_default_dtype(torch.float32)
        fixture.update(official_trajectory(case, fixture["state_dict"], double))
    torch.save(fixture, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-root", required=False)
    p.add_argument("--detrex-root", required=False)
    p.add_argument("--output", default=os.path.join(REPO, "tests", "fixtures", "official"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--float32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.out, not args.float32)
    roots = {"official": args.official_root, "detrex": args.detrex_root}
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown --cases {unknown}; choose from {list(CASES)}")
    for codebase in {CASES[c][0] for c in cases}:
        if not roots[codebase] or not os.path.isdir(os.path.join(roots[codebase], "detrex")):
            p.error(f"--{codebase if codebase == 'detrex' else 'official'}-root {roots[codebase]!r} is not a "
                    "checkout with a detrex/ package")
    os.makedirs(args.output, exist_ok=True)
    for case in cases:
        codebase = CASES[case][0]
        out = os.path.join(args.output, f"{case}.pt")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, "--out", out]
        env = dict(os.environ, OMP_NUM_THREADS="2")
        env.pop("PYTHONPATH", None)
        subprocess.run(cmd, cwd=roots[codebase], env=env, check=True)
        print(case, "->", out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    sys.exit(main())
