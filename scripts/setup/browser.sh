#!/usr/bin/env bash
# browser.sh: what nn-JIT.web (effrun's `nnjit` technique) needs, installed idempotently.
#   - Debian's `chromium` (headless; Wasm SIMD, SwiftShader WebGPU) and `wabt` (wat2wasm)
#   - onnxruntime-web (npm, pinned) into ~/.cache/effrun/npm/ (the wasm baseline)
# A second call with everything present does nothing and exits 0 quickly.
#   NNJIT_NPM_DIR=/path   where onnxruntime-web goes (default ~/.cache/effrun/npm)
#   NNJIT_NO_INSTALL=1    never install (exit 1 naming what is missing)
set -euo pipefail
ORT_VERSION=1.30.0
NPM_DIR=${NNJIT_NPM_DIR:-$HOME/.cache/effrun/npm}
die() { echo "browser.sh: $*" >&2; exit 1; }
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v wat2wasm >/dev/null 2>&1 || missing="$missing wabt"
if [ -n "$missing" ]; then
  [ "${NNJIT_NO_INSTALL:-0}" = 1 ] && die "missing:$missing and NNJIT_NO_INSTALL=1"
  command -v apt-get >/dev/null || die "missing:$missing and no apt-get"
  [ "$(id -u)" = 0 ] || die "missing:$missing; apt-get install needs root"
  echo "browser.sh: apt-get install$missing" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=900 --no-install-recommends $missing >/dev/null 2>&1; then
    apt-get update -qq -o DPkg::Lock::Timeout=900 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=900 --no-install-recommends $missing >/dev/null \
      || die "apt-get install$missing failed"
  fi
fi
ORT_PKG="$NPM_DIR/node_modules/onnxruntime-web/package.json"
have_ort() { [ -s "$ORT_PKG" ] && grep -q "\"version\": \"$ORT_VERSION\"" "$ORT_PKG"; }
if ! have_ort; then
  [ "${NNJIT_NO_INSTALL:-0}" = 1 ] && die "onnxruntime-web@$ORT_VERSION missing in $NPM_DIR and NNJIT_NO_INSTALL=1"
  command -v npm >/dev/null || die "npm missing (apt-get install -y npm)"
  mkdir -p "$NPM_DIR"
  echo "browser.sh: npm install onnxruntime-web@$ORT_VERSION -> $NPM_DIR" >&2
  npm install --prefix "$NPM_DIR" --no-audit --no-fund --ignore-scripts --loglevel=error \
    "onnxruntime-web@$ORT_VERSION" >/dev/null || die "npm install onnxruntime-web@$ORT_VERSION failed"
  have_ort || die "onnxruntime-web@$ORT_VERSION not found after npm install"
fi
echo "browser.sh: ok (chromium $(chromium --version 2>/dev/null | awk '{print $2}'), wat2wasm $(wat2wasm --version), onnxruntime-web $ORT_VERSION)"
