"""The user docs (README.md, MODEL_ZOO.md, CHANGELOG.md, docs/*.md) cannot rot: no development history, every link,
file, config and tool they name exists, every ``--flag`` shown for one of our scripts is accepted by it, every config
key shown exists, the config reference is generated from the code, and the README's Python snippet runs."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
from detectron2.config import get_cfg

from conftest import REPO
from ks_detr import add_ks_detr_config

PAGES = sorted(["README.md", "MODEL_ZOO.md", "CHANGELOG.md"]
               + [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))])
# words of the development process, not of the software
HISTORY = [r"\bissues? ?#?\d+", r"\bstops? \d+", r"\b(previous|earlier|this|last) stops?\b", r"\bsessions?\b",
           r"\bclosing note", r"\blanded\b"]
# a hex word of 7-40 characters with a digit and a letter: a commit id (not a file name's hash suffix, as in
# resnet50-0676ba61.pth). The reference code's pinned commits and the cited sources' are facts.
COMMIT = re.compile(r"(?<![-\w])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
PINNED = {"df0f2f6", "e244e6c",  # official KS-DETR, detrex
          "8ea7c3f", "723ddb8", "ff3902a", "11169a6", "02b5c4e"}  # the sources MODEL_ZOO.md cites
ROOTS = ("MODEL", "SOLVER", "INPUT", "DATASETS", "DATALOADER", "TEST", "OUTPUT_DIR", "SEED", "CPU_KEEP_FREED_MEMORY",
         "CUDNN_BENCHMARK", "VIS_PERIOD", "VERSION")
SCRIPTS = re.compile(r"((?:tools|demo)/\w+\.py|train_net\.py)")


def read(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("page", PAGES)
def test_no_development_history(page):
    text = read(page)
    for pattern in HISTORY:
        found = re.search(pattern, text, re.I)
        assert not found, f"{page}: {found.group(0)!r} speaks of how the code was made"
    commits = set(COMMIT.findall(text)) - PINNED
    assert not commits, f"{page}: commit ids {sorted(commits)}"


@pytest.mark.parametrize("page", PAGES)
def test_links_and_named_files_exist(page):
    text, here = read(page), os.path.dirname(os.path.join(REPO, page))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        assert os.path.exists(os.path.join(here, target.split("#")[0])), f"{page}: link {target}"
    for path in re.findall(r"(?<![\w./-])((?:configs|tools|ks_detr|tests|docs|demo|scripts)/[\w./-]*\w)", text):
        if os.path.splitext(path)[1] or path.endswith("/"):
            assert os.path.exists(os.path.join(REPO, path)), f"{page}: {path} does not exist"


def all_config_keys():
    cfg = get_cfg()
    add_ks_detr_config(cfg)
    keys = set()

    def walk(node, prefix):
        for k, v in node.items():
            keys.add(prefix + k)
            if isinstance(v, dict):
                walk(v, prefix + k + ".")

    walk(cfg, "")
    return keys


@pytest.mark.parametrize("page", PAGES)
def test_config_keys_exist(page):
    keys = all_config_keys()
    for key in re.findall(r"\b((?:%s)(?:\.[A-Z][A-Z0-9_]*)+)" % "|".join(ROOTS), read(page)):
        assert key in keys, f"{page}: config key {key} does not exist"


HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    buf = io.StringIO()
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit:
            pass
    out[script] = buf.getvalue()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_texts():
    """``--help`` of every script the pages show, in one process: {script: text}."""
    scripts = sorted({m for page in PAGES for m in SCRIPTS.findall(read(page))})
    r = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    texts = json.loads(r.stdout.strip().splitlines()[-1])
    for script, text in texts.items():
        assert "usage" in text, f"{script} --help printed no usage"
    return texts


@pytest.mark.parametrize("page", PAGES)
def test_flags_shown_for_our_scripts_are_accepted(page, help_texts):
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", read(page), re.S):
        command = block.replace("\\\n", " ")
        for line in command.splitlines():
            line = line.split("#")[0]
            m = SCRIPTS.search(line)
            if not m:
                continue
            ours = line[m.end():].split(" -- ")[0]  # after "--", tools/submit.py passes the rest to train_net.py
            rest = line[m.end():].split(" -- ")[1:]
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", ours):
                assert flag in help_texts[m.group(1)], f"{page}: {m.group(1)} has no {flag}"
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", " ".join(rest)):
                assert flag in help_texts["train_net.py"], f"{page}: train_net.py has no {flag}"


def test_config_reference_is_generated_from_the_code():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import config_reference
    assert read("docs/configs.md") == config_reference.render(), "run python tools/config_reference.py"


def test_readme_python_api_snippet_runs(monkeypatch):
    snippet = re.search(r"## Python API.*?```python\n(.*?)```", read("README.md"), re.S).group(1)
    check = snippet + (
        "\nimport numpy as np\n"
        "assert type(model).__name__ == 'DNDeformableDETR' and model.ks_enabled\n"
        "out = predictor(np.zeros((96, 128, 3), dtype=np.uint8))\n"
        "assert out['instances'].image_size == (96, 128) and len(out['instances']) == cfg.MODEL.DETR.NUM_TOPK_TEST\n")
    monkeypatch.chdir(REPO)
    exec(compile(check, "README.md (Python API)", "exec"), {})


def test_readme_is_short():
    assert len(read("README.md").splitlines()) <= 150
