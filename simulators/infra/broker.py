"""A real mosquitto on a free loopback port, for tests, the demo and benchmarks.

    python -m simulators.infra.broker [--port N] [--dir DIR] [--acl FILE]

prints the port it listens on as its first stdout line and runs until Ctrl-C or SIGTERM.

    with Mosquitto(workdir) as broker:
        broker.port            # the port it listens on (127.0.0.1)
        broker.stop(); broker.start()    # restart on the same port
        broker.pause(); broker.resume()  # SIGSTOP / SIGCONT: a hung broker

An ACL can be given as the text of a mosquitto ``acl_file``; with one, anonymous clients
connect as ``anonymous`` and are held to it (``allow_anonymous true`` keeps tests simple).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from simulators.infra.service import Service, serve

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_PATHS:
        if Path(candidate).exists():
            return candidate
    raise FileNotFoundError("mosquitto not found: install it with 'apt-get install mosquitto'")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto(Service):
    def __init__(
        self,
        workdir: str | Path,
        port: int | None = None,
        *,
        acl: str | None = None,
        extra_conf: str = "",
        persistence: bool = False,
        allow_anonymous: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.acl = acl
        self.extra_conf = extra_conf
        self.persistence = persistence
        self.allow_anonymous = allow_anonymous
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    def _write_conf(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "max_inflight_messages 0",
            # not 0 (unlimited): mosquitto 2.0.11 then drops a client after a refused publish
            "max_queued_messages 1000000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto' and cannot write here
        if self.acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text(self.acl, encoding="utf-8")
            lines.append(f"acl_file {acl_path}")
        if self.extra_conf:
            lines.append(self.extra_conf)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return conf

    def start(self, timeout: float = 10.0) -> None:
        conf = self._write_conf()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.infra.broker",
        description="Run a mosquitto on 127.0.0.1 (anonymous clients allowed) for a simulated "
        "store; the first stdout line is its port.  Ctrl-C or SIGTERM stops it.",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument(
        "--dir", type=Path, help="its config, log and persistence here (default: a temp dir)"
    )
    parser.add_argument("--acl", type=Path, help="a mosquitto acl_file to hold clients to")
    parser.add_argument(
        "--persistence", action="store_true", help="keep retained and queued messages on disk"
    )
    args = parser.parse_args(argv)
    acl = args.acl.read_text(encoding="utf-8") if args.acl else None
    with tempfile.TemporaryDirectory(prefix="tp-broker-") as tmp:
        broker = Mosquitto(
            args.dir or tmp, args.port or None, acl=acl, persistence=args.persistence
        )

        def failed() -> str | None:
            if broker.proc is None or broker.proc.poll() is not None:
                return f"mosquitto exited; see {broker.log_path}"
            return None

        return serve(broker, failed=failed)


if __name__ == "__main__":
    sys.exit(main())
