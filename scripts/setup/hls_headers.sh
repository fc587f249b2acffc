#!/usr/bin/env bash
# Idempotent: the Xilinx HLS C-simulation headers (ap_int.h, ap_fixed.h, hls_stream.h and what
# they include) that ship inside the hls4ml wheel, for InTAR's g++ C simulation
# (src/effrun/techniques/intar/csim.py). The wheel is downloaded, never installed.
#   HLS_HEADERS_DIR   where the headers go   (default ~/.cache/effrun/hls_headers)
#   HLS4ML_VERSION    wheel version          (default 1.3.0, the one checked here)
set -euo pipefail
CACHE="${EFFRUN_CACHE:-$HOME/.cache/effrun}"
DL="$CACHE/downloads"
DEST="${HLS_HEADERS_DIR:-$CACHE/hls_headers}"
VER="${HLS4ML_VERSION:-1.3.0}"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
    echo "hls_headers.sh: ${CXX:-g++} not found; install it (Debian: apt-get install -y g++)" >&2
    exit 1
fi

if [ -f "$DEST/.complete" ] && [ "$(cat "$DEST/.complete")" = "hls4ml-$VER" ]; then
    echo "hls_headers.sh: headers present in $DEST (hls4ml $VER)"
    exit 0
fi

mkdir -p "$DL"
WHL=$(ls "$DL"/hls4ml-"$VER"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHL" ]; then
    echo "hls_headers.sh: downloading hls4ml==$VER wheel (no install) into $DL"
    "$PY" -m pip download --no-deps --only-binary=:all: --progress-bar on "hls4ml==$VER" -d "$DL"
    WHL=$(ls "$DL"/hls4ml-"$VER"-*.whl | head -n1)
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# only the Vivado ap_types headers: ap_*.h, hls_stream.h, hls_math.h, etc/ap_private.h, utils/
"$PY" - "$WHL" "$TMP" <<'PYEOF'
import sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
prefix = "hls4ml/templates/vivado/ap_types/"
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".h")]
    if not any(n.endswith("/ap_int.h") for n in names) or not any(n.endswith("/hls_stream.h") for n in names):
        sys.exit(f"{whl}: no ap_int.h / hls_stream.h under {prefix}")
    for n in names:
        z.extract(n, out)
print(f"extracted {len(names)} headers")
PYEOF
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$TMP/hls4ml/templates/vivado/ap_types" "$DEST"
echo "hls4ml-$VER" > "$DEST/.complete"
echo "hls_headers.sh: headers in $DEST"
