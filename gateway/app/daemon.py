"""The daemon: one event loop, one TaskGroup, every task named.

    sources ──► pipeline (consent gate, encode) ──► outbox (SQLite) ──► forwarder ──► MQTT

A supervisor restarts a source that raises SourceError, with jittered backoff; a source
whose driver cannot be imported is disabled with a clear error.  Any other exception ends
the group and the process exits non-zero for systemd to restart it.  READY is sent after
the config is loaded and the buffer migrated, not after the broker or hardware answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.app.memory import release_free_memory
from gateway.app.notify import Notifier, watchdog_interval
from gateway.app.sources import build_source
from gateway.app.watchdog import ProgressWatch
from gateway.backoff import Backoff
from gateway.buffer.consent_store import ConsentStore
from gateway.buffer.outbox import Outbox, Pending
from gateway.config.loading import Config, load_checked_config, plaintext_links
from gateway.config.sections import HealthConfig
from gateway.consent.erasure import Eraser
from gateway.consent.policy import ConsentPolicy
from gateway.consent.registry import ConsentRegistry, load_seed_file
from gateway.consent.sync import ConsentSync, RegistryUpdater
from gateway.consent.token_replay import TokenReplay
from gateway.contract.events import EventEncoder, status_payload, topic_prefix
from gateway.errors import GatewayError, SourceError, WriterDied
from gateway.identity.clock import clock_is_set, clock_state
from gateway.identity.pseudonyms import Keyring
from gateway.observe.health import HealthMonitor, HealthRules, Histogram, serve_health
from gateway.observe.health_mqtt import HealthPublisher
from gateway.observe.logs import capture_native_stderr
from gateway.observe.metrics import Cell, Metrics
from gateway.ports import Forgets, Publisher, Reading, ReportsMemory, Source, SourceContext
from gateway.uplink.forwarder import Forwarder
from gateway.uplink.mqtt import PahoPublisher
from gateway.uplink.tls import certificate_not_after

log = logging.getLogger(__name__)

CERT_WARN_DAYS = 30  # warn this long before the MQTT client certificate or CA expires


class Gateway:
    def __init__(
        self,
        cfg: Config,
        *,
        now: Callable[[], float] = time.time,
        publisher: Publisher | None = None,
        sources: list[Source] | None = None,
        notifier: Notifier | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.reload_to: Config | None = None  # set by SIGHUP with a valid new config
        self.now = now
        self.metrics = Metrics()
        self.keyring = Keyring.from_files(cfg.keyring.keys, cfg.keyring.active)
        self.outbox = Outbox(
            cfg.buffer,
            self.metrics,
            now=now,
            chunk_events=cfg.mqtt.batch_max_events,
            chunk_bytes=cfg.mqtt.batch_max_bytes - 1024,  # room for the batch envelope
        )
        self.consent = ConsentRegistry(
            cfg.consent.required, self.metrics, token_ttl_s=cfg.consent.token_consent_ttl_s
        )
        self.policy = ConsentPolicy.from_config(
            cfg.consent, self.consent, self.outbox, self.metrics
        )
        self.eraser = Eraser(
            self.outbox, self.consent, self.metrics, hold=self.policy.hold, now=now
        )
        self.token_replay = TokenReplay(self.outbox)  # one for every source, persisted
        self.consent_updater = RegistryUpdater(
            self.consent,
            self.outbox,
            self.eraser,
            self.metrics,
            policy=self.policy,
            submit=self.accept,
            now=now,
        )
        self.consent_sync = (  # raises ConfigError for an unreadable ca_file
            ConsentSync(cfg.consent.sync, cfg.gateway.store, self.consent_updater)
            if cfg.consent.sync is not None
            else None
        )
        self.prefix = topic_prefix(cfg.gateway.store, cfg.gateway.device)
        self.notifier = notifier or Notifier()
        self.stop_event = asyncio.Event()
        self.ready = asyncio.Event()
        self.forwarder: Forwarder | None = None
        self.publisher: Publisher | None = publisher
        self._extra_sources = sources or []
        self.sources: dict[str, Source] = {}  # the running sources, by name
        self.latencies: list[float] | None = None  # set to a list to record (bench)
        self.publish_latency = Histogram()
        self.last_stats: dict[str, Any] = {}
        self._encoders: dict[tuple[str, str], tuple[EventEncoder, Cell]] = {}
        self._dropped_consent = self.metrics.counter("events_dropped_total", reason="consent")
        # the /healthz and .../health rules; a registry never synced from central (seed
        # file only) cannot go stale
        hc = cfg.health or HealthConfig()
        max_age = hc.consent_max_age_s if cfg.consent.sync is not None else None
        rules = HealthRules(hc.broker_down_s, hc.source_down_s, max_age)
        self.health_monitor = HealthMonitor(self, rules, now=now)
        self._cert_warned: dict[str, float] = {}  # certificate -> when last warned (monotonic)
        # events say "clock":"unsynced" while the wall clock is not known to be synchronised
        # (the kernel's NTP state, refreshed every second by housekeeping)
        self.clock_unsynced = clock_state(now()) != "synchronized"

    # -- start-up ---------------------------------------------------------------------

    def _open_buffer(self) -> None:
        self.outbox.open()

    async def _load_consent(self) -> None:
        n = self.consent.restore(await ConsentStore(self.outbox).load())
        if self.policy.hold is not None:
            await self.policy.hold.load()
        if self.cfg.consent.seed_file is not None:
            records = load_seed_file(self.cfg.consent.seed_file)
            await self.consent_updater.apply_records(records, "seed")  # withdrawals erase too
            n = len(self.consent.records)
        log.info("consent registry: %d subjects", n)

    def _make_publisher(self) -> Publisher:
        if self.publisher is not None:
            return self.publisher
        g = self.cfg.gateway
        pub = PahoPublisher(
            self.cfg.mqtt,
            client_id=self.cfg.mqtt.client_id or f"tp-{g.store}-{g.device}",
            will_topic=f"{self.prefix}/status",
            will_payload=lambda: status_payload("offline", self.now(), __version__),
            metrics=self.metrics,
        )
        pub.on_connect(self._publish_online)
        self.publisher = pub
        return pub

    def _publish_online(self) -> None:
        assert self.publisher is not None
        self.publisher.publish(
            f"{self.prefix}/status", status_payload("online", self.now(), __version__), retain=True
        )

    # -- the pipeline -------------------------------------------------------------------

    def accept(self, reading: Reading) -> bool:
        """Gate and buffer one reading; False when consent drops it."""
        type_ = reading.type
        key = (reading.source, type_)
        enc = self._encoders.get(key)
        if enc is None:
            enc = self._encoders[key] = (
                EventEncoder(type_, reading.source),
                self.metrics.counter("readings_total", source=reading.source, type=type_),
            )
        enc[1].value += 1
        if reading.evidence is not None:
            self.consent_updater.apply_evidence(reading.evidence)
        purposes = self.consent.purposes_json(type_, reading.subject, reading.at)
        if purposes is None:
            if self.policy.denied(reading, self.now()).dropped:
                self._dropped_consent.value += 1
            return False
        tail = enc[0].tail(
            reading.at,
            reading.subject,
            purposes,
            reading.attrs,
            unsynced=self.clock_unsynced or not clock_is_set(reading.at),
        )
        self.outbox.submit(Pending(reading.at, type_, reading.subject, tail))
        return True

    async def _pipeline(self, source: Source) -> None:
        async for reading in source.readings():
            self.accept(reading)
            if self.outbox.outstanding >= 2 * self.cfg.buffer.commit_max_events:
                await self.outbox.wait_capacity()

    async def _supervise(self, src_cfg: Any, source: Source | None = None) -> None:
        name: str = source.name if source is not None else str(src_cfg.name)
        ctx = SourceContext(
            name=name,
            keyring=self.keyring,
            metrics=self.metrics,
            now=self.now,
            store=self.cfg.gateway.store,
            replay=self.token_replay.set,
        )
        if source is None:
            try:
                source = build_source(src_cfg, ctx)
            except SourceError as exc:
                log.error("source %s disabled: %s", name, exc)
                ctx.set_state("disabled", str(exc))
                self.metrics.error(f"source:{name}", str(exc))
                return
        self.sources[name] = source
        if isinstance(source, Forgets):  # erasure clears the source's memory of a subject
            self.eraser.hooks.append(source.forget)
        backoff = Backoff(0.5, 60.0)
        while True:
            started = time.monotonic()
            try:
                await self._pipeline(source)
                log.warning("source %s ended; restarting", name)
            except SourceError as exc:
                log.warning("source %s failed: %s; retrying", name, exc)
                ctx.set_state("error", str(exc))
                self.metrics.error(f"source:{name}", str(exc))
                self.metrics.inc("source_restarts_total", source=name)
            if time.monotonic() - started > 60:
                backoff.reset()  # it ran a good while: a new failure starts from the bottom
            await asyncio.sleep(backoff.next())

    async def _housekeeping(self) -> None:
        last_expire = last_summary = time.monotonic()
        wd = watchdog_interval()
        # a hung broker is paho's to notice (~1.5 x keepalive); only then call it a stall
        watch = ProgressWatch(stall_after_s=max(60.0, 3.0 * self.cfg.mqtt.keepalive_s))
        while True:
            await asyncio.sleep(min(1.0, wd or 1.0))
            mono = time.monotonic()
            self.last_stats = await self.outbox.stats()
            self.metrics.set("buffer_depth", self.last_stats["depth"])
            self.clock_unsynced = clock_state(self.now()) != "synchronized"
            for reading in self.policy.tick(self.now()):  # hold expiry, footfall windows
                self.accept(reading)
            await self.eraser.retry_checkpoint()  # erased bytes a reader kept in the WAL
            if mono - last_expire >= 60:
                last_expire = mono
                n = await self.outbox.expire()
                if n:
                    log.warning(
                        "expired %d events older than %ds unsent", n, self.cfg.buffer.max_age_s
                    )
                    self.metrics.inc("events_expired_total", n)
                gone = self.consent.forget_expired_evidence(self.now())
                if gone:  # app-token consent past its expiry: the registry stays bounded
                    await ConsentStore(self.outbox).delete(gone)
                await self.token_replay.prune(self.now())  # used tokens now expired
                await self.eraser.prune_tombstones(self.now())  # older than any token
                release_free_memory()  # what a drained backlog freed goes back to the OS
                self._check_certificates()
            # Watchdog (gateway/app/watchdog.py): the loop runs, the buffer answers and its last
            # write succeeded, and the backlog moves unless the broker is away.
            progressing = watch.progressing(
                mono=mono,
                buffer_ok=self.metrics.get("buffer_write_ok") == 1,
                connected=self.publisher is not None and self.publisher.connected,
                depth=self.last_stats["depth"],
                forwarded=self.metrics.get("events_forwarded_total"),
            )
            if wd is not None and progressing:
                self.notifier.watchdog()
            self.notifier.status(self.status_line())
            if mono - last_summary >= self.cfg.status.summary_interval_s:
                last_summary = mono
                log.info("%s", self.status_line())

    def memory_stats(self) -> dict[str, int]:
        """Entries in every in-memory table the daemon keeps, by name: what must stay
        bounded however long it runs (the soak test watches them; /metrics shows them
        as ``touchpoint_memory_entries{map=...}``).  A source adds its own tables,
        prefixed with its name, when it has a ``memory_sizes()`` method."""
        out = {
            "consent.records": len(self.consent.records),
            "consent.withdrawn": len(self.consent.withdrawn),
            "daemon.encoders": len(self._encoders),
            "metrics.label_sets": self.metrics.label_sets(),
            "metrics.sources": len(self.metrics.sources),
            "metrics.last_error": len(self.metrics.last_error),
            "outbox.tail_cache": self.outbox.cached_chunks,
            "outbox.outstanding": self.outbox.outstanding,
            "eraser.hooks": len(self.eraser.hooks),
            "tokens.replay": len(self.token_replay.set or ()),
        }
        if self.policy.hold is not None:
            out["policy.hold"] = len(self.policy.hold)
        if self.policy.footfall is not None:
            out["policy.footfall"] = len(self.policy.footfall)
        if self.forwarder is not None:
            out["forwarder.in_flight"] = self.forwarder.in_flight
            out["forwarder.queued"] = self.forwarder.queued
        if self.publisher is not None:
            out["mqtt.pending"] = self.publisher.in_flight
        for name, source in self.sources.items():
            if isinstance(source, ReportsMemory):
                for table, n in source.memory_sizes().items():
                    out[f"{name}.{table}"] = int(n)
        return out

    def status_line(self) -> str:
        m = self.metrics
        # events the buffer could not take (drop_new on a full buffer, failed writes)
        lost = sum(
            m.total("events_dropped_total", reason=r) for r in ("buffer_full", "buffer_error")
        )
        return (
            f"read {m.total('readings_total'):.0f}, buffered {m.get('events_buffered_total'):.0f}, "
            f"forwarded {m.get('events_forwarded_total'):.0f}, "
            f"dropped(consent) {m.total('events_dropped_total', reason='consent'):.0f}, "
            + (f"lost(buffer) {lost:.0f}, " if lost else "")
            + (f"evicted {evicted:.0f}, " if (evicted := m.get("events_evicted_total")) else "")
            + f"depth {self.last_stats.get('depth', 0)}, "
            f"broker {'up' if m.get('mqtt_connected') else 'down'}"
        )

    # -- run ------------------------------------------------------------------------------

    async def run(self, *, install_signals: bool = True, drain_timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        health: asyncio.Server | None = None
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop_event.set)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        if any(c.kind == "camera" for c in self.cfg.sources):
            capture_native_stderr()  # OpenCV's and FFmpeg's messages through our logging
        try:
            self._open_buffer()
            await self._load_consent()
            await self.token_replay.load(self.now())
            await self.eraser.load_pending()  # a checkpoint a reader blocked before a restart
            publisher = self._make_publisher()
            topic = f"{self.prefix}/events"
            on_latency: Callable[[list[float]], None] = self.publish_latency.observe_many
            if self.latencies is not None:
                lat = self.latencies
                on_latency = lat.extend
            self.forwarder = Forwarder(
                self.outbox,
                publisher,
                self.cfg.mqtt,
                store=self.cfg.gateway.store,
                device=self.cfg.gateway.device,
                topic=topic,
                metrics=self.metrics,
                now=self.now,
                on_latency=on_latency,
            )
            for link, what in plaintext_links(self.cfg).items():  # opted in: say so, loudly
                log.warning("plaintext: %s (allow_plaintext = true): readable on the network", what)
                self.metrics.set("plaintext_transport", 1, link=link)
            log.info(
                "touchpoint-gateway %s: store %s device %s stream %s, %d source(s)",
                __version__,
                self.cfg.gateway.store,
                self.cfg.gateway.device,
                self.outbox.stream,
                len(self.cfg.sources) + len(self._extra_sources),
            )
            self.eraser.hooks.append(self.forwarder.withdrawn)  # before the rows go
            self.eraser.after_commit.append(self.forwarder.discard_prefetched)
            publisher.subscribe(
                f"touchpoint/v1/{self.cfg.gateway.store}/consent", self.consent_updater.on_push
            )
            self.notifier.ready(self.status_line())
            self.ready.set()
            await publisher.start()
            health = await self._start_health()
            self._check_certificates()
            try:
                await self._run_tasks(publisher, drain_timeout)
            except BaseExceptionGroup as group:  # a dead buffer writer: say that, exit 1
                died = group.subgroup(WriterDied)
                if died is None:
                    raise
                raise died.exceptions[0] from None
        finally:
            if health is not None:
                health.close()
                await health.wait_closed()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self.outbox.close()
            self.notifier.close()

    async def _run_tasks(self, publisher: Publisher, drain_timeout: float) -> None:
        """Every task of the running daemon, in one group."""
        assert self.forwarder is not None
        async with asyncio.TaskGroup() as tg:
            fwd = tg.create_task(self.forwarder.run(), name="forwarder")
            watch = tg.create_task(self._watch_writer(), name="buffer-writer")
            hk = tg.create_task(self._housekeeping(), name="housekeeping")
            hp = tg.create_task(self._health_publisher(publisher).run(), name="health-publisher")
            srcs = [
                tg.create_task(self._supervise(c), name=f"source:{c.name}")
                for c in self.cfg.sources
            ] + [
                tg.create_task(self._supervise(None, src), name=f"source:{src.name}")
                for src in self._extra_sources
            ]
            core = [fwd, hk, watch, hp]
            if self.consent_sync is not None:
                core.append(tg.create_task(self.consent_sync.run(), name="consent-sync"))
            tg.create_task(
                self._stop_sequence(publisher, srcs, core, drain_timeout),
                name="stop-sequence",
            )
        failed = self.outbox.failed
        if failed.done() and not failed.cancelled():  # it died while stopping: a failure
            raise failed.result()

    async def _watch_writer(self) -> None:
        """Raise when the buffer's writer thread dies: that ends the group, and the
        process exits non-zero for systemd to restart it (nothing could be buffered)."""
        raise await asyncio.shield(self.outbox.failed)

    async def _start_health(self) -> asyncio.Server | None:
        hc = self.cfg.health
        if hc is None:
            return None
        host, _, port = hc.listen.rpartition(":")
        return await serve_health(
            self,
            host.strip("[]"),
            int(port),
            monitor=self.health_monitor,
            latency=self.publish_latency,
        )

    def _health_publisher(self, publisher: Publisher) -> HealthPublisher:
        sc = self.cfg.status
        return HealthPublisher(
            self.health_monitor,
            publisher,
            f"{self.prefix}/health",
            key_id=self.keyring.active,
            interval_s=sc.health_interval_s,
            min_interval_s=sc.health_min_interval_s,
            certificates=self._certificate_expiry,
            now=self.now,
        )

    def _check_certificates(self) -> None:
        """Expiry of the MQTT certificates in metrics; a warning, at most once a day each,
        from ``CERT_WARN_DAYS`` before it."""
        now, mono = self.now(), time.monotonic()
        for name, at in self._certificate_expiry().items():
            if at is None:
                continue
            self.metrics.set("certificate_expiry_timestamp_seconds", at, certificate=name)
            days = (at - now) / 86400
            last = self._cert_warned.get(name)
            if days < CERT_WARN_DAYS and (last is None or mono - last >= 86400):
                self._cert_warned[name] = mono
                if days <= 0:
                    log.error("the %s certificate expired %.0f days ago: renew it", name, -days)
                else:
                    log.warning(
                        "the %s certificate expires in %.1f days: renew it, then "
                        "systemctl reload touchpoint-gateway",
                        name,
                        days,
                    )

    def _certificate_expiry(self) -> dict[str, float | None]:
        """notAfter of the MQTT client certificate and CA, read at each call (a renewed
        file shows at once)."""
        tls = self.cfg.mqtt.tls
        if tls is None:
            return {}
        files = {"mqtt_client": tls.cert_file, "mqtt_ca": tls.ca_file}
        return {name: certificate_not_after(path) for name, path in files.items() if path}

    def request_reload(self) -> None:
        """SIGHUP: validate the config file again; if it is good, stop this instance
        gracefully so the caller runs a new one with it (the buffer is the state, so
        nothing is lost); if not, say why and keep running the old one."""
        if self.config_path is None:
            log.warning("reload requested, but the daemon was not started from a config file")
            return
        try:
            new = load_checked_config(self.config_path)  # what check-config and start run
        except GatewayError as exc:
            log.error("reload refused, the running config stays in force:\n%s", exc)
            self.metrics.inc("reloads_total", result="refused")
            self.metrics.error("config", f"reload refused: {exc}")
            return
        log.info("reloading %s", self.config_path)
        self.metrics.inc("reloads_total", result="accepted")
        self.reload_to = new
        self.notifier.reloading()
        self.stop_event.set()

    async def _stop_sequence(
        self,
        publisher: Publisher,
        sources: list[asyncio.Task[None]],
        core: list[asyncio.Task[None]],
        drain_timeout: float,
    ) -> None:
        """On a stop request: stop reading, commit what was read, give the forwarder a
        bounded time to empty the buffer, publish ``offline`` and disconnect."""
        await self.stop_event.wait()
        if self.reload_to is None:  # a reload said RELOADING=1; READY=1 follows
            self.notifier.stopping()
        log.info("stopping: flushing the buffer (up to %.0fs)", drain_timeout)
        for task in sources:
            task.cancel()
        await asyncio.gather(*sources, return_exceptions=True)
        assert self.forwarder is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        with contextlib.suppress(GatewayError):
            while loop.time() < deadline and publisher.connected:
                self.last_stats = await self.outbox.stats()
                if self.last_stats["depth"] == 0:
                    break
                await asyncio.sleep(0.02)
            if publisher.connected:
                await self.forwarder.drain(max(0.0, deadline - loop.time()))
        for task in core:
            task.cancel()
        await asyncio.gather(*core, return_exceptions=True)
        await self.forwarder.cancel()
        if publisher.connected and self.reload_to is None:  # a reload is not going offline
            fut = publisher.publish(
                f"{self.prefix}/status",
                status_payload("offline", self.now(), __version__),
                retain=True,
            )
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(fut), 1.0)
        await publisher.close(graceful=True)
        with contextlib.suppress(GatewayError):
            self.last_stats = await self.outbox.stats()
        log.info("stopped: %s", self.status_line())
