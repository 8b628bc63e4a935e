"""``bench ble`` runs end to end (quick) and reports every figure the CLI prints."""

from __future__ import annotations

import json

import pytest

from tests.bench.ble import bench_ble, print_ble


@pytest.mark.slow
def test_bench_ble_quick_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    figures = bench_ble(quick=True)
    json.dumps(figures)  # the CLI's --json prints it as one object
    for key in (
        "presence_adverts_per_s",
        "bare_bleak_adverts_per_s",
        "ours_bleak_adverts_per_s",
        "bare_bleak_cpu_s_per_10k",
        "ours_bleak_cpu_s_per_10k",
        "bleak_path_ratio",
        "paced_ours_cpu_s_per_10k",
    ):
        assert figures[key] > 0, key
    # every advert of the flood went through both scanners, none dropped
    assert figures["bare_bleak_seen"] == figures["flood_adverts"]
    assert figures["ours_bleak_seen"] == figures["flood_adverts"]
    assert figures["ours_dropped"] == 0
    if "peer_error" in figures:  # the peer is optional: then it says why, with no figure
        assert figures["peer_error"]
        assert "cpu_ratio_vs_peer" not in figures
    else:
        assert figures["peer_cpu_s_per_10k"] > 0
        assert figures["cpu_ratio_vs_peer"] > 0
    print_ble(figures)
    assert "ours / bare bleak" in capsys.readouterr().out
