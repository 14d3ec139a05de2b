"""Checkpoint helpers: atomic checkpoint files; checked loading (a missing, unreadable or mismatching
file is a :class:`~ks_detr.errors.CheckpointError` naming it and the problem); the weights
``--eval-only`` evaluates; strip the training-only KS parameters to get the plain student."""
import glob
import logging
import os
import pickle
import re
import zipfile
from urllib.parse import urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from .errors import CheckpointError

logger = logging.getLogger(__name__)

# A load must fill at least this fraction of the model's tensors (state-dict entries; teacher-only ones
# not counted, shape mismatches not filled) and of those outside the backbone; a backbone-only file at
# least this fraction of the backbone's.
MIN_MATCH = 0.5
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives (torch >= 1.6)
# What a detectron2 ``.pkl`` (a pickle of numpy arrays, e.g. the ImageNet R-50.pkl) may reference.
PICKLE_GLOBALS = {("collections", "OrderedDict"), ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")} | {
    (f"numpy{core}.{module}", name) for core in (".core", "._core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint file that is not there (also a ``FileNotFoundError``)."""


class _Problem(Exception):
    """What is wrong with the file being loaded; :meth:`AtomicCheckpointer.load` adds its path."""


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
    atomically (:func:`atomic_write`) and whose loads are checked: a missing file, a file that is not
    a checkpoint (torch files are read with ``weights_only=True``, ``.pkl`` files may hold numpy
    arrays only) or a load that fills too little of the model (:meth:`_check_match`) raises
    :class:`CheckpointError` naming the file. ``allow_partial`` (``MODEL.WEIGHTS_ALLOW_PARTIAL``)
    accepts any match; ``require_all`` (inference: ``--eval-only``) refuses any model tensor (teachers'
    aside) that the file does not fill, unless ``allow_partial``."""

    def __init__(self, model, save_dir="", *, allow_partial=False, require_all=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_partial = allow_partial
        self.require_all = require_all

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        teacher = teacher_only_keys(self.model)
        if teacher:  # what tools/ks_to_student.py drops, from the model's structure
            data["teacher_only"] = teacher
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
        intact, else (with a warning naming it) the newest intact ``model_*.pth`` of the directory,
        which ``last_checkpoint`` then names."""
        named = super().get_checkpoint_file()
        others = sorted(glob.glob(os.path.join(self.save_dir, "model_*.pth")), key=os.path.getmtime, reverse=True)
        skipped = []
        for path in [named] + [p for p in others if p != named]:
            problem = checkpoint_problem(path)
            if problem is None:
                if skipped and self.save_to_disk:
                    self.tag_last_checkpoint(os.path.basename(path))
                    logger.warning(f"--resume: {os.path.join(self.save_dir, 'last_checkpoint')} now names "
                                   f"{os.path.basename(path)}")
                return path
            logger.warning(f"--resume: skipping {path} ({problem})")
            skipped.append(f"{os.path.basename(path)}: {problem}")
        raise MissingCheckpointError(f"--resume: no readable checkpoint in {self.save_dir} ({'; '.join(skipped)}); "
                                     "remove the directory's last_checkpoint file to start from MODEL.WEIGHTS")

    def load(self, path, *args, **kwargs):
        """detectron2's load (URLs go through its PathManager); a missing local file, an unreadable one
        or a mismatching one raises :class:`CheckpointError` naming ``path``."""
        local = urlparse(path)._replace(query="").geturl() if path else ""
        if local and "://" not in local and not os.path.isfile(local):
            if os.path.exists(local):
                raise CheckpointError(f"{path}: not a file")
            raise MissingCheckpointError(f"{path}: no such file (MODEL.WEIGHTS takes a checkpoint file, a "
                                         "detectron2:// or http(s):// URL, or '' for random initialisation)")
        try:
            return super().load(path, *args, **kwargs)
        except _Problem as e:
            raise CheckpointError(f"{path}: {e}") from e
        except OSError as e:  # urllib.error.URLError / HTTPError: no network, proxy, 404
            if "://" not in (path or ""):
                raise
            raise CheckpointError(download_failure(path, e)) from e

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = _read_d2_pickle(filename)
        else:
            data = super()._load_file(filename)
        _state_dict(data)
        return data

    def _torch_load(self, f):
        return _read_torch(f)

    def _load_model(self, checkpoint):
        # detectron2's name matching (.pkl files) is done here, not in super(), to check what it maps
        if checkpoint.pop("matching_heuristics", False):
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(self.model.state_dict(), checkpoint["model"],
                                                               c2_conversion=checkpoint.get("__author__") == "Caffe2")
        _rename_moved_keys(checkpoint["model"])
        self._check_match(checkpoint["model"])
        return super()._load_model(checkpoint)

    def _check_match(self, state_dict):
        """Before loading ``state_dict``: raise :class:`_Problem` if it fills fewer than ``MIN_MATCH``
        of the model's tensors, or of its tensors outside the backbone (the transformer and heads would
        stay mostly random), unless ``allow_partial`` or it holds backbone weights only (none of its
        keys belongs to another top-level module of the model) and fills at least ``MIN_MATCH`` of the
        backbone. A tensor is filled by a key of the same name and shape. Teacher-only keys
        (:func:`is_teacher_only`) count neither as missing nor as unexpected, so KS and baseline
        checkpoints load into each other's configs."""
        strip = len("module.") if state_dict and all(k.startswith("module.") for k in state_dict) else 0  # as fvcore
        shapes = {k[strip:]: tuple(v.shape) for k, v in state_dict.items() if not is_teacher_only(k)}
        model = {k: tuple(v.shape) for k, v in self.model.state_dict().items() if not is_teacher_only(k)}
        loaded = [k for k, shape in model.items() if shapes.get(k) == shape]
        reshaped = [k for k, shape in model.items() if shapes.get(k, shape) != shape]
        unexpected = [k for k in shapes if k not in model]
        n_backbone = sum(k.startswith("backbone.") for k in model)
        loaded_heads = [k for k in loaded if not k.startswith("backbone.")]
        other_modules = {k.split(".")[0] for k in model} - {"backbone"}
        backbone_only = not loaded_heads and not any(k.split(".")[0] in other_modules for k in unexpected + reshaped)
        summary = (f"{len(loaded)} of {len(model)} model tensors match, "
                   f"{len(loaded_heads)} of {len(model) - n_backbone} outside the backbone")
        if len(loaded) >= MIN_MATCH * len(model) and len(loaded_heads) >= MIN_MATCH * (len(model) - n_backbone):
            log = logger.info if len(loaded) == len(model) else logger.warning
            log(f"Checkpoint: {summary}")
        elif backbone_only and len(loaded) >= MIN_MATCH * n_backbone:
            logger.info(f"Checkpoint: backbone weights, {len(loaded)} of {n_backbone} backbone tensors loaded; "
                        f"the other {len(model) - len(loaded)} model tensors keep their initialisation")
        elif self.allow_partial:
            logger.warning(f"Checkpoint: only {summary} (loaded as MODEL.WEIGHTS_ALLOW_PARTIAL is True)")
        else:
            detail = f"{len(unexpected)} keys of the file are not in the model"
            if reshaped:
                detail += f", {len(reshaped)} have another shape"
            raise _Problem(f"{summary} ({detail}) — a checkpoint of another config? "
                           "Set MODEL.WEIGHTS_ALLOW_PARTIAL True to load it anyway")
        if self.require_all and not self.allow_partial and len(loaded) < len(model):
            unfilled = [k for k in model if k not in loaded]
            shown = [f"{k} (file {list(shapes[k])}, model {list(model[k])})" if k in shapes
                     else f"{k} (not in the file)" for k in unfilled[:3]]
            raise _Problem(f"{summary}: the other {len(unfilled)} would keep their random initialisation at inference "
                           f"({'; '.join(shown)}{', ...' if len(unfilled) > 3 else ''}) — a checkpoint of another "
                           "config (classes, width, layers)? Set MODEL.WEIGHTS_ALLOW_PARTIAL True to evaluate anyway")


# torchvision ImageNet ResNets that tools/convert_torchvision_resnet.py turns into detectron2's R-50.pkl / R-101.pkl
TORCHVISION_RESNETS = {"R-50.pkl": ("resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
                       "R-101.pkl": ("resnet101", "https://download.pytorch.org/models/resnet101-63fe2227.pth")}


def download_failure(path, error):
    """The message for a MODEL.WEIGHTS URL that could not be downloaded: the reason, and for
    detectron2's torchvision ResNets the command that makes the same file locally."""
    reason = getattr(error, "reason", None) or error
    message = f"{path}: cannot download it ({type(error).__name__}: {reason})"
    name = path.rsplit("/", 1)[-1]
    if "ImageNetPretrained/torchvision/" in path and name in TORCHVISION_RESNETS:
        arch, url = TORCHVISION_RESNETS[name]
        return (f"{message}. Without network, make the same weights from torchvision's: python "
                f"tools/convert_torchvision_resnet.py --arch {arch} --input {url.rsplit('/', 1)[-1]} --output "
                f"weights/{name} (the --input file is {url}, fetched on a machine with network; omit --input where "
                f"torchvision can download it), then add MODEL.WEIGHTS weights/{name}")
    return f"{message}; download the file where there is network and set MODEL.WEIGHTS to its local path"


# key prefixes of checkpoints written before a module moved -> where the module is now
MOVED_KEYS = {prefix: "query_selection." + prefix for prefix in ("enc_output.", "enc_class_embed.", "enc_bbox_embed.")}


def _rename_moved_keys(state_dict):
    """Rename (in place) the keys of modules that moved since the checkpoint was written (``MOVED_KEYS``)."""
    moved = [(k, p) for k in list(state_dict) for p in MOVED_KEYS if k.startswith(p)]
    for key, prefix in moved:
        state_dict[MOVED_KEYS[prefix] + key[len(prefix):]] = state_dict.pop(key)
    if moved:
        logger.info(f"Checkpoint: {len(moved)} keys of moved modules renamed ({', '.join(MOVED_KEYS.values())})")


def load_eval_weights(model, cfg, resume=False):
    """Load into ``model`` what ``--eval-only`` evaluates: with ``resume``, the newest readable
    checkpoint of ``cfg.OUTPUT_DIR`` if there is one, else ``cfg.MODEL.WEIGHTS``; warn when that is
    nothing. Returns the path loaded ("" for none)."""
    checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, allow_partial=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL,
                                      require_all=True)
    path = checkpointer.get_checkpoint_file() if resume and checkpointer.has_checkpoint() else cfg.MODEL.WEIGHTS
    if not path:
        logger.warning("--eval-only without MODEL.WEIGHTS: the predictions come from a randomly initialised "
                       "model; set MODEL.WEIGHTS to a trained checkpoint")
    checkpointer.load(path)
    return path


def checkpoint_problem(path):
    """None if ``path`` is a complete torch zip checkpoint, else what is wrong with it (missing, empty,
    not a zip, truncated, corrupt): every member's CRC is checked, nothing is unpickled."""
    if not path or not os.path.isfile(path):
        return "missing"
    head = _head(path, len(ZIP_MAGIC))
    if not head:
        return "empty file"
    if head != ZIP_MAGIC:
        return "not a torch zip checkpoint"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or corrupt zip archive ({e})"
    return None if bad is None else f"corrupt member {bad} (CRC mismatch)"


def _head(path, size=64):
    with open(path, "rb") as f:
        return f.read(size)


def _reason(error):
    """The informative part of a ``torch.load`` / ``pickle`` error (torch's weights-only errors are paragraphs)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    text = m.group(1) if m else (str(error).splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {text.split('. ')[0].rstrip('.')}"


def _not_a_checkpoint(head, error):
    """:class:`_Problem` for a file that ``torch.load`` / ``pickle`` could not read."""
    try:
        text = head.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if not head:
        what = "the file is empty"
    elif text is not None and all(c.isprintable() or c.isspace() for c in text):
        what = f"a text file starting with {text[:40]!r}"
    else:
        what = f"binary data that does not unpickle: {_reason(error)}"
    return _Problem(f"not a checkpoint ({what})")


def _read_torch(path):
    """The dict a torch checkpoint holds, read with ``weights_only=True``; :class:`_Problem` if the
    file is truncated, not a torch file, holds other Python objects or no dict."""
    head = _head(path)
    if head.startswith(ZIP_MAGIC):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise _Problem(f"not a complete checkpoint: {problem}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not head.startswith(ZIP_MAGIC):
            raise _not_a_checkpoint(head, e) from e
        raise _Problem(f"holds Python objects that weights_only=True does not load ({_reason(e)}); if it is a "
                       "published DETR-family checkpoint, convert it with tools/convert_checkpoint.py") from e
    except Exception as e:  # torch.load fails in many ways on files that are not checkpoints
        raise _not_a_checkpoint(head, e) from e
    if not isinstance(obj, dict):
        raise _Problem(f"not a checkpoint (it holds a {type(obj).__name__}, not a dict of weights)")
    return obj


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only containers and numpy arrays (:data:`PICKLE_GLOBALS`)."""

    def find_class(self, module, name):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a .pkl checkpoint may hold numpy arrays only")
        return super().find_class(module, name)


def _read_d2_pickle(path):
    """A detectron2 ``.pkl`` as ``DetectionCheckpointer`` returns it (model-zoo format as is; a Caffe2
    blob dict with name-matching heuristics), unpickled with numpy arrays only."""
    head = _head(path)
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # pickle fails in many ways on files that are not pickles
        raise _not_a_checkpoint(head, e) from e
    if not isinstance(data, dict):
        raise _Problem(f"not a checkpoint (a pickle of {type(data).__name__}, not a dict of weight arrays)")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    if not isinstance(blobs, dict):
        raise _Problem(f"not a checkpoint (its 'blobs' entry is a {type(blobs).__name__})")
    return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")},
            "__author__": "Caffe2", "matching_heuristics": True}


def _state_dict(checkpoint):
    """The state dict of a checkpoint dict (its ``"model"`` entry, else itself); :class:`_Problem` unless
    it is a non-empty dict of tensors / numpy arrays."""
    sd = checkpoint.get("model", checkpoint)
    if not isinstance(sd, dict) or not sd:
        raise _Problem("not a checkpoint (no state dict: expected {'model': {name: tensor}} or {name: tensor})")
    for k, v in sd.items():
        if not isinstance(v, (torch.Tensor, np.ndarray)):
            raise _Problem(f"not a checkpoint (state-dict entry {k!r} is a {type(v).__name__}, not a tensor)")
    return sd


def teacher_only_keys(model):
    """Sorted state-dict keys of ``model`` that only its teachers use, from the model's structure
    (:meth:`ks_detr.modeling.ks.KnowledgeSharing.teacher_parameter_names`); [] without KS."""
    ks = getattr(model, "ks", None)
    return sorted(ks.teacher_parameter_names(model)) if ks is not None else []


def is_teacher_only(key):
    """Name rule for checkpoints that do not list their teacher-only keys (converted official ones,
    older files): the sMLP (``ks_smlp.*``) and teacher projections (``teacher_*`` / ``*_teacher``).
    tests/test_knowledge_sharing.py checks that it agrees with :func:`teacher_only_keys` for every family and mode."""
    parts = key.split(".")
    return parts[0] == "ks_smlp" or any(p.startswith("teacher_") or p.endswith("_teacher") for p in parts)


def student_state_dict(state_dict, teacher_only=None):
    """KS model state dict -> baseline state dict (same tensors, teacher-only keys dropped).
    ``teacher_only``: the keys to drop (a checkpoint's list); None = :func:`is_teacher_only`."""
    drop = set(teacher_only) if teacher_only is not None else {k for k in state_dict if is_teacher_only(k)}
    return {k: v for k, v in state_dict.items() if k not in drop}


def load_checkpoint(path, with_teacher_keys=False):
    """The state dict of a torch checkpoint file (``{"model": state_dict, ...}`` or a bare state dict),
    read with ``weights_only=True``; :class:`CheckpointError` naming ``path`` if it is not one.
    ``with_teacher_keys``: also return the file's ``teacher_only`` list (None if it has none)."""
    try:
        checkpoint = _read_torch(path)
        sd = _state_dict(checkpoint)
    except _Problem as e:
        raise CheckpointError(f"{path}: {e}") from e
    if not with_teacher_keys:
        return sd
    teacher = checkpoint.get("teacher_only") if isinstance(checkpoint, dict) and "model" in checkpoint else None
    return sd, teacher


def torchvision_resnet_name(name):
    """torchvision ResNet name (``conv1.weight``, ``layer1.0.bn2.running_mean``, ...) -> detectron2's, or None."""
    if m := re.fullmatch(r"conv1\.weight", name):
        return "stem.conv1.weight"
    if m := re.fullmatch(r"bn1\.(\w+)", name):
        return f"stem.conv1.norm.{m[1]}"
    if not (m := re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", name)):
        return None
    stage, rest = f"res{int(m[1]) + 1}.{m[2]}", m[3]
    for pattern, template in ((r"conv(\d)\.weight", "conv{}.weight"), (r"bn(\d)\.(\w+)", "conv{}.norm.{}"),
                              (r"downsample\.0\.weight", "shortcut.weight"),
                              (r"downsample\.1\.(\w+)", "shortcut.norm.{}")):
        if r := re.fullmatch(pattern, rest):
            return f"{stage}.{template.format(*r.groups())}"
    return None
