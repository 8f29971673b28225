"""The benchmark's smoke run, as CI runs it: every configuration is measured, nothing about
speed is asserted (speed is compared side by side in `bench/run.py`, never in a test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import REPO

CONFIGS = ("routing", "tunvpnd", "openvpn-none", "openvpn-tuned", "wireguard-go", "python-floor")


def test_quick_benchmark_measures_every_configuration(tmp_path):
    for tool in ("iperf3", "openvpn", "wireguard-go", "wg"):
        assert shutil.which(tool), f"{tool} is missing: sh packaging/install.sh --test"
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick",
                             "--json", str(out), "--png", str(tmp_path / "bench.png")],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["errors"] == [] and data["skipped"] == {}
    for config in CONFIGS:
        for metric in ("tcp_mbps", "udp_kpps", "ping_median_ms"):
            assert data["summary"][config][metric]["median"] > 0, (config, metric)
    assert data["summary"]["tunvpnd"]["rss_mib"]["median"] > 0
    assert set(data["ratios"]) >= {"openvpn-none", "openvpn-tuned", "wireguard-go", "python-floor"}
    assert "tunvpnd / openvpn-tuned" in result.stdout
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
