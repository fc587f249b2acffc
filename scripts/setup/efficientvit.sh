#!/usr/bin/env bash
# EfficientViT reference: unpack the timm wheel (no dependencies) into ~/.cache/effrun/timm-<ver>/ so
# the logits cross-check and the benchmark's timm baseline can import timm's efficientvit_msra with a
# torchvision stub (PyPI's torchvision does not import beside torch 2.13.0 CPU). Idempotent.
set -euo pipefail
VER=${TIMM_VERSION:-1.0.31}
CACHE=${EFFRUN_CACHE:-$HOME/.cache/effrun}
DEST="$CACHE/timm-$VER"
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if [ -f "$DEST/timm/models/efficientvit_msra.py" ]; then
  echo "efficientvit setup: timm $VER already in $DEST"; exit 0
fi
mkdir -p "$CACHE/wheels"
WHEEL=$(ls "$CACHE"/wheels/timm-"$VER"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$WHEEL" ]; then
  "$PY" -m pip download --no-deps --only-binary=:all: -d "$CACHE/wheels" "timm==$VER"
  WHEEL=$(ls "$CACHE"/wheels/timm-"$VER"-*.whl | head -1)
fi
TMP="$DEST.tmp.$$"
rm -rf "$TMP"; mkdir -p "$TMP"
"$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHEEL" "$TMP"
rm -rf "$DEST"; mv "$TMP" "$DEST"
echo "efficientvit setup: timm $VER unpacked into $DEST"
