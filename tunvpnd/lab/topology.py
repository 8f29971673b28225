"""The SEED VPN lab topology in network namespaces: build it, run processes in it, tear it down.

    HostU   10.9.0.5  ─┐                            ┌─ HostV 192.168.60.5
    HostU2  10.9.0.6  ─┼─ br-net ─ VPN server ─ br-lan ┘   (route 192.168.53.0/24 via .60.11)
    ...               ─┘  10.9.0.11   192.168.60.11

Every host is a network namespace named f"{prefix}-{role}". Each LAN is a Linux bridge inside
one extra "switch" namespace (f"{prefix}-sw"), and each host interface is one end of a veth pair
whose other end is a port of that bridge, so more clients join a LAN with one table row.
Nothing is configured in the root namespace except creating and removing the namespaces; no
namespace has a default route, and no link leads out of the lab.

`Lab(prefix, internet=True)` (opt-in, for full-tunnel tests) is a road warrior's world instead:

    HostU 10.8.0.5 ─ br-home ─ router ─ br-net ─ VPN server ─ br-lan ─ HostV  (as above)
          fd08::5           .1 / .1       10.9.0.11 \
                    (default via the router)          └─ br-inet ─ inet 203.0.113.80, fd13::80
                                                        .11, fd13::11   (default via the server)

HostU's default routes (IPv4 and IPv6) go through the router, whose own default is the
server's public side (10.9.0.11, fd09::11); the server, forwarding both families, is the way
to the "internet" host, and inet's default route leads back through the server (so it reaches
the tunnel networks 192.168.53.0/24 and fd53::/64 without masquerade). Every host of that world
has IPv6 addresses too (no DAD). The default lab is left exactly as it is.

Everything is built with pyroute2 (works with 0.7.2 and 0.9.x); processes enter a host's
namespace with `pyroute2.netns.setns` in the child before exec.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_interface, ip_network
from pathlib import Path

from pyroute2 import NetNS, netns

DEFAULT_PREFIX = "tvlab"
LAB_RUN_ROOT = Path("/run/tunvpnd-lab")
NETNS_DIR = Path(getattr(netns, "NETNS_RUN_DIR", "/var/run/netns"))
IFA_F_NODAD = 0x02              # IPv6 lab addresses are usable at once (no duplicate detection)
SWITCH = "sw"                   # role-like suffix of the switch namespace holding the bridges

# ---------------------------------------------------------------------------------------------
# The topology, as data.


@dataclass(frozen=True)
class HostSpec:
    role: str
    # (lan, "address/prefixlen"), eth0, eth1, ...; more addresses of a link after a space
    links: tuple[tuple[str, str], ...]
    routes: tuple[tuple[str, str], ...] = field(default=())   # (destination network, gateway)
    forwarding: bool = False        # IPv4 and IPv6 forwarding on (a router)


LANS: dict[str, str] = {            # lan key -> network; the bridge is f"br-{key}"
    "net": "10.9.0.0/24",           # the "internet" between clients and the VPN server
    "lan": "192.168.60.0/24",       # the private network behind the VPN server
}

BASE_HOSTS: tuple[HostSpec, ...] = (
    HostSpec("hostu", (("net", "10.9.0.5/24"),)),
    HostSpec("server", (("net", "10.9.0.11/24"), ("lan", "192.168.60.11/24"))),
    HostSpec("hostv", (("lan", "192.168.60.5/24"),),
             routes=(("192.168.53.0/24", "192.168.60.11"),)),
)

# The opt-in "internet" world (Lab(internet=True)): see the module docstring.
INTERNET_LANS: dict[str, str] = {
    "home": "10.8.0.0/24",          # HostU's own LAN, behind the router
    "net": "10.9.0.0/24",
    "lan": "192.168.60.0/24",
    "inet": "203.0.113.0/24",       # the "internet" beyond the VPN server
}

INTERNET_HOSTS: tuple[HostSpec, ...] = (
    HostSpec("hostu", (("home", "10.8.0.5/24 fd08::5/64"),),
             routes=(("0.0.0.0/0", "10.8.0.1"), ("::/0", "fd08::1"))),
    HostSpec("router", (("home", "10.8.0.1/24 fd08::1/64"), ("net", "10.9.0.1/24 fd09::1/64")),
             routes=(("0.0.0.0/0", "10.9.0.11"), ("::/0", "fd09::11")), forwarding=True),
    HostSpec("server", (("net", "10.9.0.11/24 fd09::11/64"), ("lan", "192.168.60.11/24"),
                        ("inet", "203.0.113.11/24 fd13::11/64")),
             routes=(("10.8.0.0/24", "10.9.0.1"), ("fd08::/64", "fd09::1")), forwarding=True),
    HostSpec("hostv", (("lan", "192.168.60.5/24"),),
             routes=(("192.168.53.0/24", "192.168.60.11"),)),
    HostSpec("inet", (("inet", "203.0.113.80/24 fd13::80/64"),),
             routes=(("0.0.0.0/0", "203.0.113.11"), ("::/0", "fd13::11"))),
)

CLIENT_NET = "net"                  # extra clients ("hostu2", "hostu3", ...) join this LAN
FIRST_EXTRA_CLIENT_HOST = 6         # hostu2 = 10.9.0.6, then the next free host numbers

_ROLE_RE = re.compile(r"^[a-z0-9]+$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _extra_clients(count: int, used: set[IPv4Address]) -> list[HostSpec]:
    net = IPv4Network(LANS[CLIENT_NET])
    specs: list[HostSpec] = []
    candidates = (h for h in net.hosts() if int(h) - int(net.network_address)
                  >= FIRST_EXTRA_CLIENT_HOST)
    for n in range(2, count + 2):
        addr = next((a for a in candidates if a not in used), None)
        if addr is None:
            raise ValueError(f"no room for {count} extra clients in {net}")
        used.add(addr)
        specs.append(HostSpec(f"hostu{n}", ((CLIENT_NET, f"{addr}/{net.prefixlen}"),)))
    return specs


# ---------------------------------------------------------------------------------------------
# Small helpers.


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               what: str = "") -> None:
    """Poll `predicate` until it returns something true; TimeoutError naming `what` if not."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate!r}")
        time.sleep(interval)


def _ns_name(prefix: str, role: str) -> str:
    return f"{prefix}-{role}"


def leftover_namespaces(prefix: str) -> list[str]:
    """Named network namespaces that belong to the lab `prefix` (exactly: f"{prefix}-{role}")."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        head, sep, role = name.rpartition("-")
        if sep and head == prefix and _ROLE_RE.match(role):
            found.append(name)
    return sorted(found)


def _ns_inode(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None if gone or a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _netns_handle(name: str) -> NetNS:
    """An RTNL handle inside the existing namespace `name` (never creates one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return NetNS(name, flags=0)


def _setns_preexec(name: str) -> Callable[[], None]:
    def enter() -> None:
        netns.setns(name, flags=0)
    return enter


_SCRUB_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
              "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


# ---------------------------------------------------------------------------------------------
# The lab.


class Lab:
    """The lab topology under one prefix. `with Lab(prefix) as lab:` builds it and tears it down."""

    def __init__(self, prefix: str | None = None, extra_clients: int = 0,
                 internet: bool = False) -> None:
        self.prefix = prefix or DEFAULT_PREFIX
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"bad lab prefix {self.prefix!r}")
        self.internet = internet
        base = INTERNET_HOSTS if internet else BASE_HOSTS
        self.lans: dict[str, str] = INTERNET_LANS if internet else LANS
        used = {IPv4Interface(a.split()[0]).ip for h in base for _, a in h.links}
        self.specs: tuple[HostSpec, ...] = base + tuple(_extra_clients(extra_clients, used))
        self.hosts: dict[str, str] = {s.role: _ns_name(self.prefix, s.role) for s in self.specs}
        self.addresses: dict[str, str] = {s.role: str(IPv4Interface(s.links[0][1].split()[0]).ip)
                                          for s in self.specs}
        self.switch: str = _ns_name(self.prefix, SWITCH)
        self.run_dir: Path = LAB_RUN_ROOT / self.prefix
        self._procs: list[subprocess.Popen] = []
        for spec in self.specs:
            for lan, _ in spec.links:
                if len(f"{spec.role}-{lan}") > 15:
                    raise ValueError(f"role {spec.role!r} too long for a bridge port name")

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, *self.hosts.values()]

    def up(self) -> None:
        """Build the topology; a stale lab with the same prefix is torn down first."""
        if leftover_namespaces(self.prefix) or (self.run_dir / "pids.json").exists():
            self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        handles: dict[str, NetNS] = {}
        try:
            for name in self.namespaces:
                netns.create(name)
                handles[name] = ipr = _netns_handle(name)
                # Guard: a handle that does not really point into the new namespace would
                # configure the wrong one. A fresh namespace holds exactly one link, lo.
                names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
                if names != ["lo"]:
                    raise RuntimeError(f"netns {name} is not fresh (links {names}); refusing")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                if self.internet:  # no DAD: link-local addresses (and routes) final at once,
                    self._sysctl(name, {  # so a test's "before" is the state that stays
                        "/proc/sys/net/ipv6/conf/all/accept_dad": "0",
                        "/proc/sys/net/ipv6/conf/default/accept_dad": "0"})

            sw = handles[self.switch]
            bridges = {}
            for lan in self.lans:
                sw.link("add", ifname=f"br-{lan}", kind="bridge")
                bridges[lan] = sw.link_lookup(ifname=f"br-{lan}")[0]
                sw.link("set", index=bridges[lan], state="up")

            for spec in self.specs:
                ipr = handles[self.hosts[spec.role]]
                for n, (lan, address) in enumerate(spec.links):
                    ifname, port = f"eth{n}", f"{spec.role}-{lan}"
                    ipr.link("add", ifname=ifname, kind="veth",
                             peer={"ifname": port, "net_ns_fd": self.switch})
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    for text in address.split():
                        iface = ip_interface(text)
                        extra = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
                        ipr.addr("add", index=idx, address=str(iface.ip),
                                 prefixlen=iface.network.prefixlen, **extra)
                    ipr.link("set", index=idx, state="up")
                    pidx = sw.link_lookup(ifname=port)[0]
                    sw.link("set", index=pidx, master=bridges[lan])
                    sw.link("set", index=pidx, state="up")
                for dst, gateway in spec.routes:
                    net = ip_network(dst)
                    ipr.route("add", family=socket.AF_INET if net.version == 4
                              else socket.AF_INET6, dst=str(net.network_address),
                              dst_len=net.prefixlen, gateway=gateway)
        finally:
            for ipr in handles.values():
                ipr.close()
        for spec in self.specs:
            if spec.forwarding:  # IPv4 and IPv6: a router
                self._sysctl(self.hosts[spec.role], {
                    "/proc/sys/net/ipv4/ip_forward": "1",
                    "/proc/sys/net/ipv6/conf/all/forwarding": "1"})

    @staticmethod
    def _sysctl(name: str, settings: dict[str, str]) -> None:
        """Write sysctls of namespace `name` (/proc/sys/net shows the reader's namespace)."""
        pid = os.fork()
        if pid == 0:  # the child enters the namespace and writes; we never leave ours
            code = 1
            try:
                netns.setns(name, flags=0)
                for path, value in settings.items():
                    with open(path, "w") as f:
                        f.write(value)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"could not set {', '.join(settings)} in {name}")

    def down(self, keep_logs: bool = False) -> None:
        """Stop the lab's processes (by PID), delete its namespaces and its run directory."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        victims = self._recorded_processes() + self._processes_in_namespaces()
        _stop_pids(victims, children=self._procs)
        self._procs.clear()
        for name in leftover_namespaces(self.prefix):
            with contextlib.suppress(FileNotFoundError):
                netns.remove(name)
        if keep_logs:
            (self.run_dir / "pids.json").unlink(missing_ok=True)
            for role_dir in self.run_dir.glob("*/"):
                shutil.rmtree(role_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)   # LAB_RUN_ROOT itself stays

    # -- processes ----------------------------------------------------------------------------

    def spawn(self, role: str, argv: list[str], env: dict | None = None,
              **popen_kw) -> subprocess.Popen:
        """Start `argv` inside `role`'s namespace; tracked (and recorded) for down().

        `env` adds to (not replaces) the current environment; systemd's NOTIFY_SOCKET and
        friends are dropped so a lab process never talks to the caller's service manager.
        """
        name = self.hosts[role]
        ino = _ns_inode(NETNS_DIR / name)
        if ino is None:
            raise RuntimeError(f"lab host {role!r} is not up (no netns {name})")
        full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
        full_env.update(env or {})
        if "preexec_fn" in popen_kw:
            raise TypeError("spawn() sets preexec_fn itself")
        popen_kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(argv, env=full_env, preexec_fn=_setns_preexec(name), **popen_kw)
        self._procs.append(proc)
        start = _proc_starttime(proc.pid)
        if start is not None:
            self._record(role, proc.pid, start, ino, argv)
        return proc

    def run(self, role: str, argv: list[str], timeout: float = 30,
            **kw) -> subprocess.CompletedProcess:
        """Run `argv` in `role`'s namespace to completion; text stdout/stderr captured."""
        check = kw.pop("check", False)
        data = kw.pop("input", None)
        if data is not None:
            kw["stdin"] = subprocess.PIPE
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        proc = self.spawn(role, argv, **kw)
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            if proc in self._procs:
                self._procs.remove(proc)
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def _record(self, role: str, pid: int, start: int, ino: tuple[int, int],
                argv: list[str]) -> None:
        entries = [e for e in self._read_pids() if _entry_alive(e)]
        entries.append({"role": role, "pid": pid, "start": start, "netns": list(ino),
                        "argv": [str(a) for a in argv]})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "pids.json.tmp"
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(self.run_dir / "pids.json")

    def _read_pids(self) -> list[dict]:
        try:
            data = json.loads((self.run_dir / "pids.json").read_text())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def _recorded_processes(self) -> list[int]:
        return [e["pid"] for e in self._read_pids() if _entry_alive(e)]

    def running_roles(self) -> set[str]:
        """Roles with a recorded process still alive (also one started by an earlier `up`)."""
        return {e.get("role") for e in self._read_pids() if _entry_alive(e)}

    def _processes_in_namespaces(self) -> list[int]:
        """PIDs living in this lab's namespaces (e.g. left over by a crashed run)."""
        inodes = {_ns_inode(NETNS_DIR / n) for n in leftover_namespaces(self.prefix)} - {None}
        if not inodes:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in (1, os.getpid()):
                if _ns_inode(f"/proc/{entry}/ns/net") in inodes:
                    pids.append(int(entry))
        return pids


def _entry_alive(entry: dict) -> bool:
    """Is the recorded process still that very process (same start time, same netns)?"""
    try:
        pid, start, ino = int(entry["pid"]), int(entry["start"]), tuple(entry["netns"])
    except (KeyError, TypeError, ValueError):
        return False
    return _proc_starttime(pid) == start and _ns_inode(f"/proc/{pid}/ns/net") == ino


def _stop_pids(pids: Sequence[int], children: Sequence[subprocess.Popen] = (),
               term_wait: float = 3.0, kill_wait: float = 2.0) -> None:
    """SIGTERM, wait, SIGKILL, wait. `children` are Popen objects of ours, reaped here."""
    by_pid = {p.pid: p for p in children}
    targets = {pid: _proc_starttime(pid) for pid in set(pids) | set(by_pid)}

    def alive(pid: int) -> bool:
        if pid in by_pid:
            return by_pid[pid].poll() is None
        start = _proc_starttime(pid)
        return start is not None and start == targets[pid]

    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        live = [pid for pid in targets if alive(pid)]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda live=live: not any(alive(p) for p in live), wait, 0.02,
                       "processes to exit")
    for p in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=0.1)


# ---------------------------------------------------------------------------------------------
# Readiness checks (netlink inside a namespace).


def tun_route_present(ns_name: str, network: str) -> bool:
    """Does `ns_name` route `network` out of a TUN link that is up?"""
    net = IPv4Network(network)
    try:
        ipr = _netns_handle(ns_name)
    except OSError:
        return False
    try:
        tuns = set()
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind == "tun" and link["flags"] & 1:             # IFF_UP
                tuns.add(link["index"])
        for route in ipr.get_routes(family=socket.AF_INET):
            if (route.get_attr("RTA_OIF") in tuns and route["dst_len"] == net.prefixlen
                    and route.get_attr("RTA_DST") == str(net.network_address)):
                return True
        return False
    finally:
        ipr.close()
