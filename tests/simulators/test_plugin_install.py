"""An integrator's project installs touchpoint-simulators and tests with its plugin.

A clean venv (no system site-packages, no checkout on the path) gets the simulators
distribution from a copy of ``simulators/`` (pip resolves its dependencies from the
configured index, as ``make install`` does) and pytest, nothing else; a throwaway
project's tests then use the plugin's fixtures by name, with no conftest: the entry point
registers them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

PROJECT_TEST = """
import importlib.util
import json
import os
import select
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest

import simulators
from simulators.devices.card_reader import rdm6300_frame

STORE, DEVICE, STREAM = "nl-ams-001", "gw-01", "00112233aabbccdd"


def test_installed_not_the_checkout():
    assert not simulators.__file__.startswith(os.environ["CHECKOUT"])
    assert importlib.util.find_spec("gateway") is None  # the daemon is not installed


def test_the_central_gets_what_is_published(broker, fake_central):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    event = {"seq": 1, "type": "footfall", "ts": "2026-11-22T10:15:00Z", "source": "door",
             "purposes": [], "attrs": {"zone": "entrance", "window_start": "2026-11-22T10:00:00Z",
                                       "window_s": 900, "count": 5}}
    doc = {"v": 1, "store": STORE, "device": DEVICE, "stream": STREAM, "events": [event]}
    client.publish(f"touchpoint/v1/{STORE}/{DEVICE}/events", json.dumps(doc), qos=1)
    fake_central.wait_for(lambda stats: stats["accepted"] == 1, timeout=10)
    client.disconnect()
    client.loop_stop()
    assert fake_central.accepted_keys() == {(STORE, DEVICE, STREAM, 1)}


def test_a_card_from_the_pty_reader(card_reader):
    fd = os.open(card_reader.path, os.O_RDWR | os.O_NOCTTY)
    card_reader.write_frame("13005D1DA5")
    got = b""
    while len(got) < 14 and select.select([fd], [], [], 5)[0]:
        got += os.read(fd, 64)
    os.close(fd)
    assert got == rdm6300_frame("13005D1DA5")


def test_the_camera_says_what_to_install(request):
    with pytest.raises(ImportError, match=r"pip install 'touchpoint-simulators\\[camera\\]'"):
        request.getfixturevalue("camera")


def test_clis():
    def run(module):
        return subprocess.run([sys.executable, "-m", module, "--help"],
                              capture_output=True, text=True, timeout=60)
    assert run("simulators.central.service").returncode == 0
    demo = run("simulators.rig.demo")
    assert demo.returncode != 0
    assert "pip install touchpoint-gateway" in demo.stderr
"""


def test_a_throwaway_project_uses_the_installed_plugin(tmp_path: Path) -> None:
    src = tmp_path / "src" / "simulators"
    shutil.copytree(
        ROOT / "simulators",
        src,  # the schemas symlink is followed: a copy holds the files
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    # A clean venv without pip of its own: this venv's pip installs into it (--python),
    # which saves ensurepip's half minute.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python"]
    subprocess.run(
        [*pip, str(venv / "bin" / "python"), "install", "-q", str(src), "pytest"],
        check=True, timeout=600, env=env,
    )  # fmt: skip

    project = tmp_path / "project"
    project.mkdir()
    (project / "test_store.py").write_text(textwrap.dedent(PROJECT_TEST), encoding="utf-8")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env={**env, "CHECKOUT": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout, done.stdout
