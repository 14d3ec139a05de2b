"""Checkpoint helpers: strip the training-only KS parameters to get the plain student."""
import torch

def is_teacher_only(key):
    """True for a state-dict key that the student (= the baseline detector) does not have: the
    sMLP (``ks_smlp.*``) and teacher projections (``teacher_*`` / ``*_teacher``)."""
    parts = key.split(".")
    return parts[0] == "ks_smlp" or any(p.startswith("teacher_") or p.endswith("_teacher") for p in parts)


def student_state_dict(state_dict):
    """KS model state dict -> baseline state dict (same tensors, teacher-only keys dropped)."""
    return {k: v for k, v in state_dict.items() if not is_teacher_only(k)}


def load_checkpoint(path):
    """Read a detectron2 checkpoint (``{"model": state_dict, ...}`` or a bare state dict) safely."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    model = ckpt.get("model", ckpt)
    if not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ValueError(f"{path}: its 'model' entry is not a state dict of tensors")
    return model
