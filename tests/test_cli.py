"""The command line as an operator uses it: `tunvpnd check`, `tunvpnd run` on bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO, forwarding, server_profile, tun_links, unique
from tunvpnd.lab import leftover_namespaces

EX_CONFIG = 78


def tunvpnd(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunvpnd", *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd, env={**os.environ, **(env or {})})


def test_check_valid_profile_prints_one_line_summary():
    result = tunvpnd("check", str(EXAMPLES / "client.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{EXAMPLES / 'client.yaml'}: OK: client tun0 192.168.53.99/24 mtu 1420, "
        "server 10.9.0.11:9090, 1 route"]


def test_check_by_instance_name_in_config_dir():
    result = tunvpnd("check", "server", "--config-dir", str(EXAMPLES))
    assert result.returncode == 0
    assert "OK: server tun0 192.168.53.1/24" in result.stdout
    assert "listen 0.0.0.0:9090, learning peers" in result.stdout
    result = tunvpnd("check", "client", env={"TUNVPN_CONFIG_DIR": str(EXAMPLES)})
    assert result.returncode == 0


def test_check_reports_every_problem_with_file_and_line(tmp_path):
    bad = tmp_path / "client.yaml"
    bad.write_text("mode: client\n"
                   "server: 10.9.0.11:9090\n"
                   "interface:\n"
                   "  address: 192.168.53.99/24\n"
                   "  mtu: big\n"
                   "routes:\n"
                   "  - 192.168.60.0/24\n"
                   "  - 192.168.600.0/24\n")
    result = tunvpnd("check", str(bad))
    assert result.returncode == EX_CONFIG
    assert f"{bad}:5: interface.mtu: must be an integer, got 'big'" in result.stderr
    assert f"{bad}:8: routes[1]: '192.168.600.0/24' is not an IP network" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_profile_is_a_config_error(tmp_path):
    result = tunvpnd("check", "nosuch", "--config-dir", str(tmp_path))
    assert result.returncode == EX_CONFIG
    assert str(tmp_path / "nosuch.yaml") in result.stderr


CLIENT = """\
mode: client
server: 10.9.0.11:9090
interface:
  name: tun0
  address: 192.168.53.99/24
routes:
  - 192.168.60.0/24
"""


@pytest.mark.parametrize("text, line, message", [
    (CLIENT + "keepalive: 0x" + "f" * 4000 + "\n", 8, "keepalive: must be from 0 to 3600"),
    (CLIENT + "log: " + "[" * 5000 + "]" * 5000 + "\n", 8, "(file): nested more than 64"),
    (CLIENT.replace("routes:\n  - 192.168.60.0/24", "routes: [0.0.0.0/1]"), 6,
     "routes[0]: 0.0.0.0/1 covers the server 10.9.0.11, so the tunnel would carry its own"
     " datagrams into itself; only 0.0.0.0/0 and ::/0 (a full tunnel) are routed around that"),
    (CLIENT.replace("10.9.0.11:9090", "255.255.255.255:9090"), 2,
     "server: '255.255.255.255:9090': 255.255.255.255 is the broadcast address"),
    (CLIENT.replace("name: tun0", 'name: "%d"'), 4, "interface.name: '%d' alone would name"),
])
def test_check_reports_what_used_to_crash_or_pass(tmp_path, text, line, message):
    bad = tmp_path / "c.yaml"
    bad.write_text(text)
    result = tunvpnd("check", str(bad))
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr.startswith(f"{bad}:{line}: {message}")
    assert "Traceback" not in result.stderr and len(result.stderr) < 500


def test_check_refuses_a_fifo_at_once(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "tunvpnd", "check", str(fifo)],
                            capture_output=True, text=True, timeout=20, cwd=REPO)
    assert result.returncode == EX_CONFIG
    assert result.stderr == (f"{fifo}:1: (file): is a FIFO, not a profile (only regular files"
                             " are read)\n")


def test_check_of_ten_thousand_peers_and_of_a_shared_list(tmp_path):
    head = "mode: server\ninterface:\n  address: 192.168.53.1/24\npeers:\n"
    big = tmp_path / "big.yaml"
    big.write_text(head + "".join(f"  - name: p{i}\n    allowed_ips: [10.{i >> 8}.{i & 255}.1]\n"
                                  for i in range(10_000)))
    started = time.monotonic()
    result = tunvpnd("check", str(big))
    assert result.returncode == 0, result.stderr
    assert "10000 peers" in result.stdout
    # 300 peers with the same 300 addresses: 89,700 overlaps, 21 lines
    shared = "[" + ", ".join(f"1.1.{i >> 8}.{i & 255}" for i in range(300)) + "]"
    many = tmp_path / "many.yaml"
    many.write_text(head + "".join(f"  - name: p{i}\n    allowed_ips: {shared}\n"
                                   for i in range(300)))
    result = tunvpnd("check", str(many))
    assert time.monotonic() - started < 20  # about 2 s for both; was 72 s and 12 s
    assert result.returncode == EX_CONFIG
    lines = result.stderr.splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 89680 more problems"


def test_run_with_bad_profile_exits_78_before_touching_the_network(tmp_path, lab):
    bad = tmp_path / "c.yaml"
    bad.write_text((EXAMPLES / "client.yaml").read_text().replace("mode: client", "mode: clint"))
    # in a lab host, so that a regression could not put a TUN on this machine's own network
    result = lab.run("hostu", [sys.executable, "-m", "tunvpnd", "run", str(bad)],
                     env={"TUNVPN_RUN_DIR": str(tmp_path / "run")})
    assert result.returncode == EX_CONFIG
    assert f"{bad}:6: mode: must be one of client, server" in result.stderr
    assert "not starting" in result.stderr
    assert tun_links(lab, "hostu") == []
    assert not (tmp_path / "run").exists()


def test_python_dash_m_and_console_script_agree():
    script = Path(sys.executable).parent / "tunvpnd"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("tunvpnd ")


def test_lab_demo_end_to_end():
    """The README's first command: the lab in namespaces, ping and TCP through the tunnel."""
    prefix = unique("tvd")
    script = Path(sys.executable).parent / "tunvpnd"
    result = subprocess.run([str(script), "lab", "demo", "--prefix", prefix],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 packets transmitted, 3 received" in result.stdout
    assert "102400 bytes echoed back identical" in result.stdout
    # plain is the SEED lab's wire: the ping's payload crosses it readable
    assert re.search(r"the ping's payload 'tunvpnd-demo' readable in [1-9]\d* of them",
                     result.stdout), result.stdout
    assert "DEMO OK: ping and TCP echo through the tunnel work\n" in result.stdout
    assert "wire: wireguard" not in result.stdout
    assert leftover_namespaces(prefix) == []


def test_run_with_a_profile_that_used_to_crash_it_exits_78(tmp_path, lab):
    bad = tmp_path / "c.yaml"
    bad.write_text(CLIENT + "keepalive: 0x" + "f" * 4000 + "\n")
    result = lab.run("hostu", [sys.executable, "-m", "tunvpnd", "run", str(bad)],
                     env={"TUNVPN_RUN_DIR": str(tmp_path / "run")})
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{bad}:8: keepalive: must be from 0 to 3600" in result.stderr
    assert "Traceback" not in result.stderr
    assert tun_links(lab, "hostu") == []


# -- cleanup (issue 8, item 15) -------------------------------------------------------------


def cleanup_in(lab, role: str, name: str, run_dir: Path) -> subprocess.CompletedProcess:
    """`tunvpnd cleanup NAME` as the unit's ExecStopPost runs it, inside a lab host."""
    return lab.run(role, [sys.executable, "-m", "tunvpnd", "cleanup", name],
                   env={"TUNVPN_RUN_DIR": str(run_dir)}, cwd="/")


def test_cleanup_refuses_names_that_leave_the_run_directory(tmp_path, lab):
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.state"  # a state file one level up, that a path could reach
    outside.write_text('{"pid": 1, "start": "0", "forwarding": [], "routes_on": []}')
    for name in ("../outside", "../../etc/passwd", "..", ".", "a/b", "", "x\nlogin"):
        result = cleanup_in(lab, "hostu", name, run)
        assert result.returncode == 2, (name, result.stderr)
        assert "not an instance name" in result.stderr and "Traceback" not in result.stderr
    assert outside.exists()
    for name in ("client", "tunvpnd@x-1.b", str(tmp_path / "conf" / "client.yaml")):
        result = cleanup_in(lab, "hostu", name, run)
        assert result.returncode == 0, (name, result.stderr)
    assert outside.exists() and list(run.iterdir()) == []  # nothing to do: nothing touched


def test_cleanup_while_the_daemon_runs_says_so_and_changes_nothing(lab, daemons):
    server = daemons(lab, "server", server_profile(extra="routes: [192.168.70.0/24]"))
    state = (server.run_dir / "server.state").read_text()
    flags = forwarding(lab, "server")
    result = cleanup_in(lab, "server", str(server.profile), server.run_dir)
    assert result.returncode == 1
    assert (f"cleanup: tunvpnd server is already running (pid {server.pid}; lock "
            f"{server.run_dir / 'server.lock'}): nothing done") in result.stderr
    assert "Traceback" not in result.stderr
    assert (server.run_dir / "server.state").read_text() == state
    assert forwarding(lab, "server") == flags and set(flags.values()) == {1}
    assert server.proc.poll() is None and server.stop() == 0
    assert cleanup_in(lab, "server", "server", server.run_dir).returncode == 0


def test_state_file_of_the_wrong_shape_is_named_at_start_and_in_cleanup(lab, daemons, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = run / "server.state"
    state.write_text('{"pid": 1, "routes_on": 5}')
    result = cleanup_in(lab, "server", "server", run)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"cleanup: state file {state} is not a tunvpnd state file (routes_on: not a list)"
            in result.stderr)
    server = daemons(lab, "server", server_profile(), wait=False,
                     env={"TUNVPN_RUN_DIR": str(run)})
    assert server.proc.wait(15) == 1
    assert (f"start failed: state file {state} is not a tunvpnd state file (routes_on: not a "
            "list)") in server.log()
    assert "Traceback" not in server.log()
    assert tun_links(lab, "server") == [] and state.exists()


def test_run_dir_that_is_a_file_gives_one_clear_error(lab, daemons, tmp_path):
    file = tmp_path / "not-a-dir"
    file.write_text("")
    server = daemons(lab, "server", server_profile(), wait=False,
                     env={"TUNVPN_RUN_DIR": str(file)})
    assert server.proc.wait(15) == 1
    errors = [line for line in server.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1, server.log()
    assert errors[0].endswith(f"start failed: run directory {file} (from TUNVPN_RUN_DIR) is "
                              "not a directory")
    assert tun_links(lab, "server") == []
    result = cleanup_in(lab, "server", "server", file)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cleanup: run directory {file} (from TUNVPN_RUN_DIR) is not a directory" in \
        result.stderr
