"""Fixtures for nn-JIT.web tests: a real headless Chromium (Debian's) and wabt's wat2wasm."""
from __future__ import annotations

import os
import shutil

import pytest

SETUP = "run `bash scripts/setup/browser.sh` (installs chromium, wabt, onnxruntime-web)"


def have_chromium() -> bool:
    from effrun.techniques.nnjit.browser import find_chromium
    try:
        find_chromium()
        return True
    except Exception:
        return False


def have_wat2wasm() -> bool:
    return shutil.which("wat2wasm") is not None


def ort_dir() -> str:
    from effrun.techniques.nnjit.harness import ORT_DIR_DEFAULT
    return ORT_DIR_DEFAULT


needs_wabt = pytest.mark.skipif(not have_wat2wasm(), reason=f"wat2wasm missing: {SETUP}")
needs_browser = pytest.mark.skipif(not (have_chromium() and have_wat2wasm()),
                                   reason=f"chromium or wat2wasm missing: {SETUP}")
needs_ort = pytest.mark.skipif(not os.path.isfile(os.path.join(ort_dir(), "ort.wasm.min.js")),
                               reason=f"onnxruntime-web missing: {SETUP}")


@pytest.fixture(scope="module")
def session():
    if not (have_chromium() and have_wat2wasm()):
        pytest.skip(f"chromium or wat2wasm missing: {SETUP}")
    from effrun.techniques.nnjit.harness import BrowserSession
    s = BrowserSession().start()
    try:
        yield s
    finally:
        s.stop()
