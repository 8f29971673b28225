"""Shared fixtures: a fresh lab topology per test, and tunvpnd daemons run inside it.

Every test gets namespaces with a unique prefix, torn down even when the test fails, and each
daemon gets its own sd_notify socket so tests wait on what the daemon tells systemd (READY=1,
STATUS=...), not on sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunvpnd.lab import Lab, leftover_namespaces, wait_until

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "etc" / "tunvpn"
# Daemons and helpers run as `python -m tunvpnd` from cwd "/": make them import this checkout,
# not the copy pip installed into the venv (which lags behind until the next install).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO),
                                                          os.environ.get("PYTHONPATH"))))


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"


@contextlib.contextmanager
def fresh_lab(prefix: str, **kwargs) -> Iterator[Lab]:
    """A lab (Lab's keyword arguments) under a unique name made from `prefix`; torn down
    afterwards, and not one of its namespaces left."""
    topology = Lab(unique(prefix), **kwargs)
    topology.up()
    try:
        yield topology
    finally:
        topology.down()
        assert leftover_namespaces(topology.prefix) == []


@pytest.fixture
def lab(request):
    with fresh_lab("tvt", extra_clients=getattr(request, "param", 0)) as topology:
        yield topology


@pytest.fixture
def sockdir():
    """A short directory for AF_UNIX sockets (their paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tv"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """One `tunvpnd run` in a lab host, with PATH empty, its own notify socket and run dir."""

    def __init__(self, lab: Lab, role: str, profile: str, workdir: Path, name: str,
                 env: dict | None = None, wrapper: list[str] | None = None) -> None:
        self.lab, self.role, self.name = lab, role, name
        self.wrapper = wrapper or []  # runs the daemon through e.g. unshare
        self.profile = workdir / f"{name}.yaml"
        self.profile.write_text(profile)
        self.run_dir = workdir / f"run-{name}"
        self.logfile = workdir / f"{name}.log"
        self.notify_path = workdir / f"{name}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.messages: list[tuple[float, str]] = []
        self.env = {"PATH": "", "TUNVPN_RUN_DIR": str(self.run_dir),
                    "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Daemon:
        with open(self.logfile, "ab") as log:
            self.proc = self.lab.spawn(
                self.role,
                [*self.wrapper, sys.executable, "-m", "tunvpnd", "run", str(self.profile)],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd="/")
        if wait:
            self.wait_for("READY=1")
        return self

    def restart(self) -> Daemon:
        mark = len(self.fields())
        self.start(wait=False)
        self.wait_for("READY=1", after=mark)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll_messages(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.notify.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[str]:
        """Every KEY=value the daemon has sent, in order."""
        return [f for _, m in self.poll_messages() for f in m.split("\n") if f]

    def wait_for(self, field: str, timeout: float = 15.0, after: int = 0) -> int:
        """Wait until a notify message holds `field` (exactly, or as a prefix ending in '=...'),
        among fields numbered `after` and later; return its index."""
        def seen() -> int | None:
            for i, f in enumerate(self.fields()):
                if i >= after and (f == field or (field.endswith("=") and f.startswith(field))):
                    return i
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before "
                                     f"{field!r}:\n{self.log()}")
            return None

        found: list[int] = []

        def check() -> bool:
            index = seen()
            if index is not None:
                found.append(index)
            return bool(found)

        wait_until(check, timeout, what=f"{self.name}: {field}")
        return found[0]

    def status(self) -> str:
        statuses = [f[7:] for f in self.fields() if f.startswith("STATUS=")]
        return statuses[-1] if statuses else ""

    def wait_status(self, predicate, timeout: float = 15.0) -> str:
        def check() -> bool:
            if predicate(self.status()):
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}; last "
                                     f"STATUS {self.status()!r}\n{self.log()}")
            return False

        try:
            wait_until(check, timeout, what=f"{self.name} STATUS matching")
        except TimeoutError as error:
            raise AssertionError(f"{error}; last: {self.status()!r}\n{self.log()}") from None
        return self.status()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Stop it (SIGTERM, so that it removes what it made; SIGKILL if it hangs), then
        remove a WireGuard UAPI socket it left behind (the path is global, not per netns)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.notify.close()
        remove_stale_uapi_socket(self.profile.read_text())


def remove_stale_uapi_socket(profile: str) -> None:
    """/run/wireguard/IFNAME.sock of a wireguard profile, if no process answers on it."""
    import yaml

    try:
        data = yaml.safe_load(profile)
        name = data["interface"]["name"] if data.get("wire") == "wireguard" else None
    except Exception:  # noqa: BLE001 - a test's broken profile: nothing to clean up
        return
    path = Path("/run/wireguard") / f"{name}.sock"
    if not name or not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)   # stale: its daemon is gone
    except OSError:
        pass
    finally:
        probe.close()


@pytest.fixture
def daemons(sockdir):
    """Start daemons with `daemons(lab, role, profile_text, name=...)`; all killed at the end."""
    started: list[Daemon] = []

    def start(lab: Lab, role: str, profile: str, name: str | None = None, wait: bool = True,
              env: dict | None = None, wrapper: list[str] | None = None) -> Daemon:
        daemon = Daemon(lab, role, profile, sockdir, name or role, env, wrapper)
        started.append(daemon)
        return daemon.start(wait)

    yield start
    for daemon in started:
        daemon.close()


def in_ns(lab: Lab, role: str, argv: list[str], timeout: float = 30,
          check: bool = True) -> subprocess.CompletedProcess:
    result = lab.run(role, argv, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} in {role} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


def ping(lab: Lab, role: str, address: str, count: int = 3, check: bool = True,
         family: str = "-4") -> subprocess.CompletedProcess:
    return in_ns(lab, role, ["ping", family, "-c", str(count), "-i", "0.2", "-W", "2", address],
                 check=check)


def ip_json(lab: Lab, role: str, *args: str) -> list[dict]:
    return json.loads(in_ns(lab, role, ["ip", "-j", *args]).stdout or "[]")


def tun_links(lab: Lab, role: str) -> list[dict]:
    return [link for link in ip_json(lab, role, "-d", "link", "show")
            if link.get("linkinfo", {}).get("info_kind") == "tun"]


def forwarding(lab: Lab, role: str) -> dict[str, int]:
    """Each non-lo link's IPv4 forwarding flag, as /proc/sys shows it inside the namespace."""
    out = in_ns(lab, role, ["sh", "-c", "grep . /proc/sys/net/ipv4/conf/*/forwarding"]).stdout
    flags = {}
    for line in out.splitlines():
        path, value = line.rsplit(":", 1)
        name = path.split("/")[-2]
        if name not in ("lo", "all", "default"):
            flags[name] = int(value)
    return flags


CLIENT = """\
mode: client
server: {server}:9090
interface:
  name: tun0
  address: {address}
routes: [{routes}]
keepalive: {keepalive}
log:
  level: debug
"""

SERVER = """\
mode: server
listen: 0.0.0.0:9090
interface:
  name: tun0
  address: {address}
forward: true
{extra}
log:
  level: debug
"""


def client_profile(server: str = "10.9.0.11", address: str = "192.168.53.99/24",
                   routes: str = "192.168.60.0/24", keepalive: int = 25) -> str:
    return CLIENT.format(server=server, address=address, routes=routes, keepalive=keepalive)


def server_profile(address: str = "192.168.53.1/24", extra: str = "") -> str:
    return SERVER.format(address=address, extra=extra)


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@contextlib.contextmanager
def pinging_through(lab: Lab, daemon: Daemon, pings: int) -> Iterator[list]:
    """Around an attack on `daemon`'s sockets: HostU pings HostV `pings` times, 0.1 s apart,
    all along. Yields a list for the sockets the body holds open, closed afterwards whatever
    happened. Once the body is done: every ping answered, and the daemon's RSS grew by less
    than 8 MiB."""
    before = rss_kib(daemon.pid)
    pinger = lab.spawn("hostu", ["ping", "-c", str(pings), "-i", "0.1", "-W", "1",
                                 lab.addresses["hostv"]], stdout=subprocess.PIPE, text=True)
    held: list = []
    try:
        yield held
        out, _ = pinger.communicate(timeout=60)
        assert pinger.returncode == 0 and " 0% packet loss" in out, out
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.communicate()
        for sock in held:
            sock.close()
    assert rss_kib(daemon.pid) - before < 8 * 1024, (before, rss_kib(daemon.pid))  # KiB


def sent_until_hung_up(sock: socket.socket, chunk: bytes, limit: int = 10 * 1024 * 1024) -> int:
    """Send `chunk` again and again until the peer hangs up (EPIPE, ECONNRESET) or `limit`
    bytes are out; how many were sent."""
    sent = 0
    try:
        while sent < limit:
            sent += sock.send(chunk)
    except OSError:
        pass
    return sent


@pytest.fixture
def wggo_factory(lab, tmp_path):
    """Start wireguard-go with `wggo_factory(role)` (in `lab`, or `on=` another lab); every
    one stopped by PID and its /run/wireguard/NAME.sock removed at the end, even on failure."""
    from tests.test_wginterop import WireguardGo

    started: list = []

    def start(role: str, on: Lab | None = None):
        workdir = tmp_path / f"wg{len(started)}-{role}"
        workdir.mkdir()
        instance = WireguardGo(on or lab, role, workdir)
        started.append(instance)
        instance.start()
        return instance

    try:
        yield start
    finally:
        for instance in started:
            instance.stop()
            assert not instance.sock.exists()
            if instance.log.exists():
                print(instance.log.read_text(errors="replace"))
