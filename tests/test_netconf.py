"""tun.py and netconf.py against real TUN devices and real netlink, in throwaway namespaces.

Every test body that touches the network runs in a forked child that has joined a namespace
this test created (`in_ns`); the `make_ns` fixture removes the namespaces afterwards, whatever
happened.  Nothing here touches the root namespace.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from ipaddress import ip_interface
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from tunvpnd.netconf import RTPROT_TUNVPND, NetConfig, NetConfigError
from tunvpnd.tun import IFF_TUN, TUNSETIFF, TunExists, check_free, open_tun, open_tun_offload

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN")

IP = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "ip"
PING = shutil.which("ping", path=os.environ.get("PATH", "") + ":/usr/bin:/bin") or "ping"
IFF_UP = 0x1
IFA_F_NODAD, IFA_F_TENTATIVE = 0x02, 0x40


# -- namespace plumbing ---------------------------------------------------------------------


@pytest.fixture
def make_ns() -> Iterator[Callable[[], str]]:
    """Factory for fresh, uniquely named network namespaces; all removed at teardown."""
    created: list[str] = []

    def make() -> str:
        name = f"tvnc-{os.getpid()}-{secrets.token_hex(3)}"
        netns.create(name)
        created.append(name)
        return name

    yield make
    for name in created:
        netns.remove(name)


def in_ns(ns: str, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
    """Run fn(*args) in a forked child that joined `ns`; return its result or fail with its
    traceback.  The child is always reaped, so no process outlives the test."""
    ctx = multiprocessing.get_context("fork")
    rx, tx = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            netns.setns(ns, flags=0)
            tx.send(("ok", fn(*args)))
        except BaseException:
            tx.send(("error", traceback.format_exc()))

    proc = ctx.Process(target=child)
    proc.start()
    try:
        if not rx.poll(timeout):
            raise TimeoutError(f"{fn.__name__} in {ns} took more than {timeout}s")
        status, value = rx.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        pytest.fail(f"in namespace {ns}:\n{value}", pytrace=False)
    return value


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


def ping(ns: str, dst: str) -> bool:
    r = subprocess.run([IP, "netns", "exec", ns, PING, "-c1", "-W1", "-n", dst],
                       capture_output=True, timeout=10)
    return r.returncode == 0


def wait_for(cond: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# -- helpers that run inside a namespace ----------------------------------------------------


def sysctl_fwd(dev: str, value: int | None = None) -> int:
    """Read (or set) a link's IPv4 forwarding flag through /proc: the independent witness.
    /proc/sys/net shows the namespace of the process that opens it."""
    path = f"/proc/sys/net/ipv4/conf/{dev}/forwarding"
    if value is not None:
        with open(path, "w") as f:
            f.write(str(value))
    with open(path) as f:
        return int(f.read())


def addresses(ipr: IPRoute, index: int) -> dict[str, int]:
    """Non-link-local addresses of a link -> their IFA flags."""
    out = {}
    for m in ipr.get_addr(index=index):
        a = ip_interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
        if not a.ip.is_link_local:
            out[str(a)] = m.get_attr("IFA_FLAGS") or m["flags"]
    return out


def routes(ipr: IPRoute, index: int, proto: int = RTPROT_TUNVPND) -> set[str]:
    out = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for m in ipr.get_routes(family=family):
            if m["proto"] == proto and m.get_attr("RTA_OIF") == index:
                dst = m.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                out.add(f"{dst}/{m['dst_len']}")
    return out


def veth_pair(ipr: IPRoute, a: str, b: str) -> tuple[int, int]:
    ipr.link("add", ifname=a, kind="veth", peer=b)
    ia, ib = ipr.link_lookup(ifname=a)[0], ipr.link_lookup(ifname=b)[0]
    for i in (ia, ib):
        ipr.link("set", index=i, state="up")
    return ia, ib


def dead_pid() -> int:
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    return p.pid


# -- tun.py ---------------------------------------------------------------------------------


def test_open_tun_gives_a_working_nonblocking_fd(make_ns):
    def body():
        fd, name = open_tun("tvt%d")
        with IPRoute() as ipr:
            assert name.startswith("tvt") and name[3:].isdigit()
            assert not os.get_blocking(fd) and not os.get_inheritable(fd)
            idx = ipr.link_lookup(ifname=name)[0]
            with pytest.raises(BlockingIOError):
                os.read(fd, 2000)
            ipr.addr("add", index=idx, address="10.9.0.1", prefixlen=24)
            ipr.link("set", index=idx, state="up")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"hello", ("10.9.0.2", 9999))
            deadline = time.monotonic() + 5
            while True:  # skip anything else the kernel may send first
                assert select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]
                pkt = os.read(fd, 2000)
                if pkt[0] >> 4 == 4 and pkt[9] == socket.IPPROTO_UDP:
                    break
            # IFF_NO_PI: the first byte is the IP header, no packet-information prefix
            assert pkt[16:20] == socket.inet_aton("10.9.0.2") and pkt.endswith(b"hello")
        os.close(fd)
        return name

    assert in_ns(make_ns(), body).startswith("tvt")


def test_open_tun_errors_name_the_device(make_ns):
    def body():
        with pytest.raises(OSError, match="x" * 20):
            open_tun("x" * 20)
        with pytest.raises(OSError, match="^interface lo exists already"):
            open_tun("lo")  # exists and is not a TUN

    in_ns(make_ns(), body)


def test_closing_the_fd_removes_the_device_and_its_routes(make_ns, tmp_path):
    def body():
        with NetConfig(tmp_path / "s.state") as nc:
            fd, name = open_tun()
            idx = nc.setup_interface(name, ["10.9.0.1/24"], 1400)
            nc.sync_routes(idx, ["10.20.0.0/16"])
            os.close(fd)
            with IPRoute() as ipr:
                assert wait_for(lambda: not ipr.link_lookup(ifname=name))
                assert not routes(ipr, idx)

    in_ns(make_ns(), body)


# -- netconf.py -----------------------------------------------------------------------------


def test_setup_interface_sets_mtu_exact_addresses_and_up(make_ns, tmp_path):
    def body():
        fd, name = open_tun()
        with NetConfig(tmp_path / "s.state") as nc, IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=idx, address="10.99.0.1", prefixlen=24)  # a stray one
            assert nc.setup_interface(name, ["10.9.0.1/24", "fd00:9::1/64"], 1400) == idx
            link = ipr.get_links(idx)[0]
            assert link.get_attr("IFLA_MTU") == 1400 and link["flags"] & IFF_UP
            assert not link["flags"] & 0x1000  # IFF_MULTICAST: no MLD reports to drop
            got = addresses(ipr, idx)
            assert set(got) == {"10.9.0.1/24", "fd00:9::1/64"}
            assert got["fd00:9::1/64"] & IFA_F_NODAD
            assert not got["fd00:9::1/64"] & IFA_F_TENTATIVE  # usable at once
            # Again with other values: still exact, and idempotent.
            for _ in range(2):
                nc.setup_interface(name, [ip_interface("10.9.0.1/25")], 1380)
                assert set(addresses(ipr, idx)) == {"10.9.0.1/25"}
                assert ipr.get_links(idx)[0].get_attr("IFLA_MTU") == 1380
        os.close(fd)

    in_ns(make_ns(), body)


def test_sync_routes_manages_only_its_own_tagged_routes(make_ns, tmp_path):
    def body():
        fd, name = open_tun()
        with NetConfig(tmp_path / "s.state") as nc, IPRoute() as ipr:
            idx = nc.setup_interface(name, ["10.9.0.1/24", "fd00:9::1/64"], 1400)
            v0, _ = veth_pair(ipr, "v0", "v1")
            # Someone else's route on the same device, and a tagged one on another device.
            ipr.route("add", dst="10.77.0.0", dst_len=16, oif=idx, proto=4, scope=253)
            ipr.route("add", dst="10.88.0.0", dst_len=16, oif=v0, proto=RTPROT_TUNVPND,
                      scope=253)
            want = {"10.20.0.0/16", "fd00:20::/48", "0.0.0.0/0"}
            for _ in range(2):  # idempotent
                nc.sync_routes(idx, sorted(want))
                assert routes(ipr, idx) == want
            nc.sync_routes(idx, ["10.20.0.0/16", "10.30.0.0/16"])
            assert routes(ipr, idx) == {"10.20.0.0/16", "10.30.0.0/16"}
            nc.sync_routes(idx, [])
            assert routes(ipr, idx) == set()
            assert routes(ipr, idx, proto=4) == {"10.77.0.0/16"}
            assert routes(ipr, v0) == {"10.88.0.0/16"}
        os.close(fd)

    in_ns(make_ns(), body)


def test_netlink_errors_name_the_interface_and_route(make_ns, tmp_path):
    def body():
        fd, name = open_tun()
        with NetConfig(tmp_path / "s.state") as nc, IPRoute() as ipr:
            with pytest.raises(NetConfigError, match="nosuch0"):
                nc.setup_interface("nosuch0", [], 1400)
            idx = ipr.link_lookup(ifname=name)[0]  # still down: the kernel refuses the route
            with pytest.raises(NetConfigError, match=f"10.5.0.0/16 dev {name}: Network is down"):
                nc.sync_routes(idx, ["10.5.0.0/16"])
        os.close(fd)

    in_ns(make_ns(), body)


def test_enable_forwarding_records_then_restore_puts_back(make_ns, tmp_path):
    state = tmp_path / "run" / "tunvpnd" / "client.state"

    def body():
        fd, name = open_tun()
        with NetConfig(state) as nc, IPRoute() as ipr:
            idx = nc.setup_interface(name, ["10.9.0.1/24"], 1400)
            veth_pair(ipr, "v0", "v1")
            sysctl_fwd("v0", 0)
            sysctl_fwd("v1", 1)  # already on: must stay on after restore
            nc.sync_routes(idx, ["10.20.0.0/16"])
            nc.enable_forwarding(idx)
            nc.enable_forwarding(idx)  # a second call keeps the recorded originals
            assert oct(state.parent.stat().st_mode & 0o777) == "0o755"
            saved = json.loads(state.read_text())
            assert saved["pid"] == os.getpid()
            was = {r["ifname"]: r["was"] for r in saved["forwarding"]}
            assert was == {name: 0, "v0": 0, "v1": 1}  # lo is never touched
            assert [sysctl_fwd(d) for d in (name, "v0", "v1", "lo")] == [1, 1, 1, 0]
            nc.restore()
            assert [sysctl_fwd(d) for d in (name, "v0", "v1")] == [0, 0, 1]
            assert routes(ipr, idx) == set() and not state.exists()
        os.close(fd)

    in_ns(make_ns(), body)


def test_recover_after_simulated_crash(make_ns, tmp_path):
    state = tmp_path / "client.state"

    def body():
        with IPRoute() as ipr:
            v0, _ = veth_pair(ipr, "v0", "v1")
            sysctl_fwd("v1", 0)
            # What a crashed run left: flags switched on, a tagged route, its state file.
            sysctl_fwd("v0", 1)
            ipr.route("add", dst="10.88.0.0", dst_len=16, oif=v0, proto=RTPROT_TUNVPND,
                      scope=253)
            ipr.route("add", dst="10.89.0.0", dst_len=16, oif=v0, proto=4, scope=253)
            state.write_text(json.dumps({
                "pid": dead_pid(), "start": "1",
                "forwarding": [{"ifindex": v0, "ifname": "v0", "was": 0},
                               {"ifindex": 4242, "ifname": "tun7", "was": 0}],
                "routes_on": [{"ifindex": v0, "ifname": "v0"},
                              {"ifindex": 4242, "ifname": "tun7"}]}))
            with NetConfig(state) as nc:
                lines = nc.recover()
                assert any("10.88.0.0/16" in line for line in lines), lines
                assert any("v0" in line and "forwarding" in line for line in lines), lines
                assert sysctl_fwd("v0") == 0 and not state.exists()
                assert routes(ipr, v0) == set()
                assert routes(ipr, v0, proto=4) == {"10.89.0.0/16"}
                assert nc.recover() == []

    in_ns(make_ns(), body)


def test_recover_refuses_a_state_file_of_a_live_process(make_ns, tmp_path):
    state = tmp_path / "client.state"

    def body():
        from tunvpnd.netconf import _start_time

        owner = os.getppid()  # the test runner: certainly alive
        state.write_text(json.dumps({"pid": owner, "start": _start_time(owner),
                                     "forwarding": [], "routes_on": []}))
        with NetConfig(state) as nc, pytest.raises(NetConfigError, match=str(owner)):
            nc.recover()
        assert state.exists()

    in_ns(make_ns(), body)


def test_forwarded_ping_through_three_namespaces(make_ns, tmp_path):
    """a --- r --- b: r forwards a's ping to b only after enable_forwarding(); after r's
    daemon 'crashes', a new run's recover() switches forwarding off again."""
    a, r, b = make_ns(), make_ns(), make_ns()
    state = tmp_path / "r.state"
    ip("-n", r, "link", "add", "ra", "type", "veth", "peer", "name", "eth0", "netns", a)
    ip("-n", r, "link", "add", "rb", "type", "veth", "peer", "name", "eth0", "netns", b)
    for ns, dev, addr in ((r, "ra", "10.1.0.1/24"), (r, "rb", "10.2.0.1/24"),
                          (a, "eth0", "10.1.0.2/24"), (b, "eth0", "10.2.0.2/24")):
        ip("-n", ns, "addr", "add", addr, "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")
    ip("-n", a, "route", "add", "default", "via", "10.1.0.1")
    ip("-n", b, "route", "add", "default", "via", "10.2.0.1")

    def forwarding_off():
        for dev in ("ra", "rb"):
            sysctl_fwd(dev, 0)

    in_ns(r, forwarding_off)
    assert wait_for(lambda: ping(a, "10.1.0.1"))  # the link works...
    assert not ping(a, "10.2.0.2")  # ...but r does not forward

    def enable_and_crash():
        fd, name = open_tun()
        nc = NetConfig(state)
        nc.enable_forwarding(nc.setup_interface(name, ["10.9.0.1/24"], 1400))
        return [sysctl_fwd(dev) for dev in ("ra", "rb")]  # exits without restore()

    assert in_ns(r, enable_and_crash) == [1, 1]
    assert wait_for(lambda: ping(a, "10.2.0.2"))
    assert state.exists()

    def recover():
        with NetConfig(state) as nc:
            return nc.recover()

    assert any("ra" in line for line in in_ns(r, recover))
    assert not ping(a, "10.2.0.2")


# -- route ownership (issue 8, item 1) ------------------------------------------------------


def main_table(ipr: IPRoute, but: int | None = None) -> list[tuple]:
    """(dst, prefix, oif, gateway, proto, metric) of every main-table route not on `but`."""
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for m in ipr.get_routes(family=family):
            if (m.get_attr("RTA_TABLE") or m["table"]) == 254 and m.get_attr("RTA_OIF") != but:
                out.append((m.get_attr("RTA_DST"), m["dst_len"], m.get_attr("RTA_OIF"),
                            m.get_attr("RTA_GATEWAY"), m["proto"], m.get_attr("RTA_PRIORITY")))
    return sorted(out, key=str)


def test_sync_routes_never_takes_a_route_it_does_not_own(make_ns, tmp_path):
    """The three cases of the issue: the default route, the underlay's connected subnet and
    another instance's route. At start: refused naming both, nothing changed. On reload:
    each reported and skipped, the rest applied. On restore: only ours removed."""
    def body():
        with NetConfig(tmp_path / "s.state") as nc, IPRoute() as ipr:
            v0, _ = veth_pair(ipr, "v0", "v1")
            ipr.addr("add", index=v0, address="10.9.0.5", prefixlen=24)
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway="10.9.0.11", oif=v0, proto=3)
            other_fd, other = open_tun("tun%d")  # another instance, with its route
            oidx = NetConfig(tmp_path / "o.state").setup_interface(other, ["10.1.0.1/24"], 1400)
            ipr.route("add", dst="192.168.60.0", dst_len=24, oif=oidx, proto=RTPROT_TUNVPND,
                      scope=253)
            fd, name = open_tun("tun%d")
            idx = nc.setup_interface(name, ["10.2.0.1/24"], 1400)
            before = main_table(ipr, but=idx)
            want = ["0.0.0.0/0", "10.9.0.0/24", "192.168.60.0/24", "10.20.0.0/16"]
            with pytest.raises(NetConfigError) as refused:
                nc.sync_routes(idx, want, strict=True)
            message = str(refused.value)
            assert (f"route 0.0.0.0/0 dev {name}: 0.0.0.0/0 via 10.9.0.11 dev v0 proto boot "
                    "exists already (not ours)") in message
            assert (f"route 10.9.0.0/24 dev {name}: 10.9.0.0/24 dev v0 proto kernel exists "
                    "already (not ours)") in message
            assert (f"route 192.168.60.0/24 dev {name}: 192.168.60.0/24 dev {other} proto 86 "
                    "exists already (not ours)") in message
            assert routes(ipr, idx) == set()  # not even the free one
            assert main_table(ipr, but=idx) == before
            skipped = nc.sync_routes(idx, want, strict=False)
            assert len(skipped) == 3 and all("(not ours)" in s for s in skipped)
            assert routes(ipr, idx) == {"10.20.0.0/16"}
            assert main_table(ipr, but=idx) == before
            nc.restore()
            assert routes(ipr, idx) == set() and main_table(ipr, but=idx) == before
            os.close(fd)
            os.close(other_fd)

    in_ns(make_ns(), body)


def test_sync_routes_leaves_the_kernels_route_on_its_own_tun_alone(make_ns, tmp_path):
    """The tunnel network itself listed in routes: the kernel already routes it into our
    TUN; not a conflict, not taken over (it goes with the TUN)."""
    def body():
        fd, name = open_tun()
        with NetConfig(tmp_path / "s.state") as nc, IPRoute() as ipr:
            idx = nc.setup_interface(name, ["10.9.9.1/24", "fd09:9::1/64"], 1400)
            assert nc.sync_routes(idx, ["10.9.9.0/24", "fd09:9::/64"]) == []
            assert routes(ipr, idx) == set()
            assert routes(ipr, idx, proto=2) >= {"10.9.9.0/24", "fd09:9::/64"}
        os.close(fd)

    in_ns(make_ns(), body)


# -- the state file (issue 8, item 15) ------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ("[]", "a JSON list, not an object"),
    ('{"pid": "1"}', "pid: not an integer"),
    ('{"routes_on": 5}', "routes_on: not a list"),
    ('{"routes_on": [7]}', "routes_on[0]: not an object"),
    ('{"forwarding": [{"ifindex": 2, "ifname": "eth0"}]}', "forwarding[0].was: missing"),
    ('{"forwarding": [{"ifindex": true, "ifname": "eth0", "was": 0}]}',
     "forwarding[0].ifindex: missing or not an integer"),
    ("[" * 100000, "not valid JSON"),
    ('{"pid": 1', "not valid JSON"),
])
def test_recover_names_a_state_file_of_the_wrong_shape(make_ns, tmp_path, text, problem):
    state = tmp_path / "client.state"
    state.write_text(text)

    def body():
        with NetConfig(state) as nc, pytest.raises(NetConfigError) as error:
            nc.recover()
        return str(error.value)

    message = in_ns(make_ns(), body)
    assert str(state) in message and problem in message, message
    assert state.read_text() == text  # kept for the operator to look at


def test_recover_does_not_hang_on_a_fifo(make_ns, tmp_path):
    state = tmp_path / "client.state"
    os.mkfifo(state)

    def body():
        with NetConfig(state) as nc, pytest.raises(NetConfigError, match="not a regular file"):
            nc.recover()

    in_ns(make_ns(), body, timeout=10)


def test_recover_removes_a_torn_temporary_state_file(make_ns, tmp_path):
    """A run killed between writing NAME.state.tmp and renaming it left only the copy; it
    describes changes not made yet (the file is always written first)."""
    state = tmp_path / "client.state"
    tmp = tmp_path / "client.state.tmp"
    tmp.write_text('{"pid": 1, "forwa')

    def body():
        with NetConfig(state) as nc:
            assert nc.recover() == []

    in_ns(make_ns(), body)
    assert not tmp.exists() and not state.exists()


# -- an existing interface is never adopted (issue 8, item 10) ------------------------------


def test_open_tun_refuses_an_existing_persistent_tun_and_leaves_it_alone(make_ns):
    def body():
        def details() -> dict:
            out = subprocess.run([IP, "-d", "-j", "link", "show", "tvp0"], check=True,
                                 capture_output=True, text=True, timeout=10).stdout
            (link,) = json.loads(out)
            link.pop("stats64", None)
            return link

        fd = os.open("/dev/net/tun", os.O_RDWR)  # persistent, with packet-information header
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"tvp0", IFF_TUN))
        fcntl.ioctl(fd, 0x400454CB, 1)  # TUNSETPERSIST; the namespace takes it away
        os.close(fd)
        ip("link", "set", "tvp0", "mtu", "1300")
        before = details()
        assert before["linkinfo"]["info_data"]["pi"] is True
        with pytest.raises(TunExists, match="^interface tvp0 exists already"):
            check_free("tvp0")
        with pytest.raises(TunExists, match="^interface tvp0 exists already"):
            open_tun("tvp0")  # the kernel refuses atomically (IFF_TUN_EXCL)
        with pytest.raises(TunExists):
            open_tun_offload("tvp0")
        assert details() == before  # attaching would have switched pi off and vnet_hdr on
        check_free("tun%d")  # a pattern always gets a new device

    in_ns(make_ns(), body)
