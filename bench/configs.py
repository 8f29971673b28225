"""The configurations under test, one class each: start the tunnel in a lab, name its processes,
stop it.

Every one carries HostU (10.9.0.5) -> server (10.9.0.11 / 192.168.60.11) -> HostV
(192.168.60.5). Tunnels use 192.168.53.1 (server) and 192.168.53.99 (client), and the TUN MTU
1420 of tunvpnd and WireGuard, so every tunnel moves the same packet sizes. The harness
configures namespaces with `ip` and `sysctl`; only tunvpnd configures itself.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from measure import wait_reachable

from tunvpnd.lab import Lab, wait_until

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "etc" / "tunvpn"
SERVER_TUN, CLIENT_TUN = "192.168.53.1", "192.168.53.99"
LAN = "192.168.60.0/24"
MTU = "1420"
START_TIMEOUT = 15.0


def run_ok(lab: Lab, role: str, argv: list[str], timeout: float = 10) -> str:
    result = lab.run(role, argv, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{role}: {' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def configure_tun(lab: Lab, ifnames: dict[str, str]) -> None:
    """What tunvpnd does for itself, done with `ip` for a tunnel that leaves it to the harness:
    MTU, address and link up on the server's and HostU's interface; HostU's route to the LAN."""
    addresses = {"server": SERVER_TUN, "hostu": CLIENT_TUN}
    for role, ifname in ifnames.items():
        run_ok(lab, role, ["ip", "link", "set", ifname, "mtu", MTU])
        run_ok(lab, role, ["ip", "addr", "add", f"{addresses[role]}/24", "dev", ifname])
        run_ok(lab, role, ["ip", "link", "set", ifname, "up"])
    run_ok(lab, "hostu", ["ip", "route", "add", LAN, "dev", ifnames["hostu"]])


def tail(path: Path, n: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


class Tunnel:
    """Base: processes started in the lab, stopped by PID (SIGTERM, then SIGKILL)."""

    name = ""
    needs: tuple[str, ...] = ()      # executables that must be on PATH

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def missing(self) -> str | None:
        """Why this config cannot run here, or None."""
        absent = [tool for tool in self.needs if shutil.which(tool) is None]
        return f"not installed: {', '.join(absent)}" if absent else None

    def start(self, lab: Lab, workdir: Path) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def spawn(self, lab: Lab, role: str, argv: list[str], log: Path,
              env: dict | None = None) -> subprocess.Popen:
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = lab.spawn(role, argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, cwd="/")
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: {proc.args[0]} exited with {proc.returncode}: "
                                   f"{self.log_tail()}")

    def facts(self) -> dict[str, str]:
        """What the tunnel says it negotiated (kept in the JSON beside the numbers)."""
        return {}

    def log_tail(self) -> str:
        return " || ".join(f"{log.name}: {tail(log)}" for log in self.logs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


class Routing(Tunnel):
    """No tunnel: HostU reaches HostV through the server by plain IP forwarding."""

    name = "routing"

    def start(self, lab: Lab, workdir: Path) -> None:
        run_ok(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run_ok(lab, "hostu", ["ip", "route", "add", LAN, "via", lab.addresses["server"]])
        run_ok(lab, "hostv", ["ip", "route", "add", "10.9.0.0/24", "via", "192.168.60.11"])


class TunvpndDaemon:
    """The notify socket of one daemon: READY=1 and the latest STATUS= line."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.fields: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.fields += self.sock.recv(4096).decode().split("\n")
            except BlockingIOError:
                return self.fields

    def status(self) -> str:
        statuses = [f[7:] for f in self.poll() if f.startswith("STATUS=")]
        return statuses[-1] if statuses else ""

    def close(self) -> None:
        self.sock.close()


METRICS = "+metrics"  # suffix of a tunvpnd config run with `metrics:` on and scraped
METRICS_PORT = 9586
SCRAPE_LIMIT = 3600  # scrapes of one daemon at most: an hour at one a second
# One GET /metrics a second from inside a daemon's namespace, SCRAPE_LIMIT at most; prints
# "OK FAILED" after each, so the log's last line counts them.
SCRAPER = r"""
import socket, sys, time
port, limit = int(sys.argv[1]), int(sys.argv[2])
ok = failed = 0
for _ in range(limit):
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))
        good = data.startswith(b"HTTP/1.1 200 ") and b"tunvpnd_up" in data
    except OSError:
        good = False
    ok, failed = ok + good, failed + (not good)
    print(ok, failed, flush=True)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
"""


class Tunvpnd(Tunnel):
    """Our daemons, as users run them: `python -m tunvpnd run PROFILE`. With `metrics`, both
    profiles get `metrics: 127.0.0.1:9586` and each daemon is scraped once a second while it
    is measured (bench/run.py --metrics: metrics on vs off)."""

    name = "tunvpnd"
    metrics = False
    scrapers: list[subprocess.Popen]

    def __init__(self, server_profile: Path = EXAMPLES / "server.yaml",
                 client_profile: Path = EXAMPLES / "client.yaml", source: Path = REPO,
                 name: str = "tunvpnd") -> None:
        """`source`: the checkout whose tunvpnd runs (another one for a before/after column)."""
        super().__init__()
        self.name = name
        self.source = source
        self.profiles = {"server": server_profile, "hostu": client_profile}
        self.notify: dict[str, TunvpndDaemon] = {}

    def start(self, lab: Lab, workdir: Path) -> None:
        if self.metrics:  # a copy in the run's directory (where the wg key files are too)
            for role, profile in self.profiles.items():
                copy = workdir / f"{profile.stem}-metrics.yaml"
                copy.write_text(f"{profile.read_text()}\nmetrics: 127.0.0.1:{METRICS_PORT}\n")
                self.profiles[role] = copy
        for role, profile in self.profiles.items():
            sock = workdir / f"{role}.notify"
            self.notify[role] = TunvpndDaemon(sock)
            # PYTHONPATH: measure this checkout (the commit the results record), not whatever
            # copy pip last installed into the venv
            env = {"TUNVPN_RUN_DIR": str(workdir / f"run-{role}"), "NOTIFY_SOCKET": str(sock),
                   "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.source)}
            self.spawn(lab, role, [sys.executable, "-m", "tunvpnd", "run", str(profile)],
                       workdir / f"tunvpnd-{role}.log", env)

        def ready() -> bool:
            self.check_alive()
            return all("READY=1" in n.poll() for n in self.notify.values())

        wait_until(ready, START_TIMEOUT, 0.05, "tunvpnd READY=1")
        self.scrapers = []
        if self.metrics:  # not in self.procs: their CPU time is not the tunnel's
            for role in self.profiles:
                log = workdir / f"scrape-{role}.log"
                self.logs.append(log)
                with open(log, "ab") as out:
                    self.scrapers.append(lab.spawn(
                        role, [sys.executable, "-c", SCRAPER, str(METRICS_PORT),
                               str(SCRAPE_LIMIT)], stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, cwd="/"))

    def facts(self) -> dict[str, str]:
        if not self.metrics:
            return super().facts()
        counts = []
        for role in self.profiles:
            last = tail(next(log for log in self.logs if log.name == f"scrape-{role}.log"), 1)
            ok, _, failed = last.partition(" ")
            counts.append(f"{role} {ok or 0} ok, {failed or 0} failed")
        return {"metrics": f"scrapes of /metrics: {'; '.join(counts)}"}

    @property
    def server_pid(self) -> int:
        return self.procs[0].pid

    def stop(self) -> None:
        for scraper in getattr(self, "scrapers", ()):
            if scraper.poll() is None:
                scraper.kill()
            scraper.wait(timeout=5)
        self.scrapers = []
        super().stop()
        for notify in self.notify.values():
            notify.close()


class OpenVPN(Tunnel):
    """OpenVPN 2.6 point-to-point over UDP, no TLS, no cipher, no DCO: a bare userspace tunnel."""

    needs = ("openvpn",)
    PORT = "1194"
    TUNED = ("--sndbuf", "4194304", "--rcvbuf", "4194304", "--txqueuelen", "2000")

    def __init__(self, tuned: bool = False) -> None:
        super().__init__()
        self.tuned = tuned
        self.name = "openvpn-tuned" if tuned else "openvpn-none"

    def common(self) -> list[str]:
        # --ping 1: without TLS each end only learns the other is there from its first packet,
        # which otherwise comes seconds later (4 s of every start); OpenVPN sends a ping only
        # after a second with nothing else sent, so none go out while a test runs
        return ["openvpn", "--dev", "tun0", "--dev-type", "tun", "--proto", "udp",
                "--disable-dco", "--allow-compression", "no", "--tun-mtu", MTU, "--ping", "1",
                "--verb", "3", *(self.TUNED if self.tuned else ())]

    def argv(self, role: str, *extra: str) -> list[str]:
        return [*self.common(), "--cipher", "none", "--auth", "none", *extra]

    def prepare(self, lab: Lab, workdir: Path) -> None:
        """Anything a config needs before its daemons start (keys, certificates)."""

    def ready_text(self) -> tuple[str, ...]:
        """What both ends' logs must say before the tunnel counts as up."""
        return ("Initialization Sequence Completed",)

    def says_ready(self, log: Path) -> bool:
        recent = tail(log, 80)
        return all(text in recent for text in self.ready_text())

    def start(self, lab: Lab, workdir: Path) -> None:
        run_ok(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.prepare(lab, workdir)
        server, client = (workdir / f"{self.name}-server.log", workdir / f"{self.name}-hostu.log")
        self.spawn(lab, "server", self.argv("server", "--lport", self.PORT,
                                            "--ifconfig", SERVER_TUN, CLIENT_TUN), server)

        def bound() -> bool:       # a client that starts first is refused, then waits 10 s
            self.check_alive()
            return "link local (bound)" in tail(server, 50)

        wait_until(bound, START_TIMEOUT, 0.05, f"{self.name}: the server's UDP socket")
        self.spawn(lab, "hostu", self.argv("hostu", "--nobind",
                                           "--remote", lab.addresses["server"], self.PORT,
                                           "--ifconfig", CLIENT_TUN, SERVER_TUN), client)

        def ready() -> bool:
            self.check_alive()
            return self.says_ready(server) and self.says_ready(client)

        wait_until(ready, START_TIMEOUT, 0.05,
                   f"{self.name}: {' and '.join(map(repr, self.ready_text()))} in both logs")
        run_ok(lab, "hostu", ["ip", "route", "add", LAN, "dev", "tun0"])

    def facts(self) -> dict[str, str]:
        """The client's own summary of its control and data channels, e.g. "Data Channel:
        cipher 'AES-256-GCM', peer-id: 0" (the last of each, so a renegotiation shows)."""
        found: dict[str, str] = {}
        with contextlib.suppress(OSError, IndexError):
            for line in self.logs[1].read_text(errors="replace").splitlines():
                for key in ("Control Channel:", "Data Channel:"):
                    if key in line:
                        found[key[:-1].lower().replace(" ", "_")] = line[line.index(key):]
        return found


class OpenVPNAES(OpenVPN):
    """OpenVPN 2.6 as it is deployed: TLS control channel, AES-256-GCM data channel, with the
    tuned buffers. Each end has a throw-away self-signed certificate made for this run and pins
    the other's by fingerprint (2.6's --peer-fingerprint: no CA needed)."""

    needs = ("openvpn", "openssl")
    CIPHER = "AES-256-GCM"

    def __init__(self) -> None:
        super().__init__(tuned=True)
        self.name = "openvpn-aes"
        self.pki: dict[str, tuple[Path, Path]] = {}
        self.fingerprints: dict[str, str] = {}

    def prepare(self, lab: Lab, workdir: Path) -> None:
        # openssl runs in the lab's namespaces like every other tool the bench starts; it
        # needs no network: keys and certificates are written to the work directory
        for role in ("server", "hostu"):
            key, cert = workdir / f"ovpn-{role}.key", workdir / f"ovpn-{role}.crt"
            run_ok(lab, role, ["openssl", "req", "-x509", "-batch", "-nodes", "-newkey", "ec",
                               "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2",
                               "-subj", f"/CN=tvb-{role}", "-keyout", str(key),
                               "-out", str(cert)])
            out = run_ok(lab, role, ["openssl", "x509", "-in", str(cert), "-noout",
                                     "-fingerprint", "-sha256"])
            self.pki[role] = (key, cert)
            self.fingerprints[role] = out.strip().partition("=")[2]   # "sha256 Fingerprint=AB:.."
            if not self.fingerprints[role]:
                raise RuntimeError(f"{self.name}: no SHA256 fingerprint in {out.strip()!r}")

    def argv(self, role: str, *extra: str) -> list[str]:
        key, cert = self.pki[role]
        other = self.fingerprints["hostu" if role == "server" else "server"]
        tls = ["--tls-server", "--dh", "none"] if role == "server" else ["--tls-client"]
        return [*self.common(), *tls, "--cert", str(cert), "--key", str(key),
                "--peer-fingerprint", other, "--data-ciphers", self.CIPHER, *extra]

    def ready_text(self) -> tuple[str, ...]:
        # 2.6 logs the negotiated data channel once per key exchange (init.c,
        # tls_print_deferred_options_results): proof the tunnel really carries AES-256-GCM
        return (*super().ready_text(), f"Data Channel: cipher '{self.CIPHER}'")


class WireGuardGo(Tunnel):
    """WireGuard in userspace (wireguard-go), configured with `wg` and `ip`."""

    name = "wireguard-go"
    needs = ("wireguard-go", "wg")
    PORT = "51820"
    SOCKET_DIR = Path("/var/run/wireguard")   # wireguard-go's UAPI sockets: shared by all netns

    def __init__(self) -> None:
        super().__init__()
        # The UAPI socket is named after the interface outside any namespace: unique names.
        tag = f"{time.monotonic_ns() % 10**6:06d}"
        self.ifnames = {"server": f"wgb{tag}s", "hostu": f"wgb{tag}c"}

    def start(self, lab: Lab, workdir: Path) -> None:
        pub = {}
        for role in self.ifnames:
            key = workdir / f"wg-{role}.key"
            key.touch(mode=0o600)
            key.write_text(run_ok(lab, role, ["wg", "genkey"]))
            pub[role] = lab.run(role, ["wg", "pubkey"], input=key.read_text(),
                                timeout=10).stdout.strip()
        for role, ifname in self.ifnames.items():
            self.spawn(lab, role, ["wireguard-go", ifname], workdir / f"wg-{role}.log",
                       env={"WG_PROCESS_FOREGROUND": "1"})

        def sockets() -> bool:
            self.check_alive()
            return all((self.SOCKET_DIR / f"{i}.sock").exists() for i in self.ifnames.values())

        wait_until(sockets, START_TIMEOUT, 0.05, "wireguard-go UAPI sockets")
        s, c = self.ifnames["server"], self.ifnames["hostu"]
        run_ok(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run_ok(lab, "server", ["wg", "set", s, "listen-port", self.PORT,
                               "private-key", str(workdir / "wg-server.key"),
                               "peer", pub["hostu"], "allowed-ips", f"{CLIENT_TUN}/32"])
        run_ok(lab, "hostu", ["wg", "set", c, "private-key", str(workdir / "wg-hostu.key"),
                              "peer", pub["server"], "allowed-ips", f"192.168.53.0/24,{LAN}",
                              "endpoint", f"{lab.addresses['server']}:{self.PORT}"])
        configure_tun(lab, self.ifnames)

    def stop(self) -> None:
        super().stop()
        for ifname in self.ifnames.values():      # left behind only if it was SIGKILLed
            (self.SOCKET_DIR / f"{ifname}.sock").unlink(missing_ok=True)


class PythonFloor(Tunnel):
    """pyfloor.py at both ends: read, send, receive, write and nothing else. A reference for
    what any CPython tunnel costs here, not a product."""

    name = "python-floor"
    PORT = "9091"
    IFNAME = "tun0"

    def start(self, lab: Lab, workdir: Path) -> None:
        run_ok(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        script = str(Path(__file__).resolve().parent / "pyfloor.py")
        self.spawn(lab, "server", [sys.executable, script, self.IFNAME, self.PORT],
                   workdir / "pyfloor-server.log")
        self.spawn(lab, "hostu", [sys.executable, script, self.IFNAME, "0",
                                  lab.addresses["server"], self.PORT],
                   workdir / "pyfloor-hostu.log")

        def ready() -> bool:
            self.check_alive()
            return all("ready" in tail(log) for log in self.logs)

        wait_until(ready, START_TIMEOUT, 0.05, "pyfloor.py to open its TUN")
        configure_tun(lab, {"server": self.IFNAME, "hostu": self.IFNAME})


class TunvpndWireGuard(Tunvpnd):
    """Our daemons on the secure wire: the wg-*.yaml example profiles with fresh keys (and a
    preshared key) written beside copies of them in the run's directory."""

    def __init__(self, source: Path = REPO, name: str = "") -> None:
        super().__init__(source=source, name=name or WIREGUARD)

    def start(self, lab: Lab, workdir: Path) -> None:
        examples = self.source / "etc" / "tunvpn"
        from tunvpnd.wireguard.keys import (
            encode_key,
            generate_private,
            generate_psk,
            public_key,
            write_key_file,
        )

        keys = {role: generate_private() for role in ("server", "client")}
        psk = generate_psk()
        for role, key in keys.items():
            write_key_file(workdir / f"wg-{role}.key", key)
        for role in ("server", "client"):
            write_key_file(workdir / f"wg-{role}.psk", psk)
        server = _edit(examples / "wg-server.yaml", {
            "X1zOuLTFQXGx8W70q9dK/430GoQloihiXw2qZ2NOtGE=": encode_key(public_key(keys["client"])),
            "# preshared_key_file: hostu.psk": "preshared_key_file: wg-server.psk"})
        client = _edit(examples / "wg-client.yaml", {
            "ADQWW02LysytVpqcm1xrw7yzlUHZ74b+QSsFsam0hG4=": encode_key(public_key(keys["server"])),
            "# preshared_key_file: wg-client.psk": "preshared_key_file: wg-client.psk"})
        for role, text in (("server", server), ("hostu", client)):
            profile = workdir / f"wg-{'server' if role == 'server' else 'client'}.yaml"
            profile.write_text(text)
            self.profiles[role] = profile
        super().start(lab, workdir)


def _edit(example: Path, replacements: dict[str, str]) -> str:
    """The example profile's text with each placeholder replaced; an error if one is missing
    (the example changed: better to fail here than to measure a tunnel that never comes up)."""
    text = example.read_text()
    for old, new in replacements.items():
        if old not in text:
            raise RuntimeError(f"{example}: no {old!r} to replace")
        text = text.replace(old, new)
    return text


WIREGUARD = "tunvpnd-wireguard"
BASELINE = "tunvpnd-baseline"
BASELINE_WG = "tunvpnd-wireguard-baseline"


def baseline(checkout: Path) -> Tunvpnd:
    """tunvpnd as another checkout has it (e.g. `git worktree add /tmp/base REV`), with that
    checkout's example profiles: the before column of a before/after comparison."""
    examples = checkout / "etc" / "tunvpn"
    return Tunvpnd(examples / "server.yaml", examples / "client.yaml", checkout, BASELINE)


def with_metrics(tunnel: Tunvpnd) -> Tunvpnd:
    """The same config with metrics on and scraped, named NAME+metrics."""
    tunnel.metrics = True
    tunnel.name += METRICS
    return tunnel


def all_configs(baseline_checkout: Path | None = None, metrics: bool = False) -> list[Tunnel]:
    """A fresh instance of every configuration, in table order. `metrics`: tunvpnd+metrics
    and tunvpnd-wireguard+metrics as well, each after the same config without."""
    before = [baseline(baseline_checkout)] if baseline_checkout else []
    before_wg = [TunvpndWireGuard(baseline_checkout, BASELINE_WG)] if baseline_checkout and \
        (baseline_checkout / "etc" / "tunvpn" / "wg-server.yaml").is_file() else []
    plain_on = [with_metrics(Tunvpnd())] if metrics else []
    wg_on = [with_metrics(TunvpndWireGuard())] if metrics else []
    return [Routing(), Tunvpnd(), *plain_on, *before, TunvpndWireGuard(), *wg_on, *before_wg,
            OpenVPN(), OpenVPN(tuned=True), OpenVPNAES(), WireGuardGo(), PythonFloor()]


CONFIG_NAMES = [c.name for c in all_configs()]


@contextlib.contextmanager
def running(tunnel: Tunnel, prefix: str) -> Iterator[Lab]:
    """`tunnel` up in a fresh lab named `prefix`, HostV reachable through it; afterwards the
    tunnel stopped and the lab torn down, whatever happened."""
    lab = Lab(prefix)
    workdir = Path(tempfile.mkdtemp(prefix=prefix[:3]))  # short: AF_UNIX paths are limited
    try:
        lab.up()
        tunnel.start(lab, workdir)
        wait_reachable(lab)
        yield lab
    finally:
        try:
            tunnel.stop()
        finally:
            lab.down()
            shutil.rmtree(workdir, ignore_errors=True)
