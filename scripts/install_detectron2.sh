#!/usr/bin/env bash
# Installs detectron2 into the ACTIVE Python environment, choosing the first route that works:
#   1. "preinstalled": an importable detectron2 is kept as it is;
#   2. "official":     upstream source from GitHub at a pinned commit (compiles detectron2._C; needs g++),
#                      tried only when github.com answers within a few seconds;
#   3. "pypi-repack":  the pure-Python part of PyPI's sal-detectron2 0.7.2 (upstream code of April 2024),
#                      pinned by sha256, repacked as py3-none-any without its cp310 _C extension.
# ks_detr never needs detectron2._C, so routes 2 and 3 are equivalent for it.
# The route taken is printed and written to "$(python -c 'import sys; print(sys.prefix)')/ks_detr_detectron2_route.txt".
set -euo pipefail
PY=${PYTHON:-python}
D2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833   # upstream main, 2026-06-06
SAL_VERSION=0.7.2
SAL_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561
ROUTE_FILE="$($PY -c 'import sys; print(sys.prefix)')/ks_detr_detectron2_route.txt"

record() { echo "detectron2 route: $1"; echo "$1" > "$ROUTE_FILE"; }

if $PY -c "import detectron2" 2>/dev/null; then
  record "preinstalled ($($PY -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))'))"
  exit 0
fi

if [ "${KS_DETR_D2_ROUTE:-auto}" != "pypi-repack" ] && \
   $PY -c "import urllib.request; urllib.request.urlopen('https://github.com', timeout=5)" 2>/dev/null; then
  if $PY -m pip install --no-build-isolation \
      "git+https://github.com/facebookresearch/detectron2.git@${D2_COMMIT}"; then
    record "official (github.com/facebookresearch/detectron2@${D2_COMMIT})"
    exit 0
  fi
  echo "official detectron2 build failed; falling back to the PyPI repack" >&2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "sal-detectron2==${SAL_VERSION} --hash=sha256:${SAL_SHA256}" > "$WORK/req.txt"
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.10 --require-hashes \
    -r "$WORK/req.txt" -d "$WORK/dl"
$PY -m wheel unpack -d "$WORK/u" "$WORK"/dl/sal_detectron2-${SAL_VERSION}-cp310-none-any.whl
D="$WORK/u/sal_detectron2-${SAL_VERSION}"
DI="$D/sal_detectron2-${SAL_VERSION}.dist-info"
rm -f "$D"/detectron2/_C.*.so                 # built for CPython 3.10 / another torch: unusable
rm -rf "$D/tools"                             # upstream's tools/ scripts, shipped as a top-level package
sed -i '/^tools$/d' "$DI/top_level.txt"
sed -i 's/^Root-Is-Purelib: false/Root-Is-Purelib: true/; s/^Tag: .*/Tag: py3-none-any/' "$DI/WHEEL"
sed -i '/^Requires-Dist: numpy<2$/d' "$DI/METADATA"  # the code is numpy-2 clean
# setuptools >= 81 has no pkg_resources; model_zoo only used it to locate its bundled configs.
MZ="$D/detectron2/model_zoo/model_zoo.py"
sed -i 's/^import pkg_resources$/def _resource_filename(_pkg, _rel):\n    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _rel)/; s/pkg_resources\.resource_filename(/_resource_filename(/' "$MZ"
if grep -q pkg_resources "$MZ"; then echo "pkg_resources patch of $MZ failed" >&2; exit 1; fi
mkdir -p "$WORK/out"
$PY -m wheel pack -d "$WORK/out" "$D"
$PY -m pip install --no-deps --force-reinstall "$WORK"/out/sal_detectron2-${SAL_VERSION}-py3-none-any.whl
$PY -c "import detectron2"
record "pypi-repack (sal-detectron2==${SAL_VERSION}, sha256 ${SAL_SHA256})"
