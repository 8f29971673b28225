"""`tunvpnd lab up|demo|down`: the lab with a VPN server and a HostU client running in it.

`--wire wireguard` runs them on the secure wire with the wg-*.yaml example profiles and fresh
keys, made in a private directory inside the lab's run directory (tmpfs, mode 0700, key files
0600) and removed with the lab; only public keys are ever printed.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import select
import subprocess
import sys
import tempfile
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
WIRES = ("plain", "wireguard")
WG_PROFILES = {"server": "wg-server.yaml", "hostu": "wg-client.yaml"}
LAB_PORT = 9090            # the VPN's UDP port in the example profiles
PING_PATTERN = b"tunvpnd-demo"   # the demo's ping payload, looked for on the wire


LOG_STATUS_RE = r"\bup:|stopped|status|ready|\brx \d"


def _profile_path(filename: str, run_dir: Path) -> Path:
    res = importlib.resources.files("tunvpnd") / "examples" / filename
    if isinstance(res, Path):
        return res
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / filename
    out.write_bytes(res.read_bytes())
    return out


def _example_text(filename: str) -> str:
    return (importlib.resources.files("tunvpnd") / "examples" / filename).read_text()


def _set(text: str, pattern: str, replacement: str, filename: str) -> str:
    """`text` with the one line matching `pattern` replaced; an error if not exactly one does
    (the example changed: better to say so than to start a tunnel that cannot come up)."""
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    if count != 1:
        raise RuntimeError(f"examples/{filename}: {count} lines match {pattern!r}, expected 1")
    return new


def _wireguard_profiles(lab: Lab) -> dict[str, Path]:
    """The wg-*.yaml example profiles with fresh keys and a preshared key, in a new private
    directory of the lab's run directory (removed by lab.down()). Prints the public keys."""
    from ..wireguard.keys import (
        encode_key,
        generate_private,
        generate_psk,
        public_key,
        write_key_file,
    )

    lab.run_dir.mkdir(parents=True, exist_ok=True)
    keydir = Path(tempfile.mkdtemp(prefix="wg-keys-", dir=lab.run_dir))   # mode 0700
    public: dict[str, str] = {}
    for role, filename in WG_PROFILES.items():
        private = generate_private()
        write_key_file(keydir / filename.replace(".yaml", ".key"), private)   # mode 0600
        public[role] = encode_key(public_key(private))
    psk = generate_psk()
    for name in ("wg-client.psk", "hostu.psk"):   # the names the examples' comments give
        write_key_file(keydir / name, psk)
    del private, psk

    server = _example_text(WG_PROFILES["server"])
    server = _set(server, r"^(\s*public_key:\s*)\S+", rf"\g<1>{public['hostu']}",
                  WG_PROFILES["server"])
    server = _set(server, r"^(\s*)# (preshared_key_file:)", r"\1\2", WG_PROFILES["server"])
    client = _example_text(WG_PROFILES["hostu"])
    client = _set(client, r"^(server_public_key:\s*)\S+", rf"\g<1>{public['server']}",
                  WG_PROFILES["hostu"])
    client = _set(client, r"^# (preshared_key_file:)", r"\1", WG_PROFILES["hostu"])
    profiles: dict[str, Path] = {}
    for role, text in (("server", server), ("hostu", client)):
        profiles[role] = keydir / WG_PROFILES[role]
        profiles[role].write_text(text)
    _say(f"lab {lab.prefix}: fresh WireGuard keys in {keydir} (mode 0700, key files 0600, "
         f"removed with the lab); public keys: server {public['server']}, "
         f"hostu {public['hostu']}; and a preshared key")
    return profiles


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


def _udp_port_bound(pid: int, port: int) -> bool:
    """Has the process's network namespace a UDP socket bound to `port` (/proc/PID/net)?"""
    for table in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        if any(line.split()[1].endswith(f":{port:04X}") for line in lines if line.strip()):
            return True
    return False


def _running_wire(lab: Lab) -> str | None:
    """The wire of the lab's daemons if the lab is up with both of them running, else None."""
    namespaces = set(leftover_namespaces(lab.prefix))
    if not set(lab.namespaces) <= namespaces or not set(LAB_DAEMONS) <= lab.running_roles():
        return None
    try:
        return (lab.run_dir / "wire").read_text().strip() or "plain"
    except OSError:
        return "plain"


def _check_wire(wire: str) -> None:
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {', '.join(WIRES)}, not {wire!r}")


def lab_up(prefix: str = DEFAULT_PREFIX, *, daemon_argv: Sequence[str] | None = None,
           ready_timeout: float = 15.0, wire: str = "plain") -> int:
    """Build the lab and start the VPN server and the HostU client in it; 0 when both are up.

    `daemon_argv` replaces `python -m tunvpnd run` (the profile path is appended), for tests.
    `wire` is "plain" (the examples client.yaml/server.yaml) or "wireguard" (wg-*.yaml with
    fresh keys).
    """
    _check_wire(wire)
    rc = _up(prefix, daemon_argv, ready_timeout, wire)
    if rc == 0:
        down = "tunvpnd lab down" + ("" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}")
        _say(f"lab {prefix}: stop it with: {down}")
    return rc


def _up(prefix: str, daemon_argv: Sequence[str] | None, ready_timeout: float,
        wire: str = "plain") -> int:
    lab = Lab(prefix)
    argv0 = list(daemon_argv or DAEMON_ARGV)
    try:
        lab.up()
        _say(f"lab {prefix}: namespaces " + ", ".join(lab.namespaces))
        if wire == "wireguard":
            profiles = _wireguard_profiles(lab)
        else:
            profiles = {role: _profile_path(filename, lab.run_dir)
                        for role, (filename, _) in LAB_DAEMONS.items()}
        lab.run_dir.mkdir(parents=True, exist_ok=True)
        (lab.run_dir / "wire").write_text(wire + "\n")
        procs: dict[str, subprocess.Popen] = {}

        def ready(role: str) -> bool:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} daemon exited with status {proc.returncode}")
            if not tun_route_present(lab.hosts[role], LAB_DAEMONS[role][1]):
                return False
            # the server's socket is bound after its TUN is up: a client started before
            # that has its first datagram refused, and a WireGuard client then waits 5 s
            return role != "server" or _udp_port_bound(procs[role].pid, LAB_PORT)

        for role in LAB_DAEMONS:  # the server first, ready, then the client
            state_dir = lab.run_dir / role
            state_dir.mkdir(parents=True, exist_ok=True)
            profile = profiles[role]
            log = lab.run_dir / f"{role}.log"
            with open(log, "wb") as out:
                procs[role] = lab.spawn(role, [*argv0, str(profile)],
                                        env={"TUNVPN_RUN_DIR": str(state_dir),
                                             "PYTHONUNBUFFERED": "1"},
                                        stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT)
            _say(f"lab {prefix}: started {role} (pid {procs[role].pid}) with {profile}, "
                 f"log {log}")
            wait_until(lambda role=role: ready(role), ready_timeout, 0.05,
                       f"the {role}'s TUN route" + (f" and UDP port {LAB_PORT}"
                                                    if role == "server" else ""))
    except (Exception, KeyboardInterrupt) as e:
        _say(f"lab {prefix}: up FAILED: {e}")
        for role in LAB_DAEMONS:
            for line in _tail(lab.run_dir / f"{role}.log", 10):
                _say(f"  {role}.log: {line}")
        lab.down(keep_logs=True)
        return 1
    _say(f"lab {prefix}: up (wire: {wire}); server and client TUN routes present")
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


def _start_sniffer(lab: Lab) -> subprocess.Popen | None:
    """Count what crosses the server's eth0 on the VPN port while the demo runs (sniff.py)."""
    sniffer = lab.spawn("server", [sys.executable, "-m", "tunvpnd.lab", "sniff", "eth0",
                                   str(LAB_PORT), PING_PATTERN.hex()],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if "capturing" in _read_line(sniffer.stdout, 10):
        return sniffer
    sniffer.kill()
    sniffer.communicate(timeout=5)
    return None


def _stop_sniffer(sniffer: subprocess.Popen) -> dict[str, int] | None:
    sniffer.terminate()
    try:
        out, _ = sniffer.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        sniffer.kill()
        sniffer.communicate()
        return None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def _wire_lines(wire: str, counts: dict[str, int] | None, failures: list[str]) -> list[str]:
    """What an observer between HostU and the server saw, in words; a failure when the secure
    wire showed anything but WireGuard messages, or the ping's bytes in clear."""
    if counts is None:
        if wire == "wireguard":
            failures.append("could not capture the server's eth0")
        return ["    (could not capture the server's eth0)"]
    kinds = ", ".join(f"{counts[k]} {k}" for k in ("initiation", "response", "cookie",
                                                    "transport", "ipv4", "ipv6", "other")
                      if counts.get(k))
    lines = [f"    {counts['frames']} UDP frames on port {LAB_PORT} at the server's eth0 (a "
             f"frame may be a GSO batch): {kinds or 'none'}",
             f"    the ping's payload {PING_PATTERN.decode()!r} readable in "
             f"{counts['with_pattern']} of them"]
    if wire == "wireguard":
        clear = counts.get("ipv4", 0) + counts.get("ipv6", 0) + counts.get("other", 0)
        if counts["with_pattern"] or clear:
            failures.append(f"the secure wire carried {clear} non-WireGuard frames and the "
                            f"ping's payload in clear {counts['with_pattern']} times")
        if not counts.get("transport"):
            failures.append("no WireGuard transport message was seen on the wire")
    return lines


def _proved(wire: str) -> list[str]:
    if wire == "plain":
        return ["DEMO OK: ping and TCP echo through the tunnel work",
                "  (wire: plain, as the SEED lab: the packets cross the wire in clear, so "
                "anyone on the path can read and forge them; try --wire wireguard)"]
    return ["DEMO OK: ping and TCP echo through the tunnel work over wire: wireguard",
            "  proved: the server and HostU completed a WireGuard handshake with keys made "
            "for this run;",
            "  the tunnel carried ICMP and TCP both ways, and the path saw only WireGuard "
            "messages,",
            "  never the ping's payload in clear; the private keys were never printed and "
            "are removed"]


def lab_demo(prefix: str = DEFAULT_PREFIX, *, daemon_argv: Sequence[str] | None = None,
             wire: str = "plain") -> int:
    """Ping and a 100 kB TCP echo from HostU to HostV through the tunnel, then tear down.

    `wire` as for lab_up(). Also counts what crosses the server's eth0 meanwhile: on the
    secure wire, anything but WireGuard messages (or the ping's payload in clear) fails it.
    """
    _check_wire(wire)
    lab = Lab(prefix)
    failures: list[str] = []
    running = _running_wire(lab)
    if running == wire:
        _say(f"lab {prefix}: already up (wire: {wire}), reusing it")
    else:
        if running is not None:
            _say(f"lab {prefix}: up with wire: {running}; rebuilding it with wire: {wire}")
        if _up(prefix, daemon_argv, 15.0, wire) != 0:
            return 1
    hostv = lab.addresses["hostv"]
    echo = sniffer = None
    counts: dict[str, int] | None = None
    try:
        sniffer = _start_sniffer(lab)
        _say(f"--- ping {hostv} from hostu ({lab.addresses['hostu']}) through the tunnel")
        ping = lab.run("hostu", ["ping", "-c", "3", "-W", "2", "-p", PING_PATTERN.hex(),
                                 hostv], timeout=20)
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
        if sniffer is not None:
            counts = _stop_sniffer(sniffer)
        _say(f"--- on the wire (wire: {wire}), as anyone between hostu and the server sees it")
        for line in _wire_lines(wire, counts, failures):
            _say(line)
    except (Exception, KeyboardInterrupt) as e:
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        log_lines: list[str] = []
        keydirs = list(lab.run_dir.glob("wg-keys-*"))
        try:
            for proc in (echo, sniffer):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
            # Stop the daemons first: their last words are the counters ("stopped; rx ...").
            lab.down(keep_logs=True)
            for role in LAB_DAEMONS:
                log_lines += [f"    {role}: {line}" for line in
                              _tail(lab.run_dir / f"{role}.log", 3, LOG_STATUS_RE)]
        finally:
            lab.down()
            for proc in (echo, sniffer):
                if proc is not None and proc.stdout is not None:
                    proc.stdout.close()
    _say("--- daemon logs (last status-like lines, after stopping them)")
    for line in log_lines:
        _say(line)
    if wire == "wireguard":  # the handshake the tunnel rests on, as each side's STATUS says
        for role, other in (("server", "hostu"), ("hostu", "server")):
            if not any(f"{role}: " in line and f"{other} up, handshake" in line
                       for line in log_lines):
                failures.append(f"the {role} did not report a handshake with {other}")
    _say(f"lab {prefix}: torn down")
    left = [str(d) for d in keydirs if d.exists()]
    if left:
        failures.append(f"key directory not removed: {', '.join(left)}")
    elif keydirs:
        _say(f"lab {prefix}: keys removed ({', '.join(map(str, keydirs))})")
    if failures:
        _say("DEMO FAILED: " + "; ".join(failures))
        return 1
    for line in _proved(wire):
        _say(line)
    return 0
