"""The benchmark's smoke run, as CI runs it: every configuration is measured, nothing about
speed is asserted (speed is compared side by side in `bench/run.py`, never in a test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import REPO

CONFIGS = ("routing", "tunvpnd", "tunvpnd-wireguard", "openvpn-none", "openvpn-tuned",
           "openvpn-aes", "wireguard-go", "python-floor")


def test_quick_benchmark_measures_every_configuration(tmp_path):
    for tool in ("iperf3", "openvpn", "openssl", "wireguard-go", "wg"):
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
    assert set(data["ratios"]) >= {"openvpn-none", "openvpn-tuned", "openvpn-aes", "wireguard-go",
                                   "python-floor"}
    assert "tunvpnd / openvpn-tuned" in result.stdout
    assert "tunvpnd / openvpn-aes" in result.stdout
    assert set(data["ratios_wireguard"]) == {"wireguard-go", "openvpn-aes", "tunvpnd"}
    assert "tunvpnd-wireguard / wireguard-go" in result.stdout
    # openvpn-aes is the encrypted OpenVPN it claims to be: TLS, and AES-256-GCM on the data
    # channel as OpenVPN itself reports it; openvpn-none really is cleartext
    aes = data["rounds"]["openvpn-aes"][0]["tunnel"]
    assert aes["data_channel"].startswith("Data Channel: cipher 'AES-256-GCM'"), aes
    assert aes["control_channel"].startswith("Control Channel: TLSv1."), aes
    none = data["rounds"]["openvpn-none"][0]["tunnel"]
    assert none["data_channel"].startswith("Data Channel: cipher '[null-cipher]'"), none
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the secure wire's server scale: every fake peer did a real handshake, got its echo
    # reply back through the tunnel; the flood's responses were authentic ones
    wg = data["scale_wireguard"]["rounds"][0]
    assert wg["connect"]["connected"] == wg["connect"]["of"] == 99, wg["connect"]
    assert wg["N"]["peers"] == 100 and wg["1"]["peers"] == 1
    assert wg["kib_per_peer"] > 0 and wg["udp_ratio"] > 0
    assert wg["handshakes"]["completed"] > 0 and wg["handshakes"]["per_second"] > 0
    assert "handshakes/s completed (flood)" in result.stdout


def test_openvpn_aes_is_ready_only_when_its_log_shows_aes_256_gcm(tmp_path):
    """The readiness check is what guarantees the openvpn-aes column measured AES-256-GCM: a
    tunnel that came up with any other data cipher (or before it says) is not ready."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from configs import OpenVPNAES
    finally:
        sys.path.remove(str(REPO / "bench"))
    log = tmp_path / "openvpn.log"
    up = "2026-12-02 02:12:58 Initialization Sequence Completed\n"
    for data_channel, ready in (("Data Channel: cipher 'AES-256-GCM', peer-id: 0", True),
                                ("Data Channel: cipher 'AES-128-GCM', peer-id: 0", False),
                                ("Data Channel: cipher 'CHACHA20-POLY1305', peer-id: 0", False),
                                ("Data Channel: cipher '[null-cipher]', auth '[null-digest]'",
                                 False),
                                ("", False)):
        log.write_text(f"{up}2026-12-02 02:12:58 {data_channel}\n")
        assert OpenVPNAES().says_ready(log) is ready, data_channel
    log.write_text("2026-12-02 02:12:58 Data Channel: cipher 'AES-256-GCM', peer-id: 0\n")
    assert not OpenVPNAES().says_ready(log)     # negotiated, but not up yet
