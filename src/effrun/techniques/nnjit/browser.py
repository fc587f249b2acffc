"""Headless Chromium started and stopped by effrun, driven over the DevTools protocol.

- Debian's chromium binary (`/usr/lib/chromium/chromium`, not the /usr/bin shell wrapper, which
  sources API keys and extension flags), flags that keep it off the network, a fresh profile and a
  fresh HOME under one temporary root, its own session / process group.
- The page is opened from the local PageServer (127.0.0.1 only).
- `evaluate(expr)` runs `Runtime.evaluate` (awaitPromise, returnByValue) on the page target over
  a websocket (PyPI `websocket-client`).
- `stop()` closes the browser over CDP, then ends whatever is left of its process group by id and
  the crashpad handlers (they double-fork out of the group; they are found by the temporary root
  in their command line, which no other process has), then removes the temporary root.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

from effrun.errors import UserError

from .codegen import SETUP_HINT

QUIET_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-crash-reporter", "--disable-breakpad", "--disable-default-apps", "--disable-extensions",
    "--disable-domain-reliability", "--no-default-browser-check", "--no-pings", "--mute-audio",
    "--metrics-recording-only", "--disable-features=MediaRouter,OptimizationHints,Translate",
    "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
)
# V8 runs with its default tiering: a fresh module's functions start as Liftoff (baseline) code,
# 3-6x slower here, and hot ones are recompiled by TurboFan in the background. The harness
# therefore never judges a kernel by its first call (see web/nnjit.js `time`). Forcing TurboFan
# (--js-flags=--no-liftoff) would also compile onnxruntime-web's whole start-up path with TurboFan
# (session creation 0.5 s -> 25 s on the loaded machine), so it is not used.
ENGINE_FLAGS: tuple = ()
WEBGPU_FLAGS = ("--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-webgpu-adapter=swiftshader")
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")


class BrowserError(RuntimeError):
    pass


def find_chromium(explicit: str = "") -> str:
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise UserError(f"chromium binary {explicit!r} not found; {SETUP_HINT}", key="technique.chromium")
    for c in CANDIDATES:
        p = c if os.path.isabs(c) else shutil.which(c)
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise UserError(f"Chromium is not installed; {SETUP_HINT}", key="hardware")


def _proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _proc_ids(pid: int):
    """(pgid, sid) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        if fields[0] == "Z":
            return None
        return int(fields[2]), int(fields[3])
    except (OSError, ValueError, IndexError):
        return None


def processes_of(group: int, marker: str) -> List[int]:
    """Live processes in process group / session `group`, or whose command line has `marker`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        ids = _proc_ids(pid)
        if ids is None:
            continue
        if group in ids or (marker and marker in _proc_cmdline(pid)):
            out.append(pid)
    return out


ROOT_PREFIX = "effrun-nnjit-chromium-"


def remove_stale_roots(min_age_s: float = 120.0) -> List[str]:
    """Temporary roots left by an effrun that was killed (its browser died with it, the directory
    stayed): removed when older than `min_age_s` and no live process names them."""
    import glob
    removed = []
    live = " ".join(_proc_cmdline(int(d)) for d in os.listdir("/proc") if d.isdigit())
    for d in glob.glob(os.path.join(tempfile.gettempdir(), ROOT_PREFIX + "*")):
        try:
            if time.time() - os.path.getmtime(d) > min_age_s and d not in live:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        except OSError:
            pass
    return removed


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the effrun process dies (Linux PR_SET_PDEATHSIG), so
    a killed effrun does not leave the browser running; crashpad handlers end with their client."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG = 1
    except Exception:
        pass


class _CDP:
    def __init__(self, ws_url: str, timeout: float):
        import websocket  # PyPI websocket-client
        self._ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True,
                                               enable_multithread=True)
        self._id = 0
        self.events: List[Dict[str, Any]] = []

    def call(self, method: str, params: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
        self._id += 1
        mid = self._id
        self._ws.settimeout(timeout)
        self._ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)
            del self.events[:-200]

    def close(self) -> None:
        try:
            self._ws.close()
        except Exception:
            pass


class Browser:
    """with Browser(url) as b: b.evaluate("1+1")"""

    def __init__(self, url: str, chromium: str = "", webgpu: bool = True, start_timeout: float = 60.0,
                 log=None):
        self.exe = find_chromium(chromium)
        self.url = url
        self.webgpu = webgpu
        self.start_timeout = start_timeout
        self.log = log or (lambda msg: None)
        self.root: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.page: Optional[_CDP] = None
        self.devtools_port: Optional[int] = None
        self._browser_ws: Optional[str] = None

    # ---- lifecycle
    def start(self) -> "Browser":
        remove_stale_roots()
        self.root = tempfile.mkdtemp(prefix=ROOT_PREFIX)
        home, profile = os.path.join(self.root, "home"), os.path.join(self.root, "profile")
        os.makedirs(home)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CHROMIUM_FLAGS"))}
        env.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"),
                   XDG_CACHE_HOME=os.path.join(home, ".cache"))
        args = [self.exe, *QUIET_FLAGS, *ENGINE_FLAGS, *(WEBGPU_FLAGS if self.webgpu else ()),
                f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", self.url]
        self.log(f"starting chromium ({os.path.basename(self.exe)}) on {self.url}")
        with open(os.path.join(self.root, "chromium.log"), "wb") as err:
            self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._connect(profile)
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self, profile: str) -> None:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode} at start; log: "
                                   f"{self._log_tail()}")
            if os.path.exists(port_file):
                lines = open(port_file).read().split()
                if len(lines) >= 2:
                    self.devtools_port, self._browser_ws = int(lines[0]), lines[1]
                    break
            time.sleep(0.05)
        else:
            raise BrowserError(f"chromium did not open DevTools within {self.start_timeout:.0f} s")
        target = None
        while time.monotonic() < deadline and target is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.devtools_port}/json/list", timeout=5) as r:
                targets = json.loads(r.read())
            target = next((t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(
                self.url.split("#")[0].rsplit("/", 1)[0])), None)
            if target is None:
                time.sleep(0.1)
        if target is None:
            raise BrowserError("the harness page did not appear among chromium's targets")
        self.page = _CDP(target["webSocketDebuggerUrl"], timeout=self.start_timeout)
        self.page.call("Runtime.enable")
        # wait for the harness to load
        while time.monotonic() < deadline:
            try:
                if self.evaluate("typeof window.NNJIT !== 'undefined' && window.NNJIT.ready === true", timeout=10):
                    return
            except BrowserError:        # no execution context yet (page still navigating)
                pass
            time.sleep(0.05)
        raise BrowserError("the harness page did not load (window.NNJIT.ready never became true)")

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "chromium.log"), "rb") as f:
                return f.read()[-600:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        """Close the browser and end every process it started; idempotent."""
        if self.page is not None:
            self.page.close()
            self.page = None
        if self.proc is not None and self.proc.poll() is None and self._browser_ws:
            try:
                b = _CDP(f"ws://127.0.0.1:{self.devtools_port}{self._browser_ws}", timeout=3)
                try:
                    b.call("Browser.close", timeout=3)
                except Exception:
                    pass
                b.close()
            except Exception:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            group = self.proc.pid
            self._end(group, signal.SIGTERM, grace)
            self._end(group, signal.SIGKILL, grace)
            if self.proc.poll() is None:
                self.proc.wait(timeout=grace)
            self.proc = None
            self._group = group
        for _ in range(20):            # a process that just exited may still have been writing
            if not (self.root and os.path.isdir(self.root)):
                break
            shutil.rmtree(self.root, ignore_errors=True)
            if os.path.isdir(self.root):
                time.sleep(0.1)

    def _end(self, group: int, sig: int, grace: float) -> None:
        marker = self.root or ""
        pids = processes_of(group, marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            if self.proc is not None:
                self.proc.poll()        # reap the direct child
            pids = processes_of(group, marker)
            if pids:
                time.sleep(0.05)

    def leftovers(self, group: int, marker: str) -> List[int]:
        return processes_of(group, marker)

    def __enter__(self) -> "Browser":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- page
    def evaluate(self, expression: str, timeout: float = 120.0) -> Any:
        if self.page is None:
            raise BrowserError("browser is not running")
        res = self.page.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                  "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text")
            raise BrowserError(f"page error: {text}")
        return res.get("result", {}).get("value")

    def call(self, fn: str, *args, timeout: float = 120.0) -> Any:
        """Await window.NNJIT.<fn>(...args) with JSON arguments."""
        return self.evaluate(f"window.NNJIT.{fn}(...{json.dumps(list(args))})", timeout=timeout)
