"""Optimizer of the DETR recipe: AdamW (or SGD) with a backbone lr multiplier and optional
full-model gradient clipping (one L2 norm over all parameters)."""
import torch
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping


def _full_model_clipping(optim_cls, max_norm):
    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model):
    """Param groups from detectron2 (no weight decay on norms per ``SOLVER.WEIGHT_DECAY_NORM``),
    lr x ``SOLVER.BACKBONE_MULTIPLIER`` for the pretrained trunk: ``backbone.*``, or ``backbone.bottom_up.*``
    when the backbone is an FPN (its new lateral/output convolutions keep the base lr)."""
    mult = cfg.SOLVER.BACKBONE_MULTIPLIER
    trunk = "backbone.bottom_up." if hasattr(model.backbone, "bottom_up") else "backbone."
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lambda name: mult if name.startswith(trunk) else 1.0,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, dict(betas=(0.9, 0.999))
    else:
        optim_cls, kwargs = torch.optim.SGD, dict(momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _full_model_clipping(optim_cls, clip.CLIP_VALUE)(params, lr=cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls)(params, lr=cfg.SOLVER.BASE_LR, **kwargs)
