"""Checkpoint helpers: atomic checkpoint files; strip the training-only KS parameters to get the
plain student."""
import glob
import logging
import os
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary file next to ``path`` (binary mode), flush it to disk and
    rename it to ``path``: a reader never sees a partial file, even after a kill mid-write."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``model_*.pth`` and ``last_checkpoint`` files are written
    atomically (:func:`atomic_write`); the checkpoint's content is detectron2's."""

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def get_checkpoint_file(self):
        """The checkpoint ``--resume`` continues from: the one ``last_checkpoint`` names if it is
        intact, else (with a warning naming it) the newest intact ``model_*.pth`` of the directory."""
        named = super().get_checkpoint_file()
        others = sorted(glob.glob(os.path.join(self.save_dir, "model_*.pth")), key=os.path.getmtime, reverse=True)
        for path in [named] + [p for p in others if p != named]:
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logging.getLogger(__name__).warning(f"--resume: skipping {path} ({problem})")
        raise FileNotFoundError(f"--resume: no readable checkpoint in {self.save_dir} (see the warnings above); "
                                "remove the directory's last_checkpoint file to start from MODEL.WEIGHTS")


def checkpoint_problem(path):
    """None if ``path`` is a complete torch zip checkpoint, else what is wrong with it (missing,
    truncated, corrupt): every member's CRC is checked, nothing is unpickled."""
    if not path or not os.path.isfile(path):
        return "missing"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a complete checkpoint: {e}"
    return None if bad is None else f"corrupt member {bad}"

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
