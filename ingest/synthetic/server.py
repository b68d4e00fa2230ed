"""A threaded HTTP server on 127.0.0.1 that serves a generated web with its planted behaviours."""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import mimetypes
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

# Pages are written with this token where an absolute URL needs the host; the server replaces it
# by its own `http://127.0.0.1:PORT`, known only once it has bound a port.
BASE_PLACEHOLDER = "__WIT_BASE__"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(slots=True)
class Route:
    """How one URL path behaves; paths without a route are plain static files under `site/`."""

    status: int = 200
    file: str | None = None  # served instead of the path's own file (relative to site/)
    location: str | None = None  # for 3xx; may hold BASE_PLACEHOLDER
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    fail_first: int = 0  # the status applies to the first N requests only, then the file is served
    retry_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, 0, 0.0, {}) or k == "status"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        return cls(**data)


def read_routes(web_dir: Path) -> dict[str, Route]:
    path = web_dir / "routes.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {p: Route.from_json(r) for p, r in data["routes"].items()}


def content_type(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return _CONTENT_TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "wit-synthetic/1.0"
    # Idle keep-alive connections would otherwise hold a thread forever.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        try:
            self._dispatch(send_body)
        except (BrokenPipeError, ConnectionResetError):
            # Clients that time out on slow routes hang up mid-response; that is their business.
            self.close_connection = True

    def _dispatch(self, send_body: bool) -> None:
        srv = self.server
        path = unquote(urlsplit(self.path).path) or "/"
        route = srv.routes.get(path)
        if route is not None and route.delay_s:
            time.sleep(route.delay_s * srv.delay_scale)
        if route is not None and route.status != 200 and srv.applies(path, route):
            if 300 <= route.status < 400 and route.location:
                location = srv.substitute(route.location)
                self._send(route.status, b"", "text/plain", send_body, {"Location": location})
                return
            extra = dict(route.headers)
            if route.retry_after is not None:
                extra["Retry-After"] = str(route.retry_after)
            body = f"{route.status} {self.responses.get(route.status, ('',))[0]}\n".encode()
            self._send(route.status, body, "text/plain; charset=utf-8", send_body, extra)
            return
        rel = route.file if route is not None and route.file else path.lstrip("/")
        if rel == "" or rel.endswith("/"):
            rel += "index.html"
        target = srv.resolve(rel)
        if target is None:
            self._send(403, b"403 Forbidden\n", "text/plain; charset=utf-8", send_body)
            return
        if not target.is_file():
            self._send(404, b"404 Not Found\n", "text/plain; charset=utf-8", send_body)
            return
        data = target.read_bytes()
        ctype = content_type(target.name)
        if ctype.startswith("text/html"):
            data = srv.substitute(data.decode("utf-8")).encode("utf-8")
        self._send(200, data, ctype, send_body, dict(route.headers) if route is not None else None)

    def _send(self, status: int, body: bytes, ctype: str, send_body: bool, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a downloader with 64 threads would see dropped
    # connections that look like timeouts.
    request_queue_size = 256
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], site: Path, routes: dict[str, Route], delay_scale: float) -> None:
        super().__init__(addr, _Handler)
        self.site = site.resolve()
        self.routes = routes
        self.delay_scale = delay_scale
        self.base_url = f"http://{self.server_address[0]}:{self.server_address[1]}"
        self._hits: dict[str, int] = {}
        self._hits_lock = threading.Lock()

    def substitute(self, text: str) -> str:
        return text.replace(BASE_PLACEHOLDER, self.base_url)

    def applies(self, path: str, route: Route) -> bool:
        """Whether the route's status applies to this request (always, unless it fails only at first)."""
        if not route.fail_first:
            return True
        with self._hits_lock:
            n = self._hits.get(path, 0)
            self._hits[path] = n + 1
        return n < route.fail_first

    def resolve(self, rel: str) -> Path | None:
        """The file for a site-relative path, or None when the path climbs out of the site."""
        try:
            target = (self.site / rel).resolve()
        except (ValueError, OSError):  # a NUL byte or an over-long name in the request
            return None
        return target if target.is_relative_to(self.site) else None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error while serving %s", client_address, exc_info=True)


class SyntheticWebServer:
    """Serves a web written by `generate_web` on 127.0.0.1 from a daemon thread.

    `delay_scale` multiplies every route delay, so tests can keep `slow` images short.
    Use as a context manager (`with SyntheticWebServer(d) as srv: srv.base_url`) or call
    `start()` and `stop()`.
    """

    def __init__(self, web_dir: str | Path, host: str = "127.0.0.1", port: int = 0, delay_scale: float = 1.0) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the synthetic web binds only a loopback address, not {host!r}")
        if delay_scale < 0:
            raise ValueError("delay_scale must not be negative")
        self.web_dir = Path(web_dir)
        self.site_dir = self.web_dir / "site"
        if not self.site_dir.is_dir():
            raise FileNotFoundError(f"no generated web at {self.web_dir} (missing site/)")
        self.host = host
        self.port = port
        self.delay_scale = delay_scale
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return self._server.base_url

    def url(self, path: str) -> str:
        """The absolute URL of a root-relative path."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def start(self) -> SyntheticWebServer:
        if self._server is not None:
            return self
        routes = read_routes(self.web_dir)
        self._server = _Server((self.host, self.port), self.site_dir, routes, self.delay_scale)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="wit-synthetic-web",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> SyntheticWebServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
