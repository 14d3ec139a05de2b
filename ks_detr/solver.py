"""Optimizer of the DETR recipe: AdamW (or SGD) with a backbone lr multiplier and optional
full-model gradient clipping (one norm over all parameters)."""
import torch
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping


def _full_model_clipping(optim_cls, max_norm, norm_type):
    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model):
    """Param groups as detectron2's ``get_default_optimizer_params``: weight decay
    ``SOLVER.WEIGHT_DECAY``, ``SOLVER.WEIGHT_DECAY_NORM`` on normalisation layers and, when set,
    ``SOLVER.WEIGHT_DECAY_BIAS`` on parameters named ``bias`` (detectron2's rule: it also wins on the
    biases of normalisation layers). The lr is ``SOLVER.BASE_LR`` x ``SOLVER.BACKBONE_MULTIPLIER`` for
    the pretrained trunk (``backbone.*``, or ``backbone.bottom_up.*`` when the backbone is an FPN, whose
    new lateral/output convolutions keep the base lr) x ``SOLVER.BIAS_LR_FACTOR`` for biases (both
    factors apply to a trunk bias; detectron2 alone would drop the backbone factor there).

    Clipping (``SOLVER.CLIP_GRADIENTS``): ``CLIP_TYPE`` "full_model" clips the ``NORM_TYPE`` norm of
    all gradients together to ``CLIP_VALUE``; "value" and "norm" are detectron2's per-parameter ones."""
    mult, bias_factor = cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.BIAS_LR_FACTOR
    trunk = "backbone.bottom_up." if hasattr(model.backbone, "bottom_up") else "backbone."

    def lr_factor(name):  # name: "<module>.<parameter>"
        factor = mult if name.startswith(trunk) else 1.0
        return factor * bias_factor if name.rsplit(".", 1)[-1] == "bias" else factor

    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=lr_factor,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, dict(betas=(0.9, 0.999))
    else:
        optim_cls, kwargs = torch.optim.SGD, dict(momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optim_cls(params, lr=cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls)(params, lr=cfg.SOLVER.BASE_LR, **kwargs)
