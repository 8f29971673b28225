"""`tunvpnd lab up|demo|down`: the lab with a VPN server and a HostU client running in it."""

from __future__ import annotations

import importlib.resources
import re
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .topology import (
    DEFAULT_PREFIX,
    Lab,
    leftover_namespaces,
    tun_route_present,
    wait_until,
)

DAEMON_ARGV: list[str] = [sys.executable, "-m", "tunvpnd", "run"]
ECHO_PORT = 9000           # the demo's TCP echo through the tunnel
ECHO_BYTES = 100 * 1024
# role -> (profile file in tunvpnd/examples, network routed through the TUN when ready)
LAB_DAEMONS: dict[str, tuple[str, str]] = {
    "server": ("server.yaml", "192.168.53.0/24"),
    "hostu": ("client.yaml", "192.168.60.0/24"),
}


LOG_STATUS_RE = r"\bup:|stopped|status|ready|\brx \d"


def _profile_path(filename: str, run_dir: Path) -> Path:
    res = importlib.resources.files("tunvpnd") / "examples" / filename
    if isinstance(res, Path):
        return res
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / filename
    out.write_bytes(res.read_bytes())
    return out


def _tail(path: Path, n: int = 5, pattern: str | None = None) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    if pattern:
        rx = re.compile(pattern, re.I)
        hits = [line for line in lines if rx.search(line)]
        if hits:
            return hits[-n:]
    return lines[-n:]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _lab_is_up(lab: Lab) -> bool:
    namespaces = set(leftover_namespaces(lab.prefix))
    if not set(lab.namespaces) <= namespaces:
        return False
    return set(LAB_DAEMONS) <= lab.running_roles()


def lab_up(prefix: str = DEFAULT_PREFIX, *, daemon_argv: Sequence[str] | None = None,
           ready_timeout: float = 15.0) -> int:
    """Build the lab and start the VPN server and the HostU client in it; 0 when both are up.

    `daemon_argv` replaces `python -m tunvpnd run` (the profile path is appended), for tests.
    """
    rc = _up(prefix, daemon_argv, ready_timeout)
    if rc == 0:
        down = "tunvpnd lab down" + ("" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}")
        _say(f"lab {prefix}: stop it with: {down}")
    return rc


def _up(prefix: str, daemon_argv: Sequence[str] | None, ready_timeout: float) -> int:
    lab = Lab(prefix)
    argv0 = list(daemon_argv or DAEMON_ARGV)
    try:
        lab.up()
        _say(f"lab {prefix}: namespaces " + ", ".join(lab.namespaces))
        procs: dict[str, subprocess.Popen] = {}
        for role, (filename, _) in LAB_DAEMONS.items():
            state_dir = lab.run_dir / role
            state_dir.mkdir(parents=True, exist_ok=True)
            profile = _profile_path(filename, lab.run_dir)
            log = lab.run_dir / f"{role}.log"
            with open(log, "wb") as out:
                procs[role] = lab.spawn(role, [*argv0, str(profile)],
                                        env={"TUNVPN_RUN_DIR": str(state_dir),
                                             "PYTHONUNBUFFERED": "1"},
                                        stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT)
            _say(f"lab {prefix}: started {role} (pid {procs[role].pid}) with {profile}, "
                 f"log {log}")

        def ready() -> bool:
            for role, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{role} daemon exited with status {proc.returncode}")
            return all(tun_route_present(lab.hosts[role], net)
                       for role, (_, net) in LAB_DAEMONS.items())

        wait_until(ready, ready_timeout, 0.1, "the TUN routes of the server and the client")
    except (Exception, KeyboardInterrupt) as e:
        _say(f"lab {prefix}: up FAILED: {e}")
        for role in LAB_DAEMONS:
            for line in _tail(lab.run_dir / f"{role}.log", 10):
                _say(f"  {role}.log: {line}")
        lab.down(keep_logs=True)
        return 1
    _say(f"lab {prefix}: up; server and client TUN routes present")
    return 0


def lab_down(prefix: str = DEFAULT_PREFIX) -> int:
    """Stop the lab's processes and delete its namespaces; logs stay in the run directory."""
    lab = Lab(prefix)
    lab.down(keep_logs=True)
    left = leftover_namespaces(prefix)
    if left:
        _say(f"lab {prefix}: could not remove namespaces: {', '.join(left)}")
        return 1
    _say(f"lab {prefix}: down")
    return 0


def _read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def lab_demo(prefix: str = DEFAULT_PREFIX, *, daemon_argv: Sequence[str] | None = None) -> int:
    """Ping and a 100 kB TCP echo from HostU to HostV through the tunnel, then tear down."""
    lab = Lab(prefix)
    failures: list[str] = []
    if _lab_is_up(lab):
        _say(f"lab {prefix}: already up, reusing it")
    elif _up(prefix, daemon_argv, ready_timeout=15.0) != 0:
        return 1
    hostv = lab.addresses["hostv"]
    echo = None
    try:
        _say(f"--- ping {hostv} from hostu ({lab.addresses['hostu']}) through the tunnel")
        ping = lab.run("hostu", ["ping", "-c", "3", "-W", "2", hostv], timeout=20)
        for line in (ping.stdout + ping.stderr).splitlines():
            if "packets transmitted" in line or line.startswith(("rtt", "round-trip")) \
                    or "nreachable" in line:
                _say(f"    {line}")
        if ping.returncode != 0:
            failures.append(f"ping {hostv} exited with {ping.returncode}")

        _say(f"--- TCP echo: {ECHO_BYTES} bytes from hostu to {hostv}:{ECHO_PORT} and back")
        echo = lab.spawn("hostv", [sys.executable, "-m", "tunvpnd.lab", "echo-server",
                                   str(ECHO_PORT)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = _read_line(echo.stdout, 10)
        if "listening" not in first:
            failures.append(f"echo server did not start: {first.strip() or 'no output'}")
        else:
            client = lab.run("hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client",
                                       hostv, str(ECHO_PORT), str(ECHO_BYTES)], timeout=40)
            for line in (client.stdout + client.stderr).splitlines():
                _say(f"    {line}")
            if client.returncode != 0:
                failures.append(f"TCP echo failed (exit {client.returncode})")
    except (Exception, KeyboardInterrupt) as e:
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        log_lines: list[str] = []
        try:
            if echo is not None and echo.poll() is None:
                echo.terminate()
            # Stop the daemons first: their last words are the counters ("stopped; rx ...").
            lab.down(keep_logs=True)
            for role in LAB_DAEMONS:
                log_lines += [f"    {role}: {line}" for line in
                              _tail(lab.run_dir / f"{role}.log", 3, LOG_STATUS_RE)]
        finally:
            lab.down()
            if echo is not None and echo.stdout is not None:
                echo.stdout.close()
    _say("--- daemon logs (last status-like lines, after stopping them)")
    for line in log_lines:
        _say(line)
    _say(f"lab {prefix}: torn down")
    if failures:
        _say("DEMO FAILED: " + "; ".join(failures))
        return 1
    _say("DEMO OK: ping and TCP echo through the tunnel work")
    return 0
