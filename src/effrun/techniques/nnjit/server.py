"""A page server on 127.0.0.1 only, in a thread: the harness page, onnxruntime-web's files, and
binary blobs in both directions (matrices to the page, results back).

Every response carries COOP/COEP headers so the page is cross-origin isolated (finer
performance.now() and SharedArrayBuffer available); nothing is served to other hosts.
"""
from __future__ import annotations

import mimetypes
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional

WEB_DIR = Path(__file__).with_name("web")
MAX_UPLOAD = 1 << 30


class PageServer:
    def __init__(self, ort_dir: Optional[str] = None, web_dir: Path = WEB_DIR):
        self.web_dir = Path(web_dir)
        self.ort_dir = Path(ort_dir) if ort_dir else None
        self.blobs: Dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- blobs
    def put(self, name: str, data: bytes) -> str:
        with self._lock:
            self.blobs[name] = bytes(data)
        return f"/blob/{name}"

    def take(self, name: str) -> bytes:
        with self._lock:
            return self.blobs.pop(name)

    def drop(self, prefix: str = "") -> None:
        with self._lock:
            for k in [k for k in self.blobs if k.startswith(prefix)]:
                del self.blobs[k]

    # -- lifecycle
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PageServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _headers(self, code: int, ctype: str, length: int) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(length))
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()

            def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream") -> None:
                self._headers(code, ctype, len(body))
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path.startswith("/blob/"):
                    with server._lock:
                        data = server.blobs.get(path[len("/blob/"):])
                    if data is None:
                        return self._send(404, b"no such blob", "text/plain")
                    return self._send(200, data)
                if path.startswith("/ort/"):
                    root, rel = server.ort_dir, path[len("/ort/"):]
                else:
                    root, rel = server.web_dir, (path.lstrip("/") or "index.html")
                if root is None:
                    return self._send(404, b"not served", "text/plain")
                f = (root / rel).resolve()
                if not str(f).startswith(str(root.resolve()) + os.sep) or not f.is_file():
                    return self._send(404, b"not found", "text/plain")
                ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                if f.suffix in (".mjs", ".js"):
                    ctype = "text/javascript"
                elif f.suffix == ".wasm":
                    ctype = "application/wasm"
                return self._send(200, f.read_bytes(), ctype)

            def do_POST(self):
                path = self.path.split("?", 1)[0]
                n = int(self.headers.get("Content-Length") or 0)
                if not path.startswith("/blob/") or n > MAX_UPLOAD:
                    return self._send(400, b"bad request", "text/plain")
                data = self.rfile.read(n)
                server.put(path[len("/blob/"):], data)
                return self._send(200, b"ok", "text/plain")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="nnjit-page-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
