#!/usr/bin/env bash
# Idempotent: install Debian's espeak-ng (speech synthesizer used by the
# audio-classification family to generate spoken-word clips) when missing.
set -euo pipefail
if command -v espeak-ng >/dev/null 2>&1; then
    echo "espeak-ng: already installed ($(espeak-ng --version | head -1))"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "espeak-ng: installing with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends espeak-ng; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends espeak-ng
fi
espeak-ng --version | head -1
