"""The fake central's consent registry over HTTP (contract v1 section 5), for tests and demos.

An independent implementation: it imports nothing from ``gateway`` or ``drivers``.

    api = ConsentAPI(token="s3cret")            # 127.0.0.1, a free port
    api.start()
    api.grant("nl-ams-001", "k1:...", ["analytics"], expires=None)
    api.withdraw("nl-ams-001", "k1:...")        # a record with purposes []
    api.expire_cursors()                        # every cursor handed out so far: 410
    api.fail(401, count=3)                      # the next 3 requests: 401
    api.delay(2.0, count=1)                     # the next request answers 2 s late
    api.hostile("flood", size=100 << 20)        # the next 200: a 100 MB body, streamed
    api.hostile("flood", announce=False)        # ... with no Content-Length: until the close
    api.hostile("trickle", interval_s=1.0)      # the next 200: one byte a second
    api.hostile("body", body=b'{"cursor":...}')  # the next 200: exactly these bytes
    api.sent_bytes                              # body bytes written by hostile answers
    api.base_url                                # http://127.0.0.1:<port>
    api.requests                                # what the gateway asked, and the answers
    api.stop()

``GET /v1/stores/<store>/consent`` without ``since`` answers a snapshot (``reset: true``)
of every subject the store ever had, withdrawals included as ``purposes: []`` (so a
gateway that missed one still erases); with ``since`` it answers the subjects changed
after that cursor, last change per subject.  Cursors are ``<epoch>.<change>``;
``expire_cursors`` starts a new epoch and an older or unreadable cursor gets 410.  A
wrong bearer token gets 401.

``on_change(store, records)`` is called after each change made with ``push=True``: the
central publishes it on MQTT ``touchpoint/v1/<store>/consent``.  A script (JSON or TOML,
``[[steps]]`` with ``at_s`` and ``action``) replays changes on a timer; see ``run_script``.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from simulators.infra.service import Service

log = logging.getLogger(__name__)

Record = dict[str, Any]
PURPOSES = ("analytics", "linking", "marketing")
WHEN_FILE_POLL_S = 0.1  # how often a script step's ``when_file`` is looked for


def rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(at)))


@dataclass(frozen=True)
class Hostile:
    """A broken or hostile 200 answer: ``flood`` (``size`` bytes of a JSON object that
    never ends, streamed, with Content-Length), ``trickle`` (a valid snapshot, one byte
    every ``interval_s``), ``body`` (exactly ``body``)."""

    mode: str
    size: int = 0
    interval_s: float = 1.0
    body: bytes = b""
    announce: bool = True  # send Content-Length; without it the body ends at the close


@dataclass(frozen=True)
class Request:
    store: str
    since: str | None
    authorized: bool
    status: int
    records: int


class ConsentAPI(Service):
    """A scripted consent registry; every method is thread-safe."""

    def __init__(
        self,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.token = token
        self.tls = tls  # (certificate chain PEM, key PEM): serve HTTPS
        self.host, self.port = host, port
        self.clock = clock
        self.on_change: Callable[[str, list[Record]], object] | None = None
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._epoch = 1
        self._change = 0
        # store -> subject -> (change number, record)
        self._records: dict[str, dict[str, tuple[int, Record]]] = {}
        self._failures: list[int] = []  # statuses for the next requests, in order
        self._delays: list[float] = []
        self._hostile: list[Hostile] = []  # answers for the next authorized requests
        self.sent_bytes = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._script: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        api = self

        class Handler(_Handler):
            owner = api

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, name="consent-api", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._script is not None:
            self._script.join()
            self._script = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # -- scripting ---------------------------------------------------------------------

    def _set(self, store: str, records: list[Record], push: bool) -> list[Record]:
        with self._lock:
            table = self._records.setdefault(store, {})
            for record in records:
                self._change += 1
                table[record["subject"]] = (self._change, record)
        if push and self.on_change is not None:
            self.on_change(store, records)
        return records

    def grant(
        self,
        store: str,
        subject: str,
        purposes: Sequence[str],
        *,
        expires: float | None = None,
        push: bool = False,
    ) -> Record:
        bad = set(purposes) - set(PURPOSES)
        if bad or not purposes:
            raise ValueError(f"purposes must be a non-empty subset of {PURPOSES}")
        record = {
            "subject": subject,
            "purposes": sorted(set(purposes)),
            "expires": None if expires is None else rfc3339(expires),
        }
        return self._set(store, [record], push)[0]

    def withdraw(self, store: str, subject: str, *, push: bool = False) -> Record:
        record: Record = {"subject": subject, "purposes": [], "expires": None}
        return self._set(store, [record], push)[0]

    def expire(self, store: str, subject: str, *, at: float | None = None) -> Record:
        """End a subject's consent by expiry (its purposes stay; ``expires`` is now)."""
        with self._lock:
            _, current = self._records[store][subject]
        record = {**current, "expires": rfc3339(self.clock() if at is None else at)}
        return self._set(store, [record], push=False)[0]

    def expire_cursors(self) -> None:
        with self._lock:
            self._epoch += 1

    def fail(self, status: int, count: int = 1) -> None:
        """The next ``count`` requests answer ``status`` (401, 403, 500, 503, ...)."""
        with self._lock:
            self._failures.extend([status] * count)

    def delay(self, seconds: float, count: int = 1) -> None:
        with self._lock:
            self._delays.extend([seconds] * count)

    def hostile(
        self,
        mode: str,
        *,
        count: int = 1,
        size: int = 100 * 1024 * 1024,
        interval_s: float = 1.0,
        body: bytes = b"",
        announce: bool = True,
    ) -> None:
        """The next ``count`` authorized requests get a hostile 200 (see ``Hostile``)."""
        if mode not in ("flood", "trickle", "body"):
            raise ValueError(f"unknown hostile mode {mode!r}")
        with self._lock:
            self._hostile.extend([Hostile(mode, size, interval_s, body, announce)] * count)

    def take_hostile(self, authorized: bool) -> Hostile | None:
        with self._lock:
            if not authorized or not self._hostile or self._failures:
                return None
            return self._hostile.pop(0)

    def count_sent(self, n: int) -> None:
        with self._lock:
            self.sent_bytes += n

    def set_token(self, token: str) -> None:
        with self._lock:
            self.token = token

    def current(self, store: str) -> dict[str, Record]:
        with self._lock:
            return {s: dict(r) for s, (_, r) in self._records.get(store, {}).items()}

    def run_script(self, steps: list[dict[str, Any]], store: str) -> None:
        """Replay steps in a thread: ``{"at_s": 1.5, "action": "grant", "subject": ...,
        "purposes": [...], "expires_in_s": 60, "push": true}``; actions ``grant``,
        ``withdraw``, ``expire``, ``expire_cursors``, ``fail`` (``status``, ``count``),
        ``delay`` (``seconds``, ``count``), ``set_token`` (``token``).

        ``"when_file": PATH``: the step (and the steps after it) also waits, after its
        ``at_s``, until PATH exists: another process (the demo) says when it is time,
        however slow the box is."""
        start = time.monotonic()
        ordered = sorted(steps, key=lambda s: float(s.get("at_s", 0)))

        def run() -> None:
            for step in ordered:
                wait = start + float(step.get("at_s", 0)) - time.monotonic()
                if wait > 0 and self._stopping.wait(wait):
                    return
                when = step.get("when_file")
                while when is not None and not Path(when).exists():
                    if self._stopping.wait(WHEN_FILE_POLL_S):
                        return
                self.apply_step(step, step.get("store", store))

        self._script = threading.Thread(target=run, name="consent-script", daemon=True)
        self._script.start()

    def apply_step(self, step: dict[str, Any], store: str) -> None:
        action = step["action"]
        push = bool(step.get("push", False))
        if action == "grant":
            expires_in = step.get("expires_in_s")
            expires = None if expires_in is None else self.clock() + float(expires_in)
            self.grant(store, step["subject"], step["purposes"], expires=expires, push=push)
        elif action == "withdraw":
            self.withdraw(store, step["subject"], push=push)
        elif action == "expire":
            self.expire(store, step["subject"])
        elif action == "expire_cursors":
            self.expire_cursors()
        elif action == "fail":
            self.fail(int(step["status"]), int(step.get("count", 1)))
        elif action == "delay":
            self.delay(float(step["seconds"]), int(step.get("count", 1)))
        elif action == "set_token":
            self.set_token(str(step["token"]))
        else:
            raise ValueError(f"unknown script action {action!r}")

    # -- answering -----------------------------------------------------------------------

    def answer(
        self, store: str, since: str | None, authorization: str | None
    ) -> tuple[int, Any, float]:
        """(status, JSON body or None, delay in seconds) for one request."""
        with self._lock:
            delay = self._delays.pop(0) if self._delays else 0.0
            authorized = authorization == f"Bearer {self.token}"
            status, body = self._answer(store, since, authorized)
            records = len(body.get("records", ())) if isinstance(body, dict) else 0
            self.requests.append(Request(store, since, authorized, status, records))
        return status, body, delay

    def _answer(self, store: str, since: str | None, authorized: bool) -> tuple[int, Any]:
        if self._failures:
            status = self._failures.pop(0)
            return status, {"error": f"scripted {status}"}
        if not authorized:
            return 401, {"error": "bad bearer token"}
        table = self._records.get(store, {})
        cursor = f"{self._epoch}.{self._change}"
        if since is None:
            records = [r for _, r in sorted(table.values(), key=lambda cr: cr[0])]
            return 200, {"cursor": cursor, "reset": True, "records": records}
        epoch, _, change = since.partition(".")
        if epoch != str(self._epoch) or not change.isdigit():
            return 410, {"error": "cursor expired"}
        after = int(change)
        changed = sorted((c, r) for c, r in table.values() if c > after)
        return 200, {"cursor": cursor, "reset": False, "records": [r for _, r in changed]}


class _Handler(BaseHTTPRequestHandler):
    owner: ConsentAPI
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[:2] != ["v1", "stores"] or parts[3] != "consent":
            self._send(404, {"error": "not found"})
            return
        since = parse_qs(url.query).get("since", [None])[0]
        authorization = self.headers.get("Authorization")
        hostile = self.owner.take_hostile(authorization == f"Bearer {self.owner.token}")
        if hostile is not None:
            self._send_hostile(hostile, parts[2], since, authorization)
            return
        status, body, delay = self.owner.answer(parts[2], since, authorization)
        if delay and self.owner._stopping.wait(delay):
            return
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout): nothing to tell it

    def _send_hostile(
        self, hostile: Hostile, store: str, since: str | None, authorization: str | None
    ) -> None:
        if hostile.mode == "body":
            data = hostile.body
        elif hostile.mode == "trickle":
            _, body, _ = self.owner.answer(store, None, authorization)
            data = json.dumps(body, separators=(",", ":")).encode()
        else:
            data = b""
        size = hostile.size if hostile.mode == "flood" else len(data)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if hostile.announce:
                self.send_header("Content-Length", str(size))
            # Said even when a length is announced: this connection closes after the answer,
            # and a client not told so may reuse it and lose its next request in the race.
            self.send_header("Connection", "close")
            self.end_headers()
            if hostile.mode == "body":
                self.wfile.write(data)
                self.owner.count_sent(len(data))
            elif hostile.mode == "trickle":
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    self.owner.count_sent(1)
                    if self.owner._stopping.wait(hostile.interval_s):
                        return
            else:  # flood: an object whose records never end, never held in memory
                head = b'{"cursor":"1.0","reset":true,"records":['
                self.wfile.write(head)
                self.owner.count_sent(len(head))
                block = b'{"subject":"k1:AAAAAAAAAAAAAAAAAAAAAA","purposes":[],"expires":null},'
                chunk = block * (65536 // len(block))
                sent = len(head)
                while sent < size and not self.owner._stopping.is_set():
                    part = chunk[: size - sent]
                    self.wfile.write(part)
                    sent += len(part)
                    self.owner.count_sent(len(part))
        except OSError:
            pass  # the client cut the answer (its cap or deadline): that is the point
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("consent api: " + format, *args)


def load_script(path: Path) -> list[dict[str, Any]]:
    """Steps from a JSON (``{"steps": [...]}`` or a list) or TOML (``[[steps]]``) file."""
    text = path.read_text(encoding="utf-8")
    data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    steps = data.get("steps", []) if isinstance(data, dict) else data
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ValueError(f"{path}: expected a list of steps")
    return steps
