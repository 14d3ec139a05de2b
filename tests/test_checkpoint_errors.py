"""Checked checkpoint loading: a MODEL.WEIGHTS / --eval-only / --resume file that is missing, not a checkpoint,
truncated or of another config raises CheckpointError naming the file and the problem; backbone-only files
(.pth or detectron2 .pkl) and KS <-> baseline checkpoints load; --resume skips an unreadable newest checkpoint."""
import os
import pickle
import random
import re
import time

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from conftest import make_cfg
from ks_detr.checkpoint import AtomicCheckpointer, MissingCheckpointError, is_teacher_only, load_eval_weights
from ks_detr.data.datasets import datasets_root
from ks_detr.errors import CheckpointError

TRANSFORMER = ("MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 2, "MODEL.DETR.DIM_FEEDFORWARD", 16,
               "MODEL.DETR.NUM_QUERIES", 7, "MODEL.DETR.NUM_TOPK_TEST", 7)
# Quickstart models (MobileNet-V2 up to res3, tiny transformer): the backbone is 108 of the 257 tensors.
TINY = ("MODEL.MOBILENET_V2.PRETRAINED", "False", "MODEL.MOBILENET_V2.OUT_FEATURES", "['res3']",
        "MODEL.DETR.IN_FEATURES", "['res3']", "MODEL.DETR.NUM_FEATURE_LEVELS", 1, *TRANSFORMER)
BASELINE, KS = "configs/quickstart/trees.yaml", "configs/quickstart/ks_trees.yaml"
OTHER = "configs/conditional_detr_r50.yaml"  # R-50 Conditional DETR: another config for the quickstart files


def cfg_of(config, *opts):
    return make_cfg(config, *(TRANSFORMER if config == OTHER else TINY), *opts)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {config: build_model(cfg_of(config)) for config in (BASELINE, KS, OTHER)}


def random_state(model, keep=lambda k: True):
    """``model``'s state dict with new random values (so a loaded tensor is recognisable), keys filtered."""
    return {k: torch.randn_like(v) if v.is_floating_point() else torch.randint_like(v, 100)
            for k, v in model.state_dict().items() if keep(k)}


def save(path, state):
    torch.save({"model": state}, path)
    return str(path)


def assert_loaded(model, state, keys):
    sd = model.state_dict()
    different = [k for k in keys if not torch.equal(sd[k], state[k])]
    assert not different, different


def write_text(path):
    path.write_text("output/model_final.pth\n")


def write_random(path):
    path.write_bytes(random.Random(0).randbytes(4096))


def write_truncated(path):
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2500])


@pytest.mark.parametrize("name,write,problem", [
    ("text.pth", write_text, "not a checkpoint (a text file starting with 'output/model_final.pth')"),
    ("random.pth", write_random, "not a checkpoint (binary data that does not unpickle: UnpicklingError: "),
    ("truncated.pth", write_truncated, "not a complete checkpoint: truncated or corrupt zip archive ("),
    ("empty.pth", lambda p: p.write_bytes(b""), "not a checkpoint (the file is empty)"),
    ("list.pth", lambda p: torch.save([torch.zeros(2)], p),
     "not a checkpoint (it holds a list, not a dict of weights)"),
    ("strings.pth", lambda p: torch.save({"model": {"w": "x"}}, p),
     "not a checkpoint (state-dict entry 'w' is a str, not a tensor)"),
    ("list.pkl", lambda p: p.write_bytes(pickle.dumps([1, 2])),
     "not a checkpoint (a pickle of list, not a dict of weight arrays)"),
])
def test_unreadable_file_is_named_with_its_problem(tmp_path, models, name, write, problem):
    """The error names the file and what is wrong with it; the model is left as it was."""
    path = tmp_path / name
    write(path)
    model = models[BASELINE]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        AtomicCheckpointer(model).resume_or_load(str(path), resume=False)
    assert str(e.value).startswith(f"{path}: {problem}")
    assert_loaded(model, before, before)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pkl_holding_code_is_refused_not_run(tmp_path, models):
    marker = str(tmp_path / "ran")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": RunsCode(marker)}, "__author__": "x"}))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a checkpoint (binary data that does not "
                                                        f"unpickle: UnpicklingError: refusing {os.name}.mkdir")):
        AtomicCheckpointer(models[BASELINE]).load(str(path))
    assert not os.path.exists(marker)


def test_missing_file_says_so(tmp_path, models):
    path = tmp_path / "model.pth"
    with pytest.raises(MissingCheckpointError, match=re.escape(f"{path}: no such file (MODEL.WEIGHTS")) as e:
        load_eval_weights(models[BASELINE], cfg_of(BASELINE, "MODEL.WEIGHTS", str(path)))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, CheckpointError)


def test_checkpoint_of_another_config_is_refused_with_counts(tmp_path, models):
    """A quickstart checkpoint into the R-50 Conditional DETR: the error gives the exact counts; with
    MODEL.WEIGHTS_ALLOW_PARTIAL True the matching tensors load."""
    state = random_state(models[BASELINE])
    path = save(tmp_path / "model.pth", state)
    model = models[OTHER]
    target = model.state_dict()
    matched = [k for k, v in target.items() if k in state and state[k].shape == v.shape]
    heads = sum(not k.startswith("backbone.") for k in target)
    matched_heads = sum(not k.startswith("backbone.") for k in matched)
    reshaped = sum(k in state and state[k].shape != v.shape for k, v in target.items())
    unexpected = sum(k not in target for k in state)
    assert len(matched) < len(target) / 2 and unexpected > 0 and reshaped > 0
    expected = (f"{path}: {len(matched)} of {len(target)} model tensors match, {matched_heads} of {heads} outside the "
                f"backbone ({unexpected} keys of the file are not in the model, {reshaped} have another shape) — a "
                "checkpoint of another config? Set MODEL.WEIGHTS_ALLOW_PARTIAL True to load it anyway")
    before = {k: v.clone() for k, v in target.items()}
    with pytest.raises(CheckpointError) as e:
        load_eval_weights(model, cfg_of(OTHER, "MODEL.WEIGHTS", path))
    assert str(e.value) == expected
    assert_loaded(model, before, before)  # refused before anything was loaded
    assert load_eval_weights(model, cfg_of(OTHER, "MODEL.WEIGHTS", path, "MODEL.WEIGHTS_ALLOW_PARTIAL", "True")) == path
    assert_loaded(model, state, matched)


def test_other_transformer_width_is_refused(tmp_path, models):
    """Same backbone, another HIDDEN_DIM: more than half of all tensors match (the backbone), but fewer than
    half of those outside it."""
    model = models[BASELINE]
    wide = build_model(cfg_of(BASELINE, "MODEL.DETR.HIDDEN_DIM", 64)).state_dict()
    matched = [k for k, v in model.state_dict().items() if wide[k].shape == v.shape]
    matched_heads = sum(not k.startswith("backbone.") for k in matched)
    assert len(matched) > 257 / 2 and matched_heads < 149 / 2
    path = save(tmp_path / "wide.pth", wide)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path}: {len(matched)} of 257 model tensors match, {matched_heads} of 149 outside the backbone")):
        AtomicCheckpointer(model).load(path)


def test_threshold_is_half_of_all_and_of_non_backbone_student_tensors(tmp_path, models):
    """Into the KS model (108 backbone + 149 other student tensors + 6 teacher-only): half of the student tensors
    (rounded up) load and one fewer does not; all the backbone and half of the rest load, one fewer does not.
    The teacher-only tensors count neither way."""
    model = models[KS]
    keys = [k for k in model.state_dict() if not is_teacher_only(k)]
    heads = [k for k in keys if not k.startswith("backbone.")]
    backbone = [k for k in keys if k.startswith("backbone.")]
    assert (len(keys), len(heads), len(model.state_dict())) == (257, 149, 263)
    state = random_state(model)
    cases = [(heads, 129, 128),  # 129 of 257 load (all outside the backbone); 128 do not
             (backbone + heads, 108 + 75, 74)]  # the backbone and 75 of 149 others load; 74 others do not
    for i, (chosen, needed, heads_below) in enumerate(cases):
        subset = {k: state[k] for k in chosen[:needed]}
        AtomicCheckpointer(model).load(save(tmp_path / f"enough{i}.pth", subset))
        assert_loaded(model, subset, subset)
        path = save(tmp_path / f"less{i}.pth", {k: state[k] for k in chosen[:needed - 1]})
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: {needed - 1} of 257 model tensors match, "
                                                            f"{heads_below} of 149 outside the backbone (0 keys")):
            AtomicCheckpointer(model).load(path)


@pytest.mark.parametrize("config", [BASELINE, KS])
def test_backbone_only_files_load(tmp_path, models, caplog, config):
    """Backbone tensors only (fewer than half of the model's): a trimmed .pth and an ImageNet-style detectron2
    .pkl (numpy arrays, unprefixed names, an unused classifier) load; less than half of the backbone does not."""
    model = models[config]
    state = random_state(model, lambda k: k.startswith("backbone."))
    assert len(state) == 108 < len(model.state_dict()) / 2
    with caplog.at_level("INFO", logger="ks_detr.checkpoint"):
        AtomicCheckpointer(model).load(save(tmp_path / "backbone.pth", state))
    assert "backbone weights, 108 of 108 backbone tensors loaded" in caplog.text
    assert_loaded(model, state, state)

    state = random_state(model, lambda k: k.startswith("backbone."))
    imagenet = {k[len("backbone."):]: v.numpy() for k, v in state.items()}
    imagenet.update({"classifier.1.weight": np.zeros((1000, 1280), np.float32), "classifier.1.bias": np.zeros(1000)})
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # 2: as written by Python 2 era tools
        pkl = tmp_path / f"imagenet{protocol}.pkl"
        pkl.write_bytes(pickle.dumps({"model": imagenet, "__author__": "torchvision", "matching_heuristics": True},
                                     protocol=protocol))
        model.load_state_dict(random_state(model))
        AtomicCheckpointer(model).load(str(pkl))
        assert_loaded(model, state, state)

    part = save(tmp_path / "part.pth", dict(list(state.items())[:53]))
    with pytest.raises(CheckpointError, match=re.escape(f"{part}: 53 of 257 model tensors match, 0 of 149 outside")):
        AtomicCheckpointer(model).load(part)


def test_ks_and_baseline_checkpoints_load_into_each_other(tmp_path, models):
    """KS -> baseline: every baseline tensor loads (teacher keys unused); baseline -> KS: every student tensor."""
    baseline, ks = models[BASELINE], models[KS]
    state = random_state(ks)
    AtomicCheckpointer(baseline).load(save(tmp_path / "ks.pth", state))
    assert_loaded(baseline, state, baseline.state_dict())

    state = random_state(baseline)
    teachers = {k: v.clone() for k, v in ks.state_dict().items() if is_teacher_only(k)}
    assert len(teachers) == 6
    AtomicCheckpointer(ks).load(save(tmp_path / "baseline.pth", state))
    assert_loaded(ks, state, state)
    assert_loaded(ks, teachers, teachers)  # teacher-only tensors keep their values


def test_checkpoint_from_before_the_query_selection_moved_loads(tmp_path, models, caplog):
    """Two-stage heads were top-level modules (``enc_output.*`` ...); they now live in ``query_selection``.
    A file with the old names fills them (nothing left at its initialisation)."""
    model = models[BASELINE]
    state = random_state(model)
    old = {k.replace("query_selection.", ""): v for k, v in state.items()}
    assert sum(k.startswith("enc_") for k in old) == 12
    with caplog.at_level("INFO"):
        AtomicCheckpointer(model).load(save(tmp_path / "old.pth", old))
    assert_loaded(model, state, state)
    assert "12 keys of moved modules renamed" in caplog.text and "257 of 257 model tensors match" in caplog.text


def test_resume_skips_truncated_final_checkpoint(tmp_path, models, caplog):
    """last_checkpoint names a truncated model_final.pth: --resume (training) and --eval-only --resume load
    the intact model_0000001.pth, with a warning naming the skipped file."""
    model = models[BASELINE]
    first = random_state(model)
    model.load_state_dict(first)
    AtomicCheckpointer(model, str(tmp_path)).save("model_0000001")
    time.sleep(0.05)
    model.load_state_dict(random_state(model))
    AtomicCheckpointer(model, str(tmp_path)).save("model_final")
    final = tmp_path / "model_final.pth"
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    final.write_bytes(final.read_bytes()[:-100])

    with caplog.at_level("WARNING", logger="ks_detr.checkpoint"):
        AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert f"--resume: skipping {final} (truncated or corrupt zip archive" in caplog.text
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"  # repaired: names what was loaded
    assert_loaded(model, first, first)

    model.load_state_dict(random_state(model))
    path = load_eval_weights(model, cfg_of(BASELINE, "OUTPUT_DIR", str(tmp_path)), resume=True)
    assert path == str(tmp_path / "model_0000001.pth")
    assert_loaded(model, first, first)

    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(MissingCheckpointError, match=re.escape(
            f"--resume: no readable checkpoint in {tmp_path} (model_0000001.pth: empty file; model_final.pth: "
            "truncated or corrupt zip archive")):
        AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)


def test_eval_only_without_weights_warns(models, caplog):
    with caplog.at_level("WARNING", logger="ks_detr.checkpoint"):
        assert load_eval_weights(models[BASELINE], cfg_of(BASELINE)) == ""
    assert "--eval-only without MODEL.WEIGHTS: the predictions come from a randomly initialised model" in caplog.text


def test_command_line_tools_end_in_one_error_line_naming_the_file(tmp_path):
    """train_net --eval-only, demo.py and ks_to_student.py with a text file as checkpoint: exit 2, last line."""
    import subprocess
    import sys

    from conftest import REPO

    text = tmp_path / "model_final.pth"
    text.write_text("output/model_final.pth\n")
    image = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (64, 48)).save(image)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(text), *map(str, TINY)]
    commands = {
        "train_net": ["train_net.py", "--eval-only", "--config-file", BASELINE, "OUTPUT_DIR", str(tmp_path), *opts],
        "demo": ["demo/demo.py", "--config-file", BASELINE, "--input", str(image), "--output", str(tmp_path), *opts],
        "ks_to_student": ["tools/ks_to_student.py", str(text), str(tmp_path / "student.pth")],
    }
    for name, args in commands.items():
        r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith(f"error: {text}: not a checkpoint"), (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, name


def test_eval_only_refuses_heads_that_did_not_load(tmp_path):
    """A 3-class checkpoint at --eval-only in the 1-class trees config: all but the class heads match
    (the load alone would only warn), but inference would use random class heads: exit 2, one line
    naming the file, the counts and the first unfilled tensors with both shapes. Training from it, or
    MODEL.WEIGHTS_ALLOW_PARTIAL True, still loads it."""
    import subprocess
    import sys

    from conftest import REPO

    three = build_model(cfg_of(BASELINE, "MODEL.DETR.NUM_CLASSES", 3))
    path = save(tmp_path / "three_classes.pth", three.state_dict())
    model = build_model(cfg_of(BASELINE))
    n = len(model.state_dict())
    unfilled = [k for k, v in model.state_dict().items() if v.shape != three.state_dict()[k].shape]
    assert 0 < len(unfilled) < 0.1 * n
    with pytest.raises(CheckpointError) as e:
        load_eval_weights(model, cfg_of(BASELINE, "MODEL.WEIGHTS", path))
    first = unfilled[0]
    assert str(e.value).startswith(
        f"{path}: {n - len(unfilled)} of {n} model tensors match, ")
    assert (f": the other {len(unfilled)} would keep their random initialisation at inference ({first} (file "
            f"{list(three.state_dict()[first].shape)}, model {list(model.state_dict()[first].shape)})") in str(e.value)
    assert str(e.value).endswith("Set MODEL.WEIGHTS_ALLOW_PARTIAL True to evaluate anyway")
    AtomicCheckpointer(model).load(path)  # as MODEL.WEIGHTS of a training run: a warning only
    assert load_eval_weights(model, cfg_of(BASELINE, "MODEL.WEIGHTS", path, "MODEL.WEIGHTS_ALLOW_PARTIAL", "True"))

    r = subprocess.run([sys.executable, "train_net.py", "--eval-only", "--config-file", BASELINE, *map(str, TINY),
                        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: {e.value}"
    assert "Traceback" not in r.stdout + r.stderr and "copypaste" not in r.stdout
    photo = str(datasets_root() / "trees" / "images" / "SOAP_061_0_0.jpg")
    r = subprocess.run([sys.executable, "demo/demo.py", "--config-file", BASELINE, "--input", photo, "--output",
                        str(tmp_path / "pictures"), *map(str, TINY), "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", path],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"error: {e.value}", r.stderr[-2000:]
    assert not (tmp_path / "pictures").exists()  # demo/demo.py refuses the same file before drawing anything


def test_r50_weights_offline_name_the_converter_command(tmp_path):
    """An R-50 config without network (a proxy that refuses connections, an empty download cache):
    exit 2 and one line naming the URL, the reason and the tools/convert_torchvision_resnet.py command."""
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, FVCORE_CACHE=str(tmp_path / "cache"), https_proxy="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               no_proxy="", NO_PROXY="")
    r = subprocess.run([sys.executable, "train_net.py", "--config-file", OTHER, "MODEL.DEVICE", "cpu",
                        "DATASETS.TRAIN", '("trees_train",)', "DATASETS.TEST", "()", "MODEL.DETR.NUM_CLASSES", "1",
                        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, env=env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-2000:]
    assert last.startswith("error: detectron2://ImageNetPretrained/torchvision/R-50.pkl: cannot download it "
                           "(URLError: ")
    assert last.endswith(
        "Without network, make the same weights from torchvision's: python tools/convert_torchvision_resnet.py --arch "
        "resnet50 --input resnet50-0676ba61.pth --output weights/R-50.pkl (the --input file is "
        "https://download.pytorch.org/models/resnet50-0676ba61.pth, fetched on a machine with network; omit --input "
        "where torchvision can download it), then add MODEL.WEIGHTS weights/R-50.pkl")
    assert "Traceback" not in r.stdout + r.stderr
