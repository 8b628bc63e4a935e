"""Every simulator meant to run has a CLI with ``--help``; a missing dependency says what to do.

Each ``python -m simulators...`` runs as a process, as an integrator runs it.  A missing
dependency is made real for one process by ``sys.modules[name] = None`` (the import fails
exactly as for a package that is not installed).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

ROOT = Path(__file__).resolve().parents[2]
SIMULATORS = ROOT / "simulators"

CLIS = [
    "simulators.central.service",
    "simulators.devices.ble_scenario",
    "simulators.devices.camera",
    "simulators.devices.card_reader",
    "simulators.devices.printer",
    "simulators.devices.till",
    "simulators.infra.broker",
    "simulators.infra.netproxy",
    "simulators.rig.demo",
]

# Libraries, not programs: each is run through one of the CLIs above.
LIBRARIES = {
    "simulators.central.consent_api",  # served by the fake central (service --consent-port)
    "simulators.central.contract_schemas",
    "simulators.devices.fake_bluez",  # run by ble_scenario, which prints its bus address
    "simulators.devices.serial_pty",
    "simulators.rig.store",  # run by the demo
    "simulators.infra.service",  # the with-block and the python -m loop of broker, netproxy
    "simulators.deps",
    "simulators.harness",  # the async simulators on a thread, for the plugin
    "simulators.pytest_plugin",
}


def run(module: str, *args: str, block: str = "") -> subprocess.CompletedProcess[str]:
    code = (
        "import runpy, sys\n"
        f"if {block!r}: sys.modules[{block!r}] = None\n"
        f"sys.argv = [{module!r}, *sys.argv[1:]]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_runnable_module_is_listed() -> None:
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in SIMULATORS.rglob("*.py")
        if path.name != "__init__.py" and "build" not in path.relative_to(SIMULATORS).parts
    }
    runnable = {m for m in modules if 'if __name__ == "__main__"' in _source(m)}
    assert runnable == set(CLIS)
    assert modules == set(CLIS) | LIBRARIES


def _source(module: str) -> str:
    return (ROOT / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8")


# what some helps must name besides
NAMED = {
    "simulators.devices.card_reader": ("--link", "--rate-scale", "scenario"),
    "simulators.central.service": ("--mqtt-host", "--mqtt-port", "--out", "--stats", "--store"),
}


@pytest.mark.parametrize("module", CLIS)
def test_help(module: str) -> None:
    done = run(module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}"), done.stdout
    for word in NAMED.get(module, ()):
        assert word in done.stdout, word
    # a description beyond the usage line, and help for each option
    assert len(done.stdout.splitlines()) > 4
    for option in re.findall(r"^  (--[a-z-]+)", done.stdout, flags=re.MULTILINE):
        line = next(x for x in done.stdout.splitlines() if x.lstrip().startswith(option))
        index = done.stdout.splitlines().index(line)
        after = done.stdout.splitlines()[index : index + 2]
        assert any(len(x.split("  ")) > 1 and x.strip() != option for x in after), (option, after)


SIMULATORS_INSTALL = "pip install touchpoint-simulators"
CAMERA_INSTALL = "pip install 'touchpoint-simulators[camera]'"
GATEWAY_INSTALL = "pip install touchpoint-gateway"


@pytest.mark.parametrize(
    ("module", "missing", "what", "install"),
    [
        ("simulators.central.service", "fastjsonschema", "the fake central", SIMULATORS_INSTALL),
        ("simulators.central.service", "jsonschema", "the fake central", SIMULATORS_INSTALL),
        ("simulators.central.service", "paho", "the fake central", SIMULATORS_INSTALL),
        ("simulators.devices.ble_scenario", "dbus_fast", "the fake BlueZ", SIMULATORS_INSTALL),
        ("simulators.devices.camera", "cv2", "the kiosk camera", CAMERA_INSTALL),
        ("simulators.devices.camera", "numpy", "the kiosk camera", CAMERA_INSTALL),
        ("simulators.devices.camera", "cryptography", "the kiosk camera", CAMERA_INSTALL),
        ("simulators.rig.demo", "gateway", "the store rig", GATEWAY_INSTALL),
    ],
)
def test_a_missing_dependency_says_what_to_install(
    module: str, missing: str, what: str, install: str
) -> None:
    done = run(module, "--help", block=missing)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"{what} needs the Python package '{missing}'" in last, done.stderr
    assert install in last, done.stderr


def test_the_broker_and_the_proxy_run_until_sigterm() -> None:
    """``python -m simulators.infra.broker`` and ``...netproxy`` serve, print their port, stop."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    broker = subprocess.Popen(
        [sys.executable, "-m", "simulators.infra.broker"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    proxy = None
    try:
        assert broker.stdout is not None
        broker_port = int(broker.stdout.readline())
        proxy = subprocess.Popen(
            [sys.executable, "-m", "simulators.infra.netproxy", str(broker_port), "--mqtt"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proxy.stdout is not None
        proxy_port = int(proxy.stdout.readline())
        got: list[bytes] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_message = lambda c, u, msg: got.append(msg.payload)
        client.connect("127.0.0.1", proxy_port)
        client.loop_start()
        client.subscribe("t", qos=1)
        time.sleep(0.3)
        client.publish("t", b"through the proxy", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        client.disconnect()
        client.loop_stop()
        assert got == [b"through the proxy"]
    finally:
        for proc in (proxy, broker):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
    codes = [proc.wait(10) for proc in (proxy, broker) if proc is not None]
    for proc in (proxy, broker):
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
    assert codes == [0, 0]
