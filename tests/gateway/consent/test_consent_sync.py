"""Registry sync against the fake central's consent API over real HTTP, on a real outbox.

Snapshot then deltas with the cursor, 410 -> snapshot, 401/403 keep the registry and back
off, timeouts and 5xx back off with jitter, the cursor and registry survive a restart,
MQTT push deltas apply at once without moving the cursor, app-token evidence.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.buffer.consent_store import CURSOR_KEY, ConsentStore
from gateway.consent.sync import tls_verify
from gateway.errors import ConfigError, SyncAuthError, SyncUnavailable
from gateway.identity.tokens import classify_qr
from gateway.ports import ConsentEvidence, Reading
from simulators.central.consent_api import ConsentAPI
from tests.gateway.consent_helpers import STORE, Clock, Rig, card, opened, poller, polling

A, B, C = "k1:" + "A" * 22, "k1:" + "B" * 22, "k1:" + "C" * 22


def test_snapshot_then_deltas_with_the_cursor(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        async with polling(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            api.grant(STORE, A, ["linking"])
            api.grant(STORE, B, ["analytics", "linking"], expires=rig.clock() + 100)
            api.grant("other-store", C, ["linking"])
            delay = await sync.step(client)
            assert 54 <= delay <= 66  # poll_interval_s 60, +-10 % jitter
            assert set(rig.registry.records) == {A, B}
            assert rig.registry.records[B].expires == rig.clock() + 100
            assert api.requests[-1].since is None
            cursor = await ConsentStore(rig.outbox).cursor()
            assert cursor == sync.cursor and cursor is not None

            api.grant(STORE, C, ["marketing"])
            api.withdraw(STORE, A)
            await sync.step(client)
            assert api.requests[-1].since == cursor and api.requests[-1].records == 2
            assert set(rig.registry.records) == {B, C}
            assert A in rig.registry.withdrawn
            # Nothing changed: an empty delta, the cursor stays usable.
            await sync.step(client)
            assert api.requests[-1].records == 0
            assert rig.metrics.get("consent_sync_polls_total", outcome="delta") == 2

    asyncio.run(run())


def test_expired_record_is_no_consent(tmp_path: Path, api: ConsentAPI, token_file: Path) -> None:
    async def run() -> None:
        clock = Clock()
        async with polling(tmp_path / "b.db", api, token_file, clock) as (rig, sync, client):
            api.clock = clock
            api.grant(STORE, A, ["linking"], expires=clock() + 30)
            await sync.step(client)
            assert rig.accept(card(A, clock()))
            clock.t += 31
            assert not rig.accept(card(A, clock()))
            assert rig.metrics.get("consent_decisions_total", decision="drop", reason="expired")
            api.grant(STORE, A, ["linking"])  # renewed, no expiry
            await sync.step(client)
            assert rig.accept(card(A, clock()))
            api.expire(STORE, A)  # the central ends it by expiry
            await sync.step(client)
            assert not rig.accept(card(A, clock()))

    asyncio.run(run())


def test_410_fetches_a_snapshot_that_replaces_the_registry(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        async with polling(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            api.grant(STORE, A, ["linking"])
            api.grant(STORE, B, ["linking"])
            await sync.step(client)
            old = sync.cursor
            # A record the registry no longer has (the central lost it): a snapshot drops it.
            rig.registry.apply([(C, frozenset({"linking"}), None)], "sync", rig.clock())
            api.expire_cursors()
            api.grant(STORE, B, ["analytics"])
            delay = await sync.step(client)
            assert delay > 50, "a 410 is not backed off: the snapshot follows at once"
            statuses = [(r.since, r.status) for r in api.requests[-2:]]
            assert statuses == [(old, 410), (None, 200)]
            assert set(rig.registry.records) == {A, B}
            assert rig.registry.records[B].purposes == {"analytics"}
            assert sync.cursor != old
            assert await ConsentStore(rig.outbox).cursor() == sync.cursor
            assert rig.metrics.get("consent_sync_polls_total", outcome="cursor_expired") == 1

    asyncio.run(run())


@pytest.mark.parametrize("status", [401, 403])
def test_credentials_refused_keep_the_registry_and_back_off(
    tmp_path: Path,
    api: ConsentAPI,
    token_file: Path,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        async with polling(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            api.grant(STORE, A, ["linking"])
            await sync.step(client)
            api.fail(status, count=3)
            delays = [await sync.step(client) for _ in range(3)]
            assert set(rig.registry.records) == {A}, "the last registry is kept"
            assert rig.accept(card(A, rig.clock()))
            # full jitter under a doubling cap: 1, 2, 4 s
            assert all(0.5 <= d <= cap for d, cap in zip(delays, [1, 2, 4], strict=True))
            assert rig.metrics.get("consent_sync_up") == 0
            assert str(status) in rig.metrics.last_error["consent_sync"]
            loud = [r for r in caplog.records if "CONSENT SYNC REFUSED" in r.getMessage()]
            assert len(loud) == 3 and all(r.levelno == logging.ERROR for r in loud)
            await sync.step(client)
            assert rig.metrics.get("consent_sync_up") == 1 and sync.failures == 0

    asyncio.run(run())


def test_wrong_or_missing_token_is_an_auth_error(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        async with polling(tmp_path / "b.db", api, token_file) as (_rig, sync, client):
            token_file.write_text("wrong\n", encoding="utf-8")
            with pytest.raises(SyncAuthError, match="401"):
                await sync.poll_once(client)
            token_file.unlink()
            with pytest.raises(SyncAuthError, match="token file"):
                await sync.poll_once(client)
            token_file.write_text("s3cret", encoding="utf-8")  # rotated: re-read each poll
            await sync.poll_once(client)
            assert [r.authorized for r in api.requests] == [False, True]

    asyncio.run(run())


def test_outage_timeouts_and_5xx_back_off_then_recover(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        async with opened(tmp_path / "b.db") as rig:
            api.grant(STORE, A, ["linking"])
            sync = poller(rig, api, token_file, timeout_s=0.3)
            async with sync.client() as client:
                api.fail(503, count=2)
                with pytest.raises(SyncUnavailable, match="503"):
                    await sync.poll_once(client)
                assert 0.5 <= await sync.step(client) <= 1  # first step failure: cap min_s
                api.delay(1.0)
                with pytest.raises(SyncUnavailable, match=r"no answer within 0\.3s"):
                    await sync.poll_once(client)
                await sync.step(client)
                assert set(rig.registry.records) == {A} and sync.failures == 0
            api.stop()  # the central is down: connection refused
            async with sync.client() as client:
                with pytest.raises(SyncUnavailable, match="ConnectError"):
                    await sync.poll_once(client)
                assert set(rig.registry.records) == {A}

    asyncio.run(run())


class Stop(Exception):
    pass


def test_run_survives_a_restart_with_registry_and_cursor(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    """The poller's own loop; after a restart it resumes with the stored cursor."""

    async def run_for(rig: Rig, steps: int) -> list[float]:
        sync = poller(rig, api, token_file)
        delays: list[float] = []

        async def sleep(d: float) -> None:
            delays.append(d)
            if len(delays) >= steps:
                raise Stop

        sync.sleep = sleep
        with pytest.raises(Stop):
            await sync.run()
        return delays

    async def run() -> None:
        api.grant(STORE, A, ["linking"])
        api.grant(STORE, B, ["linking"])
        async with opened(tmp_path / "b.db") as rig:
            api.fail(500)
            delays = await run_for(rig, 2)
            assert delays[0] < 2 and delays[1] > 50

        api.withdraw(STORE, B)
        async with opened(tmp_path / "b.db") as rig:
            assert set(rig.registry.records) == {A, B}, "the registry survived the restart"
            await run_for(rig, 1)
            assert api.requests[-1].since is not None, "the cursor survived the restart"
            assert set(rig.registry.records) == {A}

        async with opened(tmp_path / "b.db") as rig:
            assert B in rig.registry.withdrawn, "the tombstone is rebuilt from the erasure log"

    asyncio.run(run())


def test_push_applies_at_once_and_never_moves_the_cursor(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        async with polling(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            await sync.step(client)
            cursor = sync.cursor
            records = [{"subject": A, "purposes": ["linking"], "expires": None}]
            rig.updater.on_push(json.dumps({"v": 1, "records": records}).encode())
            await rig.updater.drain()
            assert rig.accept(card(A, rig.clock()))
            assert sync.cursor == cursor and await ConsentStore(rig.outbox).cursor() == cursor
            for bad in (b"{", b'{"v":2,"records":[]}', b'{"v":1,"records":[{"subject":1}]}'):
                rig.updater.on_push(bad)
            assert rig.metrics.get("consent_push_total", outcome="invalid") == 3
            # The central never heard of A: the next poll's delta does not remove it, a
            # snapshot does (the registry is the authority).
            await sync.step(client)
            assert A in rig.registry.records
            api.expire_cursors()
            await sync.step(client)
            assert A not in rig.registry.records
            withdraw = [{"subject": B, "purposes": [], "expires": None}]
            rig.updater.on_push(json.dumps({"v": 1, "records": withdraw}).encode())
            await rig.updater.drain()
            assert B in rig.registry.withdrawn

    asyncio.run(run())


def test_app_token_is_consent_evidence(
    tmp_path: Path, vectors: dict[str, Any], keyring: Any
) -> None:
    """A valid token (contract vectors) is consent for app:<sub>, source token, for the
    configured time; a live registry record wins; a withdrawal always wins."""
    from gateway.identity.tokens import load_public_key

    async def run() -> None:
        tok = vectors["app_tokens"][0]
        claims = json.loads(base64.urlsafe_b64decode(tok["token"].split(".")[1] + "==").decode())
        clock = Clock(float(claims["iat"]))
        async with opened(tmp_path / "b.db", clock, policy_name="hold") as rig:
            key = load_public_key(base64.b64decode(vectors["app_token_public_key_base64"]))
            qr = classify_qr(
                tok["token"].encode(),
                keyring=keyring,
                app_public_key=key,
                receipt_prefixes=[],
                now=clock(),
                replay=None,
                evidence_ttl_s=7 * 24 * 3600,
            )
            assert qr.evidence is not None and qr.subject is not None
            subject = qr.subject
            assert subject == tok["subject_pseudonym"]
            assert claims["purposes"] == ["analytics", "linking"]
            # Seen before the token: held, then released by the token's evidence.
            assert not rig.accept(card(subject, clock() - 5))
            scan = Reading(
                "qr.scan", "kiosk", clock(), subject, {"zone": "k", "kind": "app"}, qr.evidence
            )
            assert rig.accept(scan)
            rec = rig.registry.records[subject]
            assert rec.source == "token" and rec.purposes == {"analytics", "linking"}
            assert rec.expires == clock() + 3600, "the configured ttl caps the driver's"
            assert [r.type for r in rig.accepted] == ["card.read", "qr.scan"]
            await rig.outbox._submit_read(lambda c: None)
            assert [e["subject"] for e in rig.events()] == [subject, subject]
            # After the ttl, token consent has expired.
            clock.t += 3601
            assert not rig.registry.allows("qr.scan", subject, clock())
            # A live registry record wins over a token.
            rig.registry.apply([(subject, frozenset({"analytics"}), None)], "sync", clock())
            assert not rig.updater.apply_evidence(ConsentEvidence(subject, ("linking",), 1e12))
            assert rig.registry.records[subject].source == "sync"
            # A withdrawal always wins, until the registry grants again.
            await rig.eraser.erase([subject])
            assert not rig.updater.apply_evidence(ConsentEvidence(subject, ("linking",), 1e12))
            assert subject not in rig.registry.records
            assert rig.metrics.get("consent_evidence_total", outcome="withdrawn") == 1
            await rig.updater.apply_records([(subject, frozenset({"linking"}), None)])
            assert subject not in rig.registry.withdrawn
            assert rig.updater.apply_evidence(ConsentEvidence(subject, ("linking",), 1e12)) is False

        async with opened(tmp_path / "b.db", clock) as rig:
            assert rig.registry.records[subject].source == "sync"

    asyncio.run(run())


def test_tls_private_ca(tmp_path: Path) -> None:
    from gateway.config.sections import ConsentSyncConfig

    cfg = ConsentSyncConfig(base_url="https://c.example", token_file=tmp_path / "t")
    assert tls_verify(cfg) is True
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"consent\.sync\.ca_file"):
        tls_verify(cfg.model_copy(update={"ca_file": bad}))


def test_cursor_key_is_in_meta(tmp_path: Path) -> None:
    assert CURSOR_KEY == "consent_cursor"
    assert httpx.codes.GONE == 410


def test_https_with_a_private_ca(tmp_path: Path, token_file: Path) -> None:
    """The real handshake: trusted through consent.sync.ca_file, refused without it."""
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")

    async def run(server: ConsentAPI) -> None:
        async with opened(tmp_path / "b.db") as rig:
            server.grant(STORE, A, ["linking"])
            untrusted = poller(rig, server, token_file)
            async with untrusted.client() as client:
                delay = await untrusted.step(client)
            assert A not in rig.registry.records and delay > 0
            assert rig.metrics.get("consent_sync_polls_total", outcome="unavailable") == 1
            trusted = poller(rig, server, token_file, ca_file=pki["ca"])
            async with trusted.client() as client:
                await trusted.step(client)
            assert A in rig.registry.records

    with ConsentAPI(token="s3cret", tls=(pki["server"], pki["server_key"])) as server:
        assert server.base_url.startswith("https://")
        asyncio.run(run(server))
