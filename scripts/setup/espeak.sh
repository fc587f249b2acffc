#!/usr/bin/env bash
# Idempotent set-up for the audio-classification family (and the nnAudio technique's tests/bench):
#  1. Debian's espeak-ng (speech synthesizer for the spoken-word clips): apt-get install when missing.
#  2. The speech and sounds that ship in PyPI packages (pyannote-audio wheel, pysptk sdist, pygame
#     wheel): `pip download --no-deps` (never installed) and unpacked into ~/.cache/effrun/audio/wheels
#     ($EFFRUN_CACHE/audio/wheels). Skipped when already there.
# Usage: scripts/setup/espeak.sh        (from the repository root or anywhere)
set -euo pipefail
cd "$(dirname "$0")/../.."
if command -v espeak-ng >/dev/null 2>&1; then
    echo "espeak-ng: already installed ($(espeak-ng --version | head -1))"
else
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    echo "espeak-ng: installing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y --no-install-recommends espeak-ng; then
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends espeak-ng
    fi
    espeak-ng --version | head -1
fi
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" $PY - <<'PYEOF'
from effrun.families.audio_classification.data import fetch_wheel_audio
d = fetch_wheel_audio()
print(f"wheel audio: {len(list(d.glob('*')))} files in {d}")
PYEOF
