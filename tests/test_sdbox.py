"""Tests of tests/sdbox.py: a real systemd in a box, and a host that stays as it was."""

import json
import os
import secrets
import subprocess
import time

import pytest

from tests.sdbox import (
    BoxCommandError,
    SystemdBox,
    _hierarchies,
    assert_host_same,
    host_snapshot,
    remove_stale_cgroups,
    sdbox,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SystemdBox needs root")

NOTIFY_SCRIPT = """\
import os, socket, time
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\\0" + addr[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(addr)
    s.sendall(b"READY=1\\nSTATUS=tvbox notify says hi")
while True:
    time.sleep(3600)
"""


def _poll(fn, timeout=10.0, what="condition"):
    """Call fn() until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _box_cgroups_gone(box):
    return not any(os.path.exists(d) for d in box._cgroup_dirs)


@pytest.fixture(scope="module")
def bind_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdbox-bind")
    (d / "hello.txt").write_text("from the host\n")
    return d


@pytest.fixture(scope="module")
def box(bind_dir):
    with SystemdBox(binds={str(bind_dir): "/srv/hostdata"}) as b:
        print(f"\n{b.name}: boot {b.boot_seconds:.2f} s")
        yield b
    print(f"\n{b.name}: shutdown {b.shutdown_seconds:.2f} s")
    assert _box_cgroups_gone(b)


def test_pid1_is_systemd_and_running(box):
    assert box.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert os.path.basename(os.readlink(f"/proc/{box.pid}/exe")) == "systemd"
    state = box.systemctl("is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded"), box.systemctl("--failed", check=False).stdout
    assert box.run(["hostname"]).stdout.strip() == box.name
    assert box.run(["systemd-detect-virt", "--container"], check=False).stdout.strip() == "lxc"


def test_write_read_and_visibility(box, bind_dir):
    box.write_file("/etc/tvbox-test/a.conf", "x = 1\n", mode=0o600)
    assert box.read_file("/etc/tvbox-test/a.conf") == "x = 1\n"
    assert box.run(["stat", "-c", "%a", "/etc/tvbox-test/a.conf"]).stdout.strip() == "600"
    assert not os.path.exists("/etc/tvbox-test")  # landed in the box's upper layer only
    with open(os.path.join(box.root, "etc/tvbox-test/a.conf")) as f:
        assert f.read() == "x = 1\n"
    # the host's root filesystem is visible (lowerdir=/): this checkout and the venv
    assert box.run(["test", "-f", "/work/main/tests/sdbox.py"], check=False).returncode == 0
    assert box.run(["/opt/tunvpnd/bin/python", "-c", "import pyroute2"]).returncode == 0
    # binds= hands in host directories read-only
    assert box.read_file("/srv/hostdata/hello.txt") == "from the host\n"
    assert box.run(["touch", "/srv/hostdata/nope"], check=False).returncode != 0
    with pytest.raises(BoxCommandError, match="No such file"):
        box.read_file("/nonexistent")


def test_notify_unit_ready_and_status(box):
    box.write_file("/usr/local/lib/tvbox/notify.py", NOTIFY_SCRIPT)
    box.run(["systemd-run", "--unit=tvnotify", "--property=Type=notify",
             "--property=NotifyAccess=main", "/usr/bin/python3",
             "/usr/local/lib/tvbox/notify.py"], timeout=30)
    assert box.systemctl("is-active", "tvnotify.service").stdout.strip() == "active"
    status = box.systemctl("show", "-p", "StatusText", "--value", "tvnotify.service")
    assert status.stdout.strip() == "tvbox notify says hi"
    box.systemctl("stop", "tvnotify.service")


def test_stderr_level_prefix_becomes_priority(box):
    box.write_file("/etc/systemd/system/tvprio.service", """\
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "<4>tvbox warning line" >&2; echo "<6>tvbox info line" >&2'
""")
    box.systemctl("daemon-reload")
    box.systemctl("start", "tvprio.service")

    def entries():
        out = box.journalctl("-u", "tvprio.service", "-o", "json").stdout
        found = {}
        for line in out.splitlines():
            e = json.loads(line)
            if isinstance(e.get("MESSAGE"), str) and e["MESSAGE"].startswith("tvbox "):
                found[e["MESSAGE"]] = e["PRIORITY"]
        return found if len(found) == 2 else None

    found = _poll(entries, what="journal entries of tvprio.service")
    assert found == {"tvbox warning line": "4", "tvbox info line": "6"}


def test_netns_inside_box_and_network_namespace_path(box):
    ns = f"{box.name}-x"
    box.run(["ip", "netns", "add", ns])
    assert ns in box.run(["ip", "netns", "list"]).stdout
    host = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert ns not in host.stdout
    assert not os.path.exists(f"/run/netns/{ns}")
    want = box.run(["stat", "-L", "-c", "%i", f"/run/netns/{ns}"]).stdout.strip()
    main = box.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
    got = box.run(["systemd-run", "--wait", "--pipe", "--quiet", "--unit=tvnetns",
                   f"--property=NetworkNamespacePath=/run/netns/{ns}",
                   "stat", "-L", "-c", "%i", "/proc/self/ns/net"], timeout=30).stdout.strip()
    assert got == want != main
    box.run(["ip", "netns", "del", ns])


def test_dev_net_tun_usable(box):
    assert box.run(["stat", "-c", "%F %t:%T", "/dev/net/tun"]).stdout.strip() == \
        "character special file a:c8"
    box.run(["ip", "tuntap", "add", "dev", "tvtun0", "mode", "tun"])
    assert "tvtun0" in box.run(["ip", "-o", "link", "show", "tvtun0"]).stdout
    host = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert "tvtun0" not in host.stdout
    box.run(["ip", "link", "del", "tvtun0"])


def test_host_untouched_by_a_box():
    before = host_snapshot()
    wall0, mono0 = time.time(), time.monotonic()
    fwd = open("/proc/sys/net/ipv4/ip_forward").read()
    t0 = time.monotonic()
    with SystemdBox() as b:
        token = b.name
        boot = time.monotonic() - t0
        # the clock is not namespaced: CAP_SYS_TIME is out of the bounding set
        r = b.run(["date", "-s", "2001-01-01 00:00:00"], check=False)
        assert r.returncode != 0 and "Operation not permitted" in r.stderr
        assert b.run(["timedatectl", "set-time", "2001-01-01 00:00:00"],
                     check=False).returncode != 0
        # cgroupfs: read-only inside, rw on the host
        assert b.run(["findmnt", "-no", "OPTIONS", "/sys/fs/cgroup"]).stdout.startswith("ro,")
        # /dev, /proc/sys, network, hostname, mounts, journal: all the box's own
        assert b.run(["test", "-S", "/dev/log"], check=False).returncode == 0
        assert b.run(["mknod", "/dev/tvblk", "b", "254", "0"], check=False).returncode != 0
        b.run(["mknod", "/dev/tvnull", "c", "1", "3"])
        assert b.run(["sysctl", "-w", "kernel.domainname=x"], check=False).returncode != 0
        b.run(["sysctl", "-w", "net.ipv4.ip_forward=" + ("0" if fwd.strip() == "1" else "1")])
        b.run(["hostname", "tvbox-renamed"])
        b.run(["ip", "tuntap", "add", "dev", f"tvd{token[-8:]}", "mode", "tap"])
        b.run(["ip", "netns", "add", f"{token}-y"])
        b.run(["mount", "-t", "tmpfs", "tmpfs", "/mnt"])
        b.run(["logger", "-t", "tvbox", "hello journal"])
        b.run(["systemd-run", "--wait", "--quiet", "/bin/true"], timeout=30)
        _poll(lambda: "hello journal" in b.journalctl("-t", "tvbox").stdout, what="logger line")
        assert b.run(["ls", "/run/log/journal"]).stdout.strip()
        assert b.run(["ls", "-A", "/var/log/journal"], check=False).stdout.strip() == ""
        t1 = time.monotonic()
    shutdown = time.monotonic() - t1
    print(f"\nboot {boot:.2f} s (harness {b.boot_seconds:.2f} s), "
          f"shutdown {shutdown:.2f} s (harness {b.shutdown_seconds:.2f} s)")
    assert _box_cgroups_gone(b)
    assert abs((time.time() - wall0) - (time.monotonic() - mono0)) < 1.0, "host clock moved"
    assert open("/proc/sys/net/ipv4/ip_forward").read() == fwd
    assert not os.path.exists("/dev/log")
    after = host_snapshot()
    assert_host_same(before, after, token)
    assert subprocess.run(["findmnt", "-no", "OPTIONS", "/sys/fs/cgroup"], capture_output=True,
                          text=True, check=True).stdout.startswith("rw,")


def test_kill_path_and_fixture_generator():
    before = host_snapshot()
    gen = sdbox()
    b = next(gen)
    assert b.systemctl("is-system-running", check=False).stdout.strip() in ("running", "degraded")
    b.stop(timeout=0)  # no time for poweroff: SIGKILL of the box's PID 1
    assert _box_cgroups_gone(b)
    with pytest.raises(StopIteration):
        next(gen)  # the fixture's own teardown: stop() again is a no-op
    with pytest.raises(Exception, match="not running"):
        b.run(["true"])
    assert_host_same(before, host_snapshot(), b.name)


def test_stale_cgroups_removed_by_prefix():
    # Own prefix, so that concurrent runs of this file do not sweep these fake boxes.
    prefix = "tvboxstale"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, alive = [], []
    for h in _hierarchies():
        s = os.path.join(h["dir"], f"{prefix}-{dead.pid}-{secrets.token_hex(4)}")
        os.makedirs(os.path.join(s, "system.slice"))
        stale.append(s)
        a = os.path.join(h["dir"], f"{prefix}-1-{secrets.token_hex(4)}")  # creator alive: kept
        os.mkdir(a)
        alive.append(a)
    try:
        removed = remove_stale_cgroups(prefix)
        assert sorted(removed) == sorted(stale)
        assert not any(os.path.exists(s) for s in stale)
        assert all(os.path.isdir(a) for a in alive)
    finally:
        for d in stale + alive:
            for sub in (os.path.join(d, "system.slice"), d):
                if os.path.isdir(sub):
                    os.rmdir(sub)
