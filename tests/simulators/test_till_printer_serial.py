"""The fake till and the fake printer in serial mode: their ptys, their CLIs, end to end
through the real serial receipt tap."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tty
from pathlib import Path

import pytest

from drivers.receipt_tap.serial_line import SerialLine, SerialReceiptTap, SerialTapSettings
from gateway.observe.metrics import Metrics
from simulators.devices import till
from simulators.devices.printer import STATUS_OK, SerialPrinter
from simulators.devices.serial_pty import SerialEnd

ROOT = Path(__file__).resolve().parents[2]


def open_other_end(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    return fd


async def read_until(fd: int, want: int, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(timeout):
        while len(got) < want:
            try:
                got += os.read(fd, 65536)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
    return got


def test_serial_printer_answers_status_and_records(tmp_path: Path) -> None:
    async def scenario() -> None:
        with SerialEnd.pty(tmp_path / "printer") as end:
            async with SerialPrinter(end) as printer:
                fd = open_other_end(tmp_path / "printer")
                try:
                    job = till.receipt() + till.status_query(4)
                    os.write(fd, till.status_query(1))
                    assert await read_until(fd, 1) == bytes([STATUS_OK[1]])
                    os.write(fd, job)
                    assert await read_until(fd, 1) == bytes([STATUS_OK[4]])
                    assert await printer.wait_bytes(3 + len(job)) == till.status_query(1) + job
                    await printer.pause()
                    await printer.resume()
                    assert await read_until(fd, 2) == b"\x13\x11"
                finally:
                    os.close(fd)
                assert printer.queries == 2

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_unplugged_pty_fails_the_other_end_and_keeps_its_link_on_replug(tmp_path: Path) -> None:
    link = tmp_path / "till"
    with SerialEnd.pty(link) as end:
        fd = open_other_end(link)
        try:
            end.unplug()
            assert not link.exists()
            try:
                data: bytes | None = os.read(fd, 1)
            except OSError:
                data = None  # EIO
            assert not data  # the other end sees the hang-up: EIO or EOF
        finally:
            os.close(fd)
        second = end.open()
        assert link.resolve() == Path(second).resolve()
    assert not link.exists()


def start(module: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    return out, err


def test_cli_till_and_printer_through_the_serial_tap(tmp_path: Path) -> None:
    till_link, printer_link = tmp_path / "till", tmp_path / "printer"
    printer_proc = start(
        "simulators.devices.printer", "--serial", "pty", "--link", str(printer_link)
    )
    till_proc = start(
        "simulators.devices.till", "--serial", "pty", "--link", str(till_link),
        "--count", "3", "--qr", "https://shop.example/x",
    )  # fmt: skip
    metrics = Metrics()

    async def scenario() -> None:
        settings = SerialTapSettings(
            str(till_link), str(printer_link), SerialLine(), reopen_min_s=0.02, reopen_max_s=0.1
        )
        async with SerialReceiptTap(settings, metrics=metrics, name="tap"):
            while till_proc.poll() is None:
                await asyncio.sleep(0.05)

    try:
        for proc in (printer_proc, till_proc):
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("/dev/")
        asyncio.run(asyncio.wait_for(scenario(), 40))
    finally:
        till_out, till_err = stop(till_proc)
        _, printer_err = stop(printer_proc)
    assert till_proc.returncode == 0, till_err
    assert "job 3: printer status 16" in till_out
    assert printer_proc.returncode == 0, printer_err
    assert metrics.get("receipt_tap_jobs_total", source="tap") == 3
    assert metrics.get("receipt_tap_qr_seen_total", source="tap") == 3
    assert not till_link.exists() and not printer_link.exists()


@pytest.mark.parametrize("module", ["simulators.devices.till", "simulators.devices.printer"])
def test_cli_help_names_the_serial_mode(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    assert "--serial DEVICE" in out.stdout and "--link" in out.stdout
