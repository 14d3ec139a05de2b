#!/usr/bin/env python
"""Write docs/configs.md: every config key ks-detr adds to detectron2's, with its default and meaning.

    python tools/config_reference.py            # rewrite docs/configs.md
    python tools/config_reference.py --check    # exit 1 if docs/configs.md is not what this would write

The keys and defaults come from ``get_cfg()`` + ``ks_detr.add_ks_detr_config``; each meaning is the comment at the
key's assignment in ``ks_detr/config.py`` (the comment lines right above it and the one at its end).
``tests/test_docs.py`` runs ``--check``, so the page cannot drift from the code.
"""
import argparse
import os
import re
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, REPO)
OUTPUT = os.path.join(REPO, "docs", "configs.md")
SOURCE = os.path.join(REPO, "ks_detr", "config.py")
ALIASES = {"_C": "MODEL.DETR", "_K": "MODEL.KS", "cfg": ""}
ASSIGN = re.compile(r"^\s*(_C|_K|cfg)\.([A-Z0-9_.]+) = (.*?)(?:\s+#\s?(.*))?$")

HEADER = """# Config keys

ks-detr adds these keys to detectron2's config (`ks_detr.add_ks_detr_config(cfg)`; `ks_detr.load_config(file,
opts)` also merges a YAML file and `KEY VALUE` overrides and checks them). Every other key is detectron2's own
(`detectron2/config/defaults.py`); `load_config` refuses, with a message naming the key, the detectron2 keys that a
DETR model would silently ignore. Meanings of the official-numerics keys: [fidelity](fidelity.md).

This page is generated from `ks_detr/config.py` by `python tools/config_reference.py`; a test fails when it is out of
date.

| key | default | meaning |
|---|---|---|
"""


def meanings():
    """{full key: comment} from the assignments in ``add_ks_detr_config`` (``ks_detr/config.py``), and the comment
    lines that end the function (notes on detectron2 keys)."""
    out, above, inside, orphan = {}, [], False, []
    with open(SOURCE) as f:
        for line in f:
            if line.startswith("def "):
                inside = line.startswith("def add_ks_detr_config")
            if not inside:
                continue
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            m = ASSIGN.match(line)
            if m and not m.group(3).startswith("CN()"):
                alias, key, _, inline = m.groups()
                prefix = ALIASES[alias]
                full = f"{prefix}.{key}" if prefix else key
                out[full] = " ".join(above + ([inline] if inline else []))
            elif above:
                orphan = above  # a comment block above no key
            above = []
    return out, orphan


def added_keys():
    """[(key, default)] of every leaf key ks-detr adds, in config order."""
    from detectron2.config import get_cfg
    from ks_detr.config import add_ks_detr_config

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    base = dict(leaves(get_cfg()))
    cfg = get_cfg()
    add_ks_detr_config(cfg)
    return [(k, v) for k, v in leaves(cfg) if k not in base]


def render():
    notes, trailing = meanings()
    rows = []
    for key, default in added_keys():
        if key not in notes:
            raise SystemExit(f"{key} has no comment at its assignment in ks_detr/config.py: add one")
        meaning = notes[key].replace("|", "\\|")
        rows.append(f"| `{key}` | `{default!r}` | {meaning} |")
    footer = "\n\ndetectron2 keys that ks-detr reads in its own way:\n\n" + "".join(f"- {n}\n" for n in trailing)
    return HEADER + "\n".join(rows) + (footer if trailing else "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare with docs/configs.md; exit 1 if different")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        with open(OUTPUT) as f:
            if f.read() != text:
                print("docs/configs.md is out of date: run python tools/config_reference.py", file=sys.stderr)
                return 1
        return 0
    with open(OUTPUT, "w") as f:
        f.write(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
