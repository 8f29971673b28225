"""The Debian package: built by packaging/build-deb.sh, linted, and installed into a throw-away
root, never into the host.

The install runs in a private mount and PID namespace (``unshare``): an overlay whose lower layer
is the host's root filesystem and whose upper layer is a tmpfs, entered with ``chroot``; apt
installs the .deb there from the local file and fetches its dependencies from the Debian mirror
or its cache (Debian's python3-pyroute2, python3-sdnotify, python3-cryptography and python3-nacl
are removed from the overlay first, so they really come in through the package's Depends). When
the namespace's first process exits, every mount and every write goes with it; the host's dpkg
database is checked to be unchanged.

Needs root, util-linux's unshare, and apt with the Debian mirror, as the rest of the suite does;
the build script installs the build dependencies (debhelper, dh-python, lintian, ...) itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from tunvpnd.lab import wait_until

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DEB_NAME = f"tunvpnd_{VERSION}-1_all.deb"
DPKG_STATUS = Path("/var/lib/dpkg/status")


def host_has_tunvpnd() -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "tunvpnd"],
                            capture_output=True, text=True)
    return result.returncode == 0 and "installed" in result.stdout.split()


@pytest.fixture(scope="module", autouse=True)
def host_untouched():
    """The package is never installed on the host, before or after these tests."""
    assert not host_has_tunvpnd(), "tunvpnd is installed on this host: remove it first"
    yield
    assert not host_has_tunvpnd()


@pytest.fixture(scope="module")
def built():
    """bash packaging/build-deb.sh --lint, writing the .deb to a temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="tvdeb-out-"))
    try:
        proc = subprocess.run(["bash", str(REPO / "packaging" / "build-deb.sh"), "--lint"],
                              env={**os.environ, "TUNVPN_DEB_OUT": str(out)},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=900)
        yield out / DEB_NAME, proc
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def deb(built) -> Path:
    path, proc = built
    assert path.is_file(), f"no {path.name}; build output:\n{proc.stdout[-3000:]}" \
                           f"\n{proc.stderr[-3000:]}"
    return path


def deb_files(deb: Path) -> list[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    # "-rw-r--r-- root/root  265 2026-11-24 23:31 ./usr/lib/..." -> "/usr/lib/..."
    return [line.split(None, 5)[5].removeprefix(".").split(" -> ")[0]
            for line in listing.splitlines()]


def test_build_script_makes_the_deb_and_lintian_finds_no_errors(built, deb):
    _, proc = built
    assert deb.name == DEB_NAME
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # the build-time smoke test ran against Debian's pyroute2
    assert re.search(r"^tunvpnd \S+ with pyroute2 0\.7\.", proc.stdout, re.M), proc.stdout
    # ... and Debian's python3-cryptography 38 and python3-nacl 1.5 (secure mode's libraries)
    assert re.search(r"^cryptography 38\.\S* pynacl 1\.5", proc.stdout, re.M), proc.stdout
    assert "genkey | pubkey: OK" in proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E: ")]
    assert errors == []


def test_deb_contents(deb):
    files = deb_files(deb)
    expected = [
        "/usr/bin/tunvpnd",
        "/usr/lib/python3/dist-packages/tunvpnd/cli.py",
        "/usr/lib/python3/dist-packages/tunvpnd/lab/topology.py",
        "/usr/lib/python3/dist-packages/tunvpnd/wireguard/keys.py",
        "/usr/lib/python3/dist-packages/tunvpnd/examples/client.yaml",
        "/usr/share/man/man8/tunvpnd.8.gz",
        "/usr/share/man/man5/tunvpnd.yaml.5.gz",
        "/usr/share/doc/tunvpnd/examples/client.yaml",
        "/usr/share/doc/tunvpnd/examples/server.yaml",
        "/usr/share/doc/tunvpnd/examples/wg-client.yaml",
        "/usr/share/doc/tunvpnd/examples/wg-server.yaml",
        "/usr/share/doc/tunvpnd/copyright",
        "/etc/iproute2/rt_protos.d/tunvpnd.conf",
        "/etc/tunvpn/",
    ]
    # every unit in systemd/ (the template and the target, whatever is there at build time)
    units = sorted(p.name for p in (REPO / "systemd").glob("tunvpnd*"))
    assert "tunvpnd@.service" in units
    expected += [f"/usr/lib/systemd/system/{unit}" for unit in units]
    # every profile the pip install ships in the package too (tunvpnd lab demo uses them)
    expected += [f"/usr/lib/python3/dist-packages/tunvpnd/examples/{p.name}"
                 for p in (REPO / "tunvpnd" / "examples").glob("*.yaml")]
    missing = [path for path in expected if path not in files]
    assert missing == [], files
    assert any(re.fullmatch(r"/usr/share/doc/tunvpnd/operator-guide\.md(\.gz)?", f)
               for f in files)
    # no live profile: a default /etc/tunvpn/client.yaml would invite running the lab addresses
    assert [f for f in files if f.startswith("/etc/tunvpn/") and f != "/etc/tunvpn/"] == []


def test_deb_control_fields(deb):
    def field(name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                              text=True, check=True).stdout.strip()

    assert field("Package") == "tunvpnd"
    assert field("Version") == f"{VERSION}-1"
    assert field("Architecture") == "all"
    assert field("Section") == "net"
    depends = [d.strip() for d in field("Depends").split(",")]
    names = [d.split()[0] for d in depends]  # dh_python3 may add "(>= 38)" from pyproject
    for name in ("python3-pyroute2", "python3-sdnotify", "python3-yaml",
                 "python3-cryptography", "python3-nacl",  # these two: wire: wireguard
                 "python3-prometheus-client"):  # metrics:
        assert name in names, depends
    assert any(d.startswith("python3:any") or d.startswith("python3 ") for d in depends), depends
    info = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert info == ["/etc/iproute2/rt_protos.d/tunvpnd.conf"]


def test_man_pages_render_without_warnings():
    for page in ("tunvpnd.8", "tunvpnd.yaml.5"):
        result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(REPO / "docs" / page)],
                                capture_output=True, text=True)
        assert result.returncode == 0 and result.stderr == "", (page, result.stderr)
        whatis = subprocess.run(["lexgrog", str(REPO / "docs" / page)], capture_output=True,
                                text=True)
        assert whatis.returncode == 0 and " - " in whatis.stdout, (page, whatis.stdout)


def test_profile_examples_in_the_man_page_are_valid(tmp_path):
    roff = (REPO / "docs" / "tunvpnd.yaml.5").read_text()
    examples = [block for block in re.findall(r"^\.EX\n(.*?)^\.EE", roff, re.M | re.S)
                if block.startswith("# /etc/tunvpn/")]
    assert len(examples) == 3
    for block in examples:
        name = block.split("\n", 1)[0].rsplit("/", 1)[1]
        (tmp_path / name).write_text(block.replace("\\-", "-"))
        result = subprocess.run([sys.executable, "-m", "tunvpnd", "check", str(tmp_path / name)],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)
        assert ": OK: " in result.stdout


# Runs as PID 1 of a new PID namespace, in a private mount namespace: $1 = an empty directory
# for the tmpfs, $2 = the .deb. Prints "@@NAME" before each step's output and "@@rc N" after it.
INSTALL_SCRIPT = r"""
set -euo pipefail
T=$1 DEB=$2
mount -t tmpfs -o mode=0700 tvdeb "$T"
mkdir "$T/upper" "$T/work" "$T/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/root"
R=$T/root
mount -t proc proc "$R/proc"
mount --bind /dev "$R/dev"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"   # for dpkg's log
mount -t tmpfs tmpfs "$R/tmp"
mount -t tmpfs tmpfs "$R/run"       # no /run/systemd/system: maintainer scripts start nothing
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
chmod 755 "$R/usr/sbin/policy-rc.d"
cp "$DEB" "$R/tmp/"
in_root() {
    chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive HOME=/root "$@"
}
step() {
    local name=$1; shift
    echo "@@$name"
    if in_root "$@" 2>&1; then echo "@@rc 0"; else echo "@@rc $?"; fi
}
# so that apt has to fetch the dependencies named in Depends from the mirror
in_root apt-get purge -y -qq python3-pyroute2 python3-sdnotify python3-cryptography python3-nacl \
    >/dev/null 2>&1 || true
step update apt-get update -qq
step install apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends \
    "/tmp/$(basename "$DEB")"
step status dpkg-query -W -f '${Package} ${Status} ${Version}\n' tunvpnd python3-pyroute2 \
    python3-sdnotify python3-yaml python3-cryptography python3-nacl
step shebang head -n1 /usr/bin/tunvpnd
step version /usr/bin/tunvpnd --version
step check_client /usr/bin/tunvpnd check /usr/share/doc/tunvpnd/examples/client.yaml
step check_server /usr/bin/tunvpnd check /usr/share/doc/tunvpnd/examples/server.yaml
# the secure examples check once their keys exist (made as the examples' comments say)
step check_wg sh -c 'set -e; d=$(mktemp -d); cp /usr/share/doc/tunvpnd/examples/wg-*.yaml "$d"
    cd "$d"; umask 077; for n in wg-client wg-server; do /usr/bin/tunvpnd genkey > $n.key
    /usr/bin/tunvpnd check $n.yaml; done'
step modules /usr/bin/python3 -c '
import importlib.metadata as m, pyroute2, sdnotify, tunvpnd, tunvpnd.service, tunvpnd.lab
print(tunvpnd.__file__); print(pyroute2.__file__); print("pyroute2", m.version("pyroute2"))'
step keys sh -c '/usr/bin/tunvpnd genkey | /usr/bin/tunvpnd pubkey && /usr/bin/python3 -c "
import cryptography, nacl.bindings; print(cryptography.__file__)"'
step etc_tunvpn ls -A /etc/tunvpn
step units ls /usr/lib/systemd/system/
step enabled sh -c 'find /etc/systemd/system -name "tunvpnd*"'
step man man -w tunvpnd tunvpnd.yaml
step proto unshare --net sh -c \
    'ip link set lo up && ip route add 10.86.0.0/24 dev lo proto 86 && ip route show dev lo'
step purge apt-get purge -y -q -o Dpkg::Use-Pty=0 tunvpnd
step gone sh -c 'for f in /usr/bin/tunvpnd /etc/iproute2/rt_protos.d/tunvpnd.conf \
    /usr/lib/systemd/system/tunvpnd@.service; do test ! -e "$f" || echo "left: $f"; done'
"""


def run_install(deb: Path, workdir: Path) -> dict[str, tuple[str, int]]:
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
         "bash", "-c", INSTALL_SCRIPT, "bash", str(workdir), str(deb)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    steps: dict[str, tuple[str, int]] = {}
    name, lines = None, []
    for line in proc.stdout.splitlines():
        if line.startswith("@@rc "):
            steps[name] = ("\n".join(lines), int(line[5:]))
            name, lines = None, []
        elif line.startswith("@@"):
            name, lines = line[2:], []
        else:
            lines.append(line)
    return steps


def test_installs_and_runs_in_a_throwaway_root(deb):
    before = hashlib.sha256(DPKG_STATUS.read_bytes()).hexdigest()
    workdir = Path(tempfile.mkdtemp(prefix="tvdeb-root-"))
    try:
        steps = run_install(deb, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert not workdir.exists()
    assert hashlib.sha256(DPKG_STATUS.read_bytes()).hexdigest() == before
    assert not host_has_tunvpnd()

    def ok(name: str) -> str:
        output, rc = steps[name]
        assert rc == 0, f"{name} failed ({rc}):\n{output[-3000:]}"
        return output

    ok("update")
    install = ok("install")
    # the dependencies came from the mirror, as a machine without them would get them
    assert re.search(r"^(Get|Unpacking).*python3-pyroute2", install, re.M), install
    status = ok("status").splitlines()
    for package in ("python3-cryptography", "python3-nacl"):  # secure mode's, from Depends
        assert re.search(rf"^(Get|Unpacking).*{package}", install, re.M), install
    for package in ("tunvpnd", "python3-pyroute2", "python3-sdnotify", "python3-yaml",
                    "python3-cryptography", "python3-nacl"):
        assert any(line.startswith(f"{package} install ok installed") for line in status), status
    assert any(line.startswith("python3-cryptography install ok installed 38.")
               for line in status), status
    assert ok("shebang") == "#!/usr/bin/python3"
    assert ok("version") == f"tunvpnd {VERSION}"
    assert ": OK: client tun0 192.168.53.99/24" in ok("check_client")
    assert ": OK: server tun0 192.168.53.1/24" in ok("check_server")
    checked = ok("check_wg")
    assert ": OK: client tun0 192.168.53.99/24" in checked and ": OK: server tun0" in checked
    package_file, pyroute2_file, pyroute2_version = ok("modules").splitlines()
    assert package_file == "/usr/lib/python3/dist-packages/tunvpnd/__init__.py"
    assert pyroute2_file.startswith("/usr/lib/python3/dist-packages/pyroute2/")
    assert pyroute2_version.startswith("pyroute2 0.7.")
    # secure mode's keys with Debian's python3-cryptography, a public key printed as wg does
    public, cryptography_file = ok("keys").splitlines()
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", public), public
    assert cryptography_file.startswith("/usr/lib/python3/dist-packages/cryptography/")
    assert ok("etc_tunvpn") == ""
    units = ok("units").split()
    assert "tunvpnd@.service" in units and "tunvpnd.target" in units
    assert ok("enabled") == ""  # the package enables (and starts) nothing
    assert ok("man").split() == ["/usr/share/man/man8/tunvpnd.8.gz",
                                 "/usr/share/man/man5/tunvpnd.yaml.5.gz"]
    assert "10.86.0.0/24 proto tunvpnd scope link" in ok("proto")
    ok("purge")
    assert ok("gone") == ""


def test_installed_package_runs_the_tunnel_under_systemd(deb):
    """dpkg -i in a systemd box, then tunvpnd@server and tunvpnd@client from the installed
    files only: /usr/bin/tunvpnd on Debian's python3 and pyroute2 0.7.2, the unit from
    /usr/lib/systemd/system, profiles copied from /usr/share/doc/tunvpnd/examples. Then the
    secure examples, tunvpnd@wg-server and tunvpnd@wg-client, on Debian's python3-cryptography
    38 and python3-nacl, with keys made by `tunvpnd genkey` as root-only /etc/tunvpn/NAME.key
    that the units' DynamicUser reads through LoadCredential=."""
    from tests.sdbox import SystemdBox, assert_host_same, host_snapshot

    before = host_snapshot()
    box = SystemdBox("tvpkg", binds={str(deb.parent): "/mnt/deb"})
    try:
        box.start()
        box.run(["dpkg", "-i", f"/mnt/deb/{deb.name}"], timeout=120)
        box.run(["rm", "-f", "/usr/local/bin/tunvpnd"])  # the pip-installed one must not win
        assert box.run(["/usr/bin/python3", "-c", "import importlib.metadata as m; "
                        "print(m.version('pyroute2'))"]).stdout.strip() == "0.7.2"
        box.run(["/opt/tunvpnd/bin/python", "-c", "from tunvpnd.lab import Lab; Lab('lab').up()"])
        for instance, netns in (("client", "lab-hostu"), ("server", "lab-server")):
            box.run(["cp", f"/usr/share/doc/tunvpnd/examples/{instance}.yaml", "/etc/tunvpn/"])
            box.write_file(f"/etc/systemd/system/tunvpnd@{instance}.service.d/netns.conf",
                           f"[Service]\nNetworkNamespacePath=/run/netns/{netns}\n")
        box.systemctl("daemon-reload")
        box.systemctl("start", "tunvpnd@server", "tunvpnd@client")
        pid = box.systemctl("show", "-p", "MainPID", "--value", "tunvpnd@client").stdout.strip()
        cmdline = box.read_file(f"/proc/{pid}/cmdline").split("\0")
        assert cmdline[:2] == ["/usr/bin/python3", "/usr/bin/tunvpnd"], cmdline
        box.run(["ip", "netns", "exec", "lab-hostu", "ping", "-c", "3", "-i", "0.2", "-W", "2",
                 "192.168.60.5"])
        routes = box.run(["ip", "netns", "exec", "lab-hostu", "ip", "route", "show", "proto",
                          "tunvpnd"]).stdout
        assert "192.168.60.0/24 dev tun0" in routes  # rt_protos.d names our routes
        box.systemctl("stop", "tunvpnd@client", "tunvpnd@server")
        run_wireguard_examples(box)
    finally:
        box.stop()
    assert_host_same(before, host_snapshot(), box.name)


WG_NETNS = {"wg-server": "lab-server", "wg-client": "lab-hostu"}


def run_wireguard_examples(box) -> None:
    """The installed wg-*.yaml examples under the installed unit, keys as their comments say."""
    assert box.run(["/usr/bin/python3", "-c", "import cryptography; print(cryptography."
                    "__version__)"]).stdout.startswith("38.")
    public = {}
    for instance, netns in WG_NETNS.items():
        box.run(["sh", "-c", f"umask 077; /usr/bin/tunvpnd genkey > /etc/tunvpn/{instance}.key"])
        public[instance] = box.run(["sh", "-c", f"/usr/bin/tunvpnd pubkey < "
                                    f"/etc/tunvpn/{instance}.key"]).stdout.strip()
        box.write_file(f"/etc/systemd/system/tunvpnd@{instance}.service.d/netns.conf",
                       f"[Service]\nNetworkNamespacePath=/run/netns/{netns}\n")
    assert box.run(["stat", "-c", "%U %a", "/etc/tunvpn/wg-client.key"]).stdout.split() == \
        ["root", "600"]
    client = box.read_file("/usr/share/doc/tunvpnd/examples/wg-client.yaml")
    client = re.sub(r"(?m)^(server_public_key: )\S+", rf"\g<1>{public['wg-server']}", client)
    server = box.read_file("/usr/share/doc/tunvpnd/examples/wg-server.yaml")
    server = re.sub(r"(?m)^(    public_key: )\S+", rf"\g<1>{public['wg-client']}", server)
    box.write_file("/etc/tunvpn/wg-client.yaml", client)
    box.write_file("/etc/tunvpn/wg-server.yaml", server)
    box.systemctl("daemon-reload")
    box.systemctl("start", "tunvpnd@wg-server")  # listening before the first initiation
    box.systemctl("start", "tunvpnd@wg-client")

    def pings() -> bool:
        return box.run(["ip", "netns", "exec", "lab-hostu", "ping", "-c", "1", "-W", "1",
                        "192.168.60.5"], check=False).returncode == 0

    wait_until(pings, 30, what="a ping through the wireguard tunnel")
    box.run(["ip", "netns", "exec", "lab-hostu", "ping", "-c", "3", "-i", "0.2", "-W", "2",
             "192.168.60.5"])
    for instance in WG_NETNS:
        unit = f"tunvpnd@{instance}.service"
        pid = box.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip()
        assert box.read_file(f"/proc/{pid}/cmdline").split("\0")[:2] == \
            ["/usr/bin/python3", "/usr/bin/tunvpnd"]
        maps = box.read_file(f"/proc/{pid}/maps")
        # secure mode runs on Debian's libraries, not the venv's
        assert "/usr/lib/python3/dist-packages/cryptography/" in maps, unit
        # PyNaCl is imported only for a cookie reply (under load, since the wgperf merge):
        # when it is loaded, it is Debian's (that Debian's python3 imports it: checked above)
        assert "/nacl/" not in maps or "/usr/lib/python3/dist-packages/nacl/" in maps, unit
        assert "/opt/tunvpnd/" not in maps, unit
        uid = re.search(r"^Uid:\s+(\d+)", box.read_file(f"/proc/{pid}/status"), re.M).group(1)
        assert uid != "0"  # the DynamicUser, which only has the key as a credential
        assert box.run(["stat", "-c", "%u", f"/run/credentials/{unit}/{instance}.key"]
                       ).stdout.strip() == uid
    wait_until(lambda: "server up, handshake" in box.systemctl(
        "show", "-p", "StatusText", "--value", "tunvpnd@wg-client").stdout, 30, interval=0.2,
        what="the handshake in tunvpnd@wg-client's STATUS")
    # root's `tunvpnd show` and `wg` see the packaged units (both examples name their TUN tun0:
    # the server, started first, has /run/wireguard/tun0.sock)
    assert box.run(["/usr/bin/tunvpnd", "show", "wg-client", "--check"], check=False
                   ).returncode == 0
    dump = box.run(["wg", "show", "tun0", "dump"]).stdout.splitlines()
    assert dump[0].split("\t")[1] == public["wg-server"], dump
    box.systemctl("stop", "tunvpnd@wg-client", "tunvpnd@wg-server")
    assert box.run(["ls", "-A", "/run/wireguard"]).stdout == ""
