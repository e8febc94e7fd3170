"""The daemon's local control API: a tiny HTTP/1.1 + JSON server on loopback, and its client.

Theory of operation. ``fi-peer run`` listens on 127.0.0.1 (never another
interface: there is no TLS) and writes ``<state_dir>/control.json`` (mode
0600) with the URL and a random bearer token; ``fi-peer query/peers/status``
read that file and call the API. Every request must carry
``Authorization: Bearer <token>``; the token is compared in constant time.

Endpoints (all JSON):

``GET /v1/status``   who this peer is, transport, model, counters, privacy budget
                     left (global and per querier), earnings and pending settlements
``GET /v1/peers``    the membership table (peers heard from, not yet expired)
``POST /v1/query``   ``{"input": [...] | [[...], ...], "rule"?, "k"?, "timeout_s"?,
                     "max_price_wei"?, "input_private"?, "audit_label"? |
                     "audit_labels"?}`` -> the collective answer(s)
                     (``input_private``: the HE mode, fi_peer.he_runtime;
                     ``audit_label(s)``: labels the querier knows, one per row or
                     null: audit queries, opened and scored after the answer)
``GET /metrics``     Prometheus text format (``fi_peer.metrics``); the one endpoint
                     that may be served without the token (``[control] public_metrics``)

One request per connection (``Connection: close``), bounded header and body
sizes, and a read deadline, so a stuck client costs one task for a few
seconds at most. Errors are ``{"error": "<one line>"}`` with a 4xx/5xx
status; an unexpected exception is logged with its traceback and answered
500 without details. The server knows nothing of the daemon: it calls an
object with the :class:`ControlHandler` methods.

The client (:class:`ControlClient`) is synchronous (urllib), for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import urllib.error
import urllib.request
from collections.abc import Awaitable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from fi_peer.errors import FiPeerError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
READ_TIMEOUT_S = 10.0
CONTROL_FILE_VERSION = 1
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Json = dict[str, Any]


class ControlError(FiPeerError):
    """The control API could not be reached or refused a request."""


class RequestError(Exception):
    """A handler's way to answer with a 4xx status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControlHandler(Protocol):
    """What the server calls; ``status`` may be a coroutine function (chain reads),
    and a handler with a ``metrics() -> str`` method also serves ``GET /metrics``."""

    def status(self) -> Json | Awaitable[Json]: ...

    def peers(self) -> Json: ...

    async def query(self, request: Json) -> Json: ...


@dataclass(frozen=True, slots=True)
class ControlInfo:
    """What ``control.json`` holds."""

    url: str
    token: str
    pid: int
    peer_id: str

    def to_json(self) -> Json:
        return {
            "version": CONTROL_FILE_VERSION,
            "url": self.url,
            "token": self.token,
            "pid": self.pid,
            "peer_id": self.peer_id,
        }


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_control_file(path: Path, info: ControlInfo) -> None:
    """Atomically write ``info`` with mode 0600 (the token is a secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".control-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(info.to_json(), fh)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_control_file(path: Path) -> ControlInfo:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ControlError(
            f"no daemon control file at {path}: is `fi-peer run` running for this state dir?"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"cannot read {path}: {exc}") from exc
    try:
        if doc["version"] != CONTROL_FILE_VERSION:
            raise ControlError(f"{path}: unsupported control file version {doc['version']!r}")
        return ControlInfo(
            url=str(doc["url"]),
            token=str(doc["token"]),
            pid=int(doc["pid"]),
            peer_id=str(doc["peer_id"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ControlError(f"{path} is not a control file") from exc


def remove_control_file(path: Path, pid: int) -> None:
    """Remove ``path`` if it still belongs to process ``pid``."""
    with contextlib.suppress(ControlError, OSError):
        if read_control_file(path).pid == pid:
            path.unlink()


# -- server --------------------------------------------------------------------------------


class ControlServer:
    """Serves a :class:`ControlHandler` on ``host:port`` (port 0: any free one)."""

    def __init__(
        self,
        handler: ControlHandler,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        public_metrics: bool = False,
    ):
        self._handler = handler
        self._token = token.encode()
        self._public_metrics = public_metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as exc:
            raise ControlError(
                f"cannot listen for the control API on {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            status, body = await self._respond(reader)
            if isinstance(body, str):
                payload, content_type = body.encode(), METRICS_CONTENT_TYPE
            else:
                payload = json.dumps(body, separators=(",", ":")).encode()
                content_type = "application/json"
            reason = HTTPStatus(status).phrase
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + payload)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, Json | str]:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                method, path, headers = await _read_head(reader)
                length = int(headers.get("content-length", "0") or 0)
                if not 0 <= length <= MAX_BODY_BYTES:
                    raise RequestError(413, f"body over {MAX_BODY_BYTES} bytes")
                raw = await reader.readexactly(length) if length else b""
        except RequestError as exc:
            return exc.status, {"error": str(exc)}
        except ValueError:
            return 400, {"error": "malformed request"}
        public = self._public_metrics and method == "GET" and path.split("?")[0] == "/metrics"
        if not public and not self._authorized(headers.get("authorization", "")):
            return 401, {"error": "missing or wrong bearer token (see control.json)"}
        try:
            return 200, await self._route(method, path, raw)
        except RequestError as exc:
            return exc.status, {"error": str(exc)}
        except FiPeerError as exc:
            return 400, {"error": str(exc)}
        except Exception:
            log.exception("control API: internal error on %s %s", method, path)
            return 500, {"error": "internal error; see the daemon's log"}

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._token
        )

    async def _route(self, method: str, path: str, raw: bytes) -> Json | str:
        path = path.split("?", 1)[0]
        if path == "/v1/status" and method == "GET":
            status = self._handler.status()
            return status if isinstance(status, dict) else await status
        metrics = getattr(self._handler, "metrics", None)
        if path == "/metrics" and method == "GET" and callable(metrics):
            text = metrics()
            if not isinstance(text, str):
                raise TypeError("metrics() must return the exposition text")
            return text
        if path == "/v1/peers" and method == "GET":
            return self._handler.peers()
        if path == "/v1/query" and method == "POST":
            try:
                request = json.loads(raw or b"{}")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RequestError(400, f"body is not JSON: {exc}") from exc
            if not isinstance(request, dict):
                raise RequestError(400, "body must be a JSON object")
            return await self._handler.query(request)
        known = ("/v1/status", "/v1/peers", "/v1/query", "/metrics")
        if path in known and (path != "/metrics" or method != "GET"):
            raise RequestError(405, f"{method} is not allowed on {path}")
        raise RequestError(404, f"no endpoint {path}")


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise RequestError(431, "request head too large") from exc
    if len(head) > MAX_HEADER_BYTES:
        raise RequestError(431, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise RequestError(400, "not an HTTP/1.x request")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise RequestError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0].upper(), parts[1], headers


# -- client --------------------------------------------------------------------------------


class ControlClient:
    """Synchronous client of a running daemon's control API."""

    def __init__(self, info: ControlInfo) -> None:
        self.info = info

    @classmethod
    def from_state_dir(cls, control_file: Path) -> ControlClient:
        return cls(read_control_file(control_file))

    def get(self, path: str, *, timeout: float = 10.0) -> Json:
        return self._call("GET", path, None, timeout)

    def get_text(self, path: str, *, timeout: float = 10.0) -> str:
        """GET a plain-text endpoint (``/metrics``)."""
        raw = self._request("GET", path, None, timeout)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ControlError(f"the daemon sent undecodable text: {exc}") from exc

    def post(self, path: str, body: Json, *, timeout: float) -> Json:
        return self._call("POST", path, json.dumps(body).encode(), timeout)

    def _call(self, method: str, path: str, data: bytes | None, timeout: float) -> Json:
        raw = self._request(method, path, data, timeout)
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ControlError(f"the daemon sent a non-JSON answer: {exc}") from exc
        if not isinstance(doc, dict):
            raise ControlError("the daemon sent an unexpected answer")
        return doc

    def _request(self, method: str, path: str, data: bytes | None, timeout: float) -> bytes:
        request = urllib.request.Request(
            self.info.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.info.token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ControlError(_error_text(exc)) from exc
        except urllib.error.URLError as exc:
            raise ControlError(
                f"no answer from the daemon at {self.info.url} ({exc.reason}); is it running?"
            ) from exc
        except TimeoutError as exc:
            raise ControlError(
                f"the daemon at {self.info.url} did not answer in {timeout:.0f} s"
            ) from exc
        except OSError as exc:
            raise ControlError(f"cannot talk to the daemon at {self.info.url}: {exc}") from exc
        return raw


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        doc = json.loads(exc.read())
        message = str(doc.get("error", "")) if isinstance(doc, dict) else ""
    except Exception:
        message = ""
    return f"daemon refused the request ({exc.code}): {message or exc.reason}"
