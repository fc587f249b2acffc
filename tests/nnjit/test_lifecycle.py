"""effrun starts and stops the browser itself: no process of it is left, the page server stops."""
from __future__ import annotations

import os
import signal
import socket
import urllib.request

import psutil
import pytest

from effrun.errors import UserError
from effrun.techniques.nnjit import browser as br
from effrun.techniques.nnjit.harness import BrowserSession

from .conftest import needs_browser


def _ours(group: int, marker: str):
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == group or os.getsid(p.pid) == group or marker in " ".join(p.cmdline()):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    return out


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


@needs_browser
def test_start_stop_leaves_nothing():
    s = BrowserSession().start()
    group, root, port = s.browser.proc.pid, s.browser.root, s.server.port
    running = _ours(group, root)
    assert len(running) >= 3                              # browser, zygotes, renderer, crashpad...
    assert s.info["wasmSimd"] is True and s.info["crossOriginIsolated"] is True
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as r:
        assert r.status == 200
    devtools = s.browser.devtools_port
    s.stop()
    assert _ours(group, root) == []
    assert not os.path.exists(root)
    assert _refused(port) and _refused(devtools)
    s.stop()                                              # idempotent


@needs_browser
def test_stop_after_browser_crash():
    s = BrowserSession().start()
    group, root = s.browser.proc.pid, s.browser.root
    os.kill(group, signal.SIGKILL)                        # the main browser process dies
    s.stop()
    assert _ours(group, root) == []


@needs_browser
def test_failed_start_cleans_up(monkeypatch):
    monkeypatch.setattr(br.Browser, "_connect", lambda self, profile: (_ for _ in ()).throw(br.BrowserError("boom")))
    b = br.Browser("http://127.0.0.1:9/index.html")
    with pytest.raises(br.BrowserError):
        b.start()
    assert b.proc is None and not os.path.exists(b.root)


def test_no_chromium_says_how_to_install(monkeypatch):
    monkeypatch.setattr(br, "CANDIDATES", ("/nonexistent/chromium", "no-such-chromium-binary"))
    with pytest.raises(UserError) as e:
        br.find_chromium()
    assert "scripts/setup/browser.sh" in e.value.line() and "apt-get install -y chromium" in e.value.line()


OWNER = """
import sys, time
from effrun.techniques.nnjit.harness import BrowserSession
s = BrowserSession().start()
try:    # announce inside the try: a SIGINT that arrives during the print must still reach stop()
    print(s.browser.proc.pid, s.browser.root, flush=True)
    time.sleep(120)
finally:
    s.stop()
"""


def _owner():
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert len(line) == 2, "the owner process did not start the browser"
    return p, int(line[0]), line[1]


def _wait_gone(group, root, timeout=15.0):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end and _ours(group, root):
        time.sleep(0.2)
    return _ours(group, root)


@needs_browser
def test_owner_killed_with_sigkill_takes_the_browser_along():
    p, group, root = _owner()
    assert _ours(group, root)
    p.kill()                                              # no clean-up code runs in the owner
    p.wait(10)
    assert _wait_gone(group, root) == []                  # PR_SET_PDEATHSIG ends the browser
    import shutil
    shutil.rmtree(root, ignore_errors=True)


@needs_browser
def test_owner_interrupted_cleans_up():
    p, group, root = _owner()
    p.send_signal(signal.SIGINT)                          # KeyboardInterrupt -> finally: stop()
    # stop()'s own bound is ~30 s (CDP close 3+3 s, then 5 s each: wait, SIGTERM, SIGKILL, reap);
    # 30 s here timed out once on a busy 2-core box (clean-clone make test, 2026-12-01)
    p.wait(90)
    assert _wait_gone(group, root) == [] and not os.path.exists(root)


def test_stale_roots_are_removed_only_when_unused(tmp_path, monkeypatch):
    import tempfile
    import time
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    old, fresh = tmp_path / (br.ROOT_PREFIX + "old"), tmp_path / (br.ROOT_PREFIX + "fresh")
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert br.remove_stale_roots() == [str(old)]
    assert not old.exists() and fresh.exists()
