"""Consent registry sync: the HTTP poll (contract §5), the MQTT push (§4), app tokens (§6).

    RegistryUpdater.apply_records(records, source)  grants and withdrawals, from either path
    RegistryUpdater.on_push(payload)                the MQTT callback (on the event loop)
    RegistryUpdater.apply_evidence(evidence)        a verified app token (the hot path)
    ConsentSync(...).run()                          the poller, a task in the daemon's group

The poll fetches a full snapshot first (no cursor), then deltas with ``?since=<cursor>``;
the cursor is stored in the buffer's ``meta`` table after the records it covers, so the
registry and the cursor survive restarts together (a crash in between re-fetches a delta,
which is idempotent).  A push is applied at once and never moves the cursor: the next
poll repairs anything a push missed.

    200          apply (reset: the snapshot replaces the registry's sync records), save cursor
    410          the cursor is too old: drop it and fetch a snapshot at once
    401 / 403    keep the registry, log an error every time, retry with backoff
    5xx, 429,
    timeout      retry with exponential backoff and full jitter
    other        a protocol error, retried with backoff

Errors (mapped once from httpx here; nothing classifies by message text):

    GatewayError
    └── SyncError             one poll failed; the loop retries with backoff
        ├── SyncAuthError     401/403, or the token file is missing or empty
        ├── SyncUnavailable   timeout, connection or TLS failure, 5xx, 429
        ├── SyncProtocolError a body that breaks contract §5, or an unexpected status
        └── CursorExpired     410: fetch a snapshot next (no backoff)
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.backoff import Backoff
from gateway.buffer.consent_store import ConsentStore
from gateway.buffer.outbox import Outbox
from gateway.config.sections import ConsentSyncConfig
from gateway.consent.erasure import Eraser
from gateway.consent.policy import ConsentPolicy
from gateway.consent.registry import ConsentRegistry, parse_records
from gateway.errors import (
    ConfigError,
    CursorExpired,
    SyncAuthError,
    SyncError,
    SyncProtocolError,
    SyncUnavailable,
)
from gateway.observe.metrics import Metrics
from gateway.ports import ConsentEvidence, Reading

if TYPE_CHECKING:
    # httpx is imported where a poll is made, not when the daemon starts: with the
    # command-line client it loads when click is there, it cost ~50-150 ms of the start
    # to READY, and the first poll runs after READY.
    import httpx

log = logging.getLogger(__name__)

Record = tuple[str, frozenset[str], float | None]
# The registry's cursor is opaque, but it goes back in a URL and into the buffer: bounded
# in length and characters (a 70,000-character cursor made every later request fail).
MAX_CURSOR_CHARS = 512
CURSOR_RE = re.compile(r"[\x21-\x7e]+")
MAX_PUSH_BYTES = 1024 * 1024  # a consent push larger than this is refused unread


@dataclass(frozen=True, slots=True)
class Applied:
    grants: int
    withdrawals: int
    removed: int
    released: int


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("consent: buffer write failed: %s", fut.exception())


class RegistryUpdater:
    """Applies registry records and app-token evidence: memory first, then the buffer.

    ``submit`` receives readings released from hold (the daemon's ``accept``).
    """

    def __init__(
        self,
        registry: ConsentRegistry,
        outbox: Outbox,
        eraser: Eraser,
        metrics: Metrics,
        *,
        policy: ConsentPolicy | None = None,
        submit: Callable[[Reading], object] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.outbox = outbox
        self.store = ConsentStore(outbox)
        self.eraser = eraser
        self.metrics = metrics
        self.policy = policy
        self.submit = submit
        self.now = now
        self._tasks: set[asyncio.Task[Applied]] = set()

    async def apply_records(
        self, records: Sequence[Record], source: str = "sync", *, reset: bool = False
    ) -> Applied:
        """Apply a delta (or, with ``reset``, a snapshot).  A record with no purposes is a
        withdrawal: the subject is erased everywhere before this returns.  The last record
        of a subject wins."""
        now = self.now()
        latest = {r[0]: r for r in records}
        grants = [r for r in latest.values() if r[1]]
        withdrawals = [s for s, purposes, _ in latest.values() if not purposes]
        removed: list[str] = []
        if reset:
            rows, removed = self.registry.replace(grants, source, now)
        else:
            rows = self.registry.apply(grants, source, now)
        written = self.store.save(rows, removed)
        released = self._release([s for s, _, _ in grants], now)
        if withdrawals:
            await self.eraser.erase(withdrawals)  # memory at once, then the files
        await written
        self.metrics.inc("consent_records_total", len(grants), kind="grant")
        self.metrics.inc("consent_records_total", len(withdrawals), kind="withdrawal")
        return Applied(len(grants), len(withdrawals), len(removed), released)

    def _release(self, subjects: list[str], now: float) -> int:
        if self.policy is None or not subjects:
            return 0
        released = self.policy.on_consent(subjects, now)
        if self.submit is not None:
            for reading in released:
                self.submit(reading)
        return len(released)

    def apply_evidence(self, evidence: ConsentEvidence) -> bool:
        """A verified app token seen by a source: record it (unless the subject withdrew
        or the registry holds a live record) and release the subject's held readings."""
        now = self.now()
        row = self.registry.apply_evidence(evidence, now)
        if row is None:
            return False
        fut = self.store.save([row])
        fut.add_done_callback(_log_failure)
        self._release([evidence.subject], now)
        return True

    def on_push(self, payload: bytes) -> None:
        """MQTT ``touchpoint/v1/<store>/consent``: ``{"v":1,"records":[...]}``.  Called on
        the event loop; the records are applied by a task at once."""
        try:
            if len(payload) > MAX_PUSH_BYTES:
                raise ValueError(f"larger than {MAX_PUSH_BYTES} bytes")
            doc = json.loads(payload)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ValueError("not a v1 consent delta")
            records = parse_records(doc)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            self.metrics.inc("consent_push_total", outcome="invalid")
            log.warning("consent push ignored: %s", exc)
            return
        self.metrics.inc("consent_push_total", outcome="ok")
        task = asyncio.get_running_loop().create_task(
            self.apply_records(records, "sync"), name="consent-push"
        )
        self._tasks.add(task)
        task.add_done_callback(self._push_done)

    def _push_done(self, task: asyncio.Task[Applied]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.inc("consent_push_total", outcome="error")
            log.error("consent push not applied: %s", task.exception())

    async def drain(self) -> None:
        """Wait for pushes being applied (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def valid_cursor(value: object) -> bool:
    """An opaque cursor we are willing to send back: 1-512 printable ASCII, no spaces."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_CURSOR_CHARS
        and CURSOR_RE.fullmatch(value) is not None
    )


def usable_cursor(stored: object | None) -> str | None:
    """The stored cursor (``ConsentStore.cursor``), or None (a full snapshot) when there
    is none or it is not one this version would accept (an older version stored anything
    the registry sent)."""
    if stored is None:
        return None
    if not valid_cursor(stored):
        size = len(stored) if isinstance(stored, str | bytes) else 0
        log.warning(
            "consent sync: the stored cursor is not valid (%d characters); ignored, "
            "fetching a full snapshot",
            size,
        )
        return None
    return str(stored)


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SyncAuthError(f"cannot read the token file {path}: {exc}") from None
    if not token:
        raise SyncAuthError(f"the token file {path} is empty")
    return token


def tls_verify(cfg: ConsentSyncConfig) -> ssl.SSLContext | bool:
    """System CAs, or only the configured private CA."""
    if cfg.ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(cfg.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [(str(cfg.ca_file), "consent.sync.ca_file", f"cannot load the CA: {exc}")]
        ) from None


def _transport_error(exc: httpx.TransportError, timeout_s: float) -> SyncUnavailable:
    import httpx  # noqa: PLC0415 - see the imports

    if isinstance(exc, httpx.TimeoutException):
        return SyncUnavailable(f"no answer within {timeout_s:g}s")
    cause: BaseException | None = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return SyncUnavailable(
            f"TLS certificate not trusted ({cause.verify_message}); check consent.sync.ca_file"
        )
    return SyncUnavailable(f"{exc.__class__.__name__}: {exc}")


def parse_response(data: Any) -> tuple[str, bool, list[Record]]:
    """Validate a 200 body (contract §5); raise SyncProtocolError."""
    if not isinstance(data, dict):
        raise SyncProtocolError("the body is not a JSON object")
    cursor, reset = data.get("cursor"), data.get("reset")
    if not isinstance(cursor, str) or not isinstance(reset, bool):
        raise SyncProtocolError("cursor must be a string and reset a boolean")
    if not valid_cursor(cursor):
        raise SyncProtocolError(
            f"the cursor is not 1-{MAX_CURSOR_CHARS} printable ASCII characters "
            f"({len(cursor)} characters): answer refused"
        )
    try:
        return cursor, reset, parse_records(data)
    except ValueError as exc:
        raise SyncProtocolError(str(exc)) from None


class ConsentSync:
    """Polls the registry forever; see the module docstring for what each answer does."""

    def __init__(
        self,
        cfg: ConsentSyncConfig,
        store: str,
        updater: RegistryUpdater,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.url = f"{cfg.base_url.rstrip('/')}/v1/stores/{store}/consent"
        self.updater = updater
        self.outbox = updater.outbox
        self.store = updater.store
        self.metrics = updater.metrics
        self.transport = transport
        self.backoff = Backoff(cfg.backoff.min_s, cfg.backoff.max_s)
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.verify = tls_verify(cfg)
        self.cursor: str | None = None
        self._loaded = False  # the stored cursor is read by the first step
        self.failures = 0
        self.last_ok_at: float | None = None
        self.last_error: str | None = None

    @property
    def rng(self) -> random.Random:
        """The randomness of the poll interval's spread and of the backoff's jitter."""
        return self._rng

    @rng.setter
    def rng(self, rng: random.Random) -> None:
        self._rng = self.backoff.rng = rng

    def client(self) -> httpx.AsyncClient:
        import httpx  # noqa: PLC0415 - see the imports

        return httpx.AsyncClient(
            verify=self.verify,
            timeout=httpx.Timeout(self.cfg.timeout_s),
            transport=self.transport,
            follow_redirects=False,
            headers={"User-Agent": f"touchpoint-gateway/{__version__}"},
        )

    async def run(self) -> None:
        """Poll forever.  Nothing a peer sends ends this task: every failure is counted,
        logged and retried with backoff (only cancellation stops it)."""
        async with self.client() as client:
            while True:
                delay = await self.step(client)
                await self.sleep(delay)

    async def step(self, client: httpx.AsyncClient) -> float:
        """One poll (two after a 410); the delay before the next one.  Never raises
        (except CancelledError): an unexpected error is a failed poll like any other."""
        try:
            if not self._loaded:
                self.cursor = usable_cursor(await self.store.cursor())
                self._loaded = True
            try:
                await self.poll_once(client)
            except CursorExpired:
                await self.poll_once(client)
        except SyncError as exc:
            return self._failed(exc)
        except Exception as exc:  # a bug or a buffer failure: never the end of the daemon
            self._count("error")
            log.exception("consent sync: unexpected error")
            return self._failed(SyncError(f"unexpected {exc.__class__.__name__}: {exc}"))
        self.failures = 0
        self.backoff.reset()
        self.last_error = None
        self.last_ok_at = time.time()
        self.metrics.set("consent_sync_up", 1)
        self.metrics.set("consent_sync_last_ok_at", self.last_ok_at)
        return self.cfg.poll_interval_s * self.rng.uniform(0.9, 1.1)

    def _failed(self, exc: SyncError) -> float:
        self.failures += 1
        self.last_error = str(exc)
        self.metrics.set("consent_sync_up", 0)
        self.metrics.error("consent_sync", str(exc))
        delay = self.backoff.next()
        n = len(self.updater.registry.records)
        if isinstance(exc, SyncAuthError):
            log.error(
                "CONSENT SYNC REFUSED: %s; keeping the last registry (%d subjects); fix the "
                "token in %s; retrying in %.0fs",
                exc,
                n,
                self.cfg.token_file,
                delay,
            )
        else:
            log.warning(
                "consent sync failed (%d in a row): %s; keeping the last registry "
                "(%d subjects); retrying in %.1fs",
                self.failures,
                exc,
                n,
                delay,
            )
        return delay

    async def poll_once(self, client: httpx.AsyncClient) -> Applied:
        token = await asyncio.to_thread(read_token, self.cfg.token_file)
        status, body = await self._fetch(client, token)
        if status == 410:
            self._count("cursor_expired")
            if self.cursor is None:
                raise SyncProtocolError("410 for a request without a cursor")
            log.warning("consent sync: cursor expired (410); fetching a full snapshot")
            self.cursor = None
            await self.store.clear_cursor()
            raise CursorExpired("cursor expired")
        if status in (401, 403):
            self._count("auth")
            raise SyncAuthError(f"HTTP {status} from {self.url}")
        if status >= 500 or status == 429:
            self._count("unavailable")
            raise SyncUnavailable(f"HTTP {status} from {self.url}")
        if status != 200:
            self._count("bad_response")
            raise SyncProtocolError(f"unexpected HTTP {status} from {self.url}")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # not JSON or not UTF-8, or nested absurdly deep
            self._count("bad_response")
            raise SyncProtocolError("the body is not JSON") from None
        try:
            cursor, reset, records = parse_response(data)
        except SyncProtocolError:
            self._count("bad_response")
            raise
        applied = await self.updater.apply_records(records, "sync", reset=reset)
        await self.store.set_cursor(cursor)
        self.cursor = cursor
        self._count("snapshot" if reset else "delta")
        if reset or records:
            log.info(
                "consent %s: %d grant(s), %d withdrawal(s), %d removed; %d subjects",
                "snapshot" if reset else "delta",
                applied.grants,
                applied.withdrawals,
                applied.removed,
                len(self.updater.registry.records),
            )
        return applied

    async def _fetch(self, client: httpx.AsyncClient, token: str) -> tuple[int, bytes | bytearray]:
        import httpx  # noqa: PLC0415 - see the imports

        """One request within ``deadline_s``: (status, body of a 200, else b"").

        The body is streamed and cut at ``max_body_bytes``; a compressed answer is refused
        (identity is asked for) so the cap bounds the memory a body can take."""
        params = {"since": self.cursor} if self.cursor is not None else None
        headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"}
        cap, deadline = self.cfg.max_body_bytes, self.cfg.deadline_s
        try:
            async with asyncio.timeout(deadline):
                async with client.stream("GET", self.url, params=params, headers=headers) as resp:
                    if resp.status_code != 200:
                        return resp.status_code, b""
                    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
                    if encoding not in ("", "identity"):
                        self._count("bad_response")
                        raise SyncProtocolError(
                            f"a {encoding}-encoded answer was refused (identity was asked for)"
                        )
                    announced = resp.headers.get("content-length", "")
                    if announced.isdigit() and int(announced) > cap:
                        self._too_large(int(announced))
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():  # identity: no decoding
                        body += chunk
                        if len(body) > cap:
                            self._too_large(len(body))
                    return 200, body  # json.loads takes it as it is: no copy
        except TimeoutError:
            self._count("deadline")
            raise SyncUnavailable(
                f"no complete answer within consent.sync.deadline_s ({deadline:g}s): cut"
            ) from None
        except httpx.TransportError as exc:
            self._count("unavailable")
            raise _transport_error(exc, self.cfg.timeout_s) from None
        except httpx.HTTPError as exc:  # e.g. a malformed response
            self._count("bad_response")
            raise SyncProtocolError(f"{exc.__class__.__name__}: {exc}") from None

    def _too_large(self, size: int) -> None:
        self._count("too_large")
        raise SyncProtocolError(
            f"the answer is larger than consent.sync.max_body_bytes "
            f"({size} > {self.cfg.max_body_bytes} bytes): cut off and refused"
        )

    def _count(self, outcome: str) -> None:
        self.metrics.inc("consent_sync_polls_total", outcome=outcome)

    def status(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor is not None,
            "failures": self.failures,
            "last_ok_at": self.last_ok_at,
            "last_error": self.last_error,
        }
