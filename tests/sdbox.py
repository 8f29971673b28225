"""SystemdBox: a real systemd as PID 1 in throw-away namespaces, for tests.

Follows /work/shared/notes/systemd-test-box.md step by step. The box gets:

* its own cgroups: a child ``<prefix>-<creator pid>-<8 hex>`` of the caller's own cgroup in every
  hierarchy, entered before ``unshare --cgroup`` so systemd sees it as its cgroup root;
* new pid, mount (private propagation), uts, ipc, net and cgroup namespaces;
* an overlay root: ``lowerdir=/`` (the host's root filesystem only, without its submounts),
  upper and work dirs on a tmpfs, ``pivot_root`` into it, the old root lazily unmounted;
* a private /dev (tmpfs with mknod'ed null zero full random urandom tty net/tun, a new devpts
  instance with ptmx, /dev/shm, /dev/console bound to a pty the harness keeps open and drains),
  a new /proc with /proc/sys read-only except /proc/sys/net (and /proc/sysrq-trigger read-only),
  a new sysfs bind-remounted read-only, a private /sys/fs/cgroup (tmpfs with the hierarchies
  mounted from inside the cgroup namespace, then read-only), fresh tmpfs on /run, /tmp, /var/log;
  ``mount --make-rshared /`` after the pivot;
* a bounding set without sys_time sys_module sys_rawio syslog wake_alarm block_suspend mac_admin
  mac_override sys_pacct, for systemd and for every command run with ``nsenter``;
* ``env -i container=lxc``, a fresh machine-id, the box name as hostname, journald
  ``Storage=volatile``, ``DefaultLimitCORE=0``, a small default target ``tvbox.target``
  (``Requires=sysinit.target``, ``Wants=sockets.target``), block devices denied in the box's
  devices cgroup, and masks: gettys, timesyncd, apparmor, udev, modules-load, sysctl, binfmt,
  pstore, random-seed, journal-flush, kernel-global pseudo filesystems, every timer, and every
  service/socket/path unit installed on the machine that dpkg does not list as shipped by
  systemd or dbus (enumerated at run time; systemd-logind is kept; the project's own
  ``tunvpnd*`` units are never masked). Non-core generators and the sysv generator are masked
  too. A test that needs a masked unit writes its own unit file with ``write_file`` (that
  replaces the mask symlink) and runs ``daemon-reload``.

What the box sees of the host: the host's root filesystem, read through the overlay. Writes land
in the box's tmpfs upper layer and vanish with the box, so the repo checkout (/work/main) and the
venv (/opt/tunvpnd) are visible inside without copying. Not visible: anything on another host
mount (e.g. /dev/shm) and anything under the box's own /tmp, /run, /var/log, /dev, /proc, /sys,
which are fresh -- pytest's ``tmp_path`` lives under /tmp, so hand such directories in with
``binds={host_dir: box_dir}`` (read-only bind mounts made before systemd starts) or copy small
files with ``write_file``. Create host files before ``start()``: overlayfs does not promise to
show later changes of its lower layer.

Teardown always runs (also when ``start`` fails): SIGRTMIN+4 to the box's PID 1 (= ``systemctl
start poweroff.target --job-mode=replace-irreversibly``), SIGKILL through a pidfd as last resort
(kills the whole PID namespace), then the box cgroups are removed. Every mount lives in the box's
private mount namespace and goes away with it; nothing is mounted on the host. The box's
processes carry a parent-death signal, so a killed test process takes its boxes with it; its
cgroups are removed by name prefix the next time a box with that prefix starts.

Use as a fixture: ``sdbox`` below is a plain generator function. ``tests/conftest.py`` can make
it a fixture with::

    from tests.sdbox import sdbox as _sdbox
    sdbox = pytest.fixture(_sdbox)                    # or pytest.fixture(scope="module")(_sdbox)

Needs root, util-linux (unshare, nsenter, setpriv, mount, pivot_root), /usr/bin/python3.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import select
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
PYTHON = "/usr/bin/python3"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DROPPED_CAPS = ("sys_time", "sys_module", "sys_rawio", "syslog", "wake_alarm", "block_suspend",
                "mac_admin", "mac_override", "sys_pacct")
BOUNDING_SET = ",".join("-" + cap for cap in DROPPED_CAPS)
CGROUP_FS = "/sys/fs/cgroup"
UNIT_DIRS = ("/etc/systemd/system", "/usr/local/lib/systemd/system", "/lib/systemd/system",
             "/usr/lib/systemd/system")
GENERATOR_DIRS = ("/lib/systemd/system-generators", "/usr/lib/systemd/system-generators",
                  "/usr/local/lib/systemd/system-generators", "/etc/systemd/system-generators")
# Packages whose units make up "systemd's core" (read from dpkg's file lists).
CORE_PACKAGES = ("systemd", "dbus", "dbus-system-bus-common", "dbus-daemon")
# Masked even though systemd ships them.
ALWAYS_MASKED = (
    # gettys
    "getty@.service", "serial-getty@.service", "console-getty.service", "container-getty@.service",
    "autovt@.service", "getty-static.service", "getty.target",
    # clock, LSM, udev, kernel modules, sysctl, binfmt, pstore, seed, journal flush
    "systemd-timesyncd.service", "apparmor.service",
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-hwdb-update.service",
    "systemd-modules-load.service", "kmod-static-nodes.service", "modprobe@.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-pstore.service", "systemd-random-seed.service", "systemd-journal-flush.service",
    # kernel-global state that is not namespaced: audit stream, debugfs, tracefs, configfs, fusectl
    "systemd-journald-audit.socket", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "sys-kernel-config.mount", "sys-fs-fuse-connections.mount",
)
MASKED_GENERATORS = ("systemd-sysv-generator", "systemd-getty-generator")
# The project's own units are what the box is for: never masked, even when installed on the host.
OWN_UNITS_PREFIX = "tunvpnd"
BOX_ENV = ("PATH=" + PATH, "LANG=C.UTF-8", "TERM=dumb", "HOME=/root", "SYSTEMD_PAGER=",
           "SYSTEMD_COLORS=0")
CONSOLE_KEEP = 256 * 1024

_live_boxes: set[SystemdBox] = set()


class BoxError(RuntimeError):
    """The box failed to boot or misbehaved; the message carries the console tail."""


class BoxCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the command's output."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\n--- stdout ---\n{self.stdout}"
                f"\n--- stderr ---\n{self.stderr}")


# ----------------------------------------------------------------------------------------------
# The first process inside the new namespaces. It runs as PID 1 of the new PID namespace (with the
# reduced bounding set, inside the box cgroups), builds the root and execs systemd.
_STAGE = r"""
import json, os, socket, subprocess, sys
cfg = json.loads(sys.argv[1])
# Guard: never touch anything unless every namespace is really new.
for ns, host_ns in cfg["host_ns"].items():
    if os.readlink("/proc/self/ns/" + ns) == host_ns:
        sys.exit("tvbox stage: still in the host's %s namespace, refusing" % ns)
if os.getpid() != 1:
    sys.exit("tvbox stage: not PID 1 of a new PID namespace, refusing")
# Host directories handed in by the test, opened before anything is mounted over a host path
# (the staging tmpfs below covers /tmp in this namespace); bound later via /proc/self/fd.
binds = [(os.open(host, os.O_PATH), inside, os.path.isdir(host)) for host, inside in cfg["binds"]]

def sh(*argv, pass_fds=()):
    subprocess.run(argv, check=True, pass_fds=pass_fds)

def mount(*argv, pass_fds=()):
    sh("mount", *argv, pass_fds=pass_fds)

def mkdir(path, mode=0o755):
    os.makedirs(path, mode=mode, exist_ok=True)

def mknod(path, major, minor, mode=0o666):
    os.mknod(path, 0o020000 | mode, os.makedev(major, minor))
    os.chmod(path, mode)

mount("--make-rprivate", "/")
# Root: overlay of the host root filesystem with a tmpfs upper layer, then pivot_root into it.
# /tmp is only a mount point here: this mount namespace is private, the host's /tmp is untouched.
mount("-t", "tmpfs", "-o", "mode=0700", "tvbox-upper", "/tmp")
for d in ("upper", "work", "root"):
    mkdir("/tmp/" + d)
os.chmod("/tmp/upper", 0o755)
mount("-t", "overlay", "-o", "lowerdir=/,upperdir=/tmp/upper,workdir=/tmp/work",
      "tvbox-root", "/tmp/root")
os.chdir("/tmp/root")
OLD = "/.tvbox-oldroot"
mkdir("/tmp/root" + OLD, 0o700)
sh("pivot_root", ".", "." + OLD)
os.chdir("/")
# From here on, paths resolve inside the new root: absolute symlinks cannot reach the host.

# /proc: new procfs; /proc/sys read-only except /proc/sys/net (per network namespace).
mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", "/proc")
mount("--bind", "/proc/sys", "/proc/sys")
mount("-o", "remount,bind,ro,nosuid,nodev,noexec", "/proc/sys")
mount("--bind", "/proc/sys/net", "/proc/sys/net")
mount("-o", "remount,bind,rw,nosuid,nodev,noexec", "/proc/sys/net")
if os.path.exists("/proc/sysrq-trigger"):
    mount("--bind", "/proc/sysrq-trigger", "/proc/sysrq-trigger")
    mount("-o", "remount,bind,ro", "/proc/sysrq-trigger")

# /sys: new sysfs (shows this net namespace); private /sys/fs/cgroup; both read-only at the end.
mount("-t", "sysfs", "-o", "nosuid,nodev,noexec", "sysfs", "/sys")
if cfg["cgroup_unified"]:
    mount("-t", "cgroup2", "-o", "nosuid,nodev,noexec", "cgroup2", "/sys/fs/cgroup")
else:
    mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev,noexec,size=1m", "tmpfs", "/sys/fs/cgroup")
    for name, fstype, opts in cfg["cgroup_mounts"]:
        mkdir("/sys/fs/cgroup/" + name)
        mount("-t", fstype, "-o", "nosuid,nodev,noexec" + ("," + opts if opts else ""),
              fstype, "/sys/fs/cgroup/" + name)
    for name, target in cfg["cgroup_links"]:
        os.symlink(target, "/sys/fs/cgroup/" + name)
    mount("-o", "remount,bind,ro,nosuid,nodev,noexec", "/sys/fs/cgroup")
mount("-o", "remount,bind,ro,nosuid,nodev,noexec", "/sys")

# /dev: own tmpfs with a few nodes, new devpts instance, /dev/shm, the console pty.
mount("-t", "tmpfs", "-o", "mode=0755,nosuid,size=4m", "tmpfs", "/dev")
for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                           ("urandom", 1, 9), ("tty", 5, 0)):
    mknod("/dev/" + name, major, minor)
mkdir("/dev/net")
mknod("/dev/net/tun", 10, 200)
mkdir("/dev/pts")
mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec",
      "devpts", "/dev/pts")
os.symlink("pts/ptmx", "/dev/ptmx")
mkdir("/dev/shm", 0o1777)
mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/dev/shm")
for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(target, "/dev/" + name)
open("/dev/console", "w").close()
mount("--bind", OLD + cfg["console"], "/dev/console")

# Fresh tmpfs where systemd, journald and tests write.
mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/run")
mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/tmp")
mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/var/log")

# Host directories handed in by the test: read-only binds.
for fd, inside, is_dir in binds:
    if is_dir:
        mkdir(inside)
    else:
        mkdir(os.path.dirname(inside))
        open(inside, "a").close()
    mount("--no-canonicalize", "--bind", "/proc/self/fd/%d" % fd, inside, pass_fds=(fd,))
    mount("-o", "remount,bind,ro", inside)
    os.close(fd)

sh("umount", "-l", OLD)
os.rmdir(OLD)

# Configuration, written into the overlay's upper layer.
for path, text, mode in cfg["files"]:
    mkdir(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
for path, target in cfg["symlinks"]:
    mkdir(os.path.dirname(path))
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)

mount("--make-rshared", "/")
socket.sethostname(cfg["hostname"])
os.execv("/usr/bin/env", ["env", "-i", "container=lxc", "PATH=" + cfg["path"], cfg["systemd"]])
"""

# Moves itself into the box cgroups ($2..$n+1), then execs the rest of its arguments.
_ENTER_CGROUPS = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; '
                  'n=$((n-1)); done; exec "$@"')


# ----------------------------------------------------------------------------------------------
# cgroups


def _mountinfo() -> list[dict]:
    rows = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        fstype, source, super_opts = (right.split() + ["", "", ""])[:3]
        rows.append({"root": f[3], "mountpoint": f[4], "opts": f[5], "optional": f[6:],
                     "fstype": fstype, "source": source, "super": super_opts})
    return rows


def _controllers() -> set[str]:
    names = set()
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        names.add(line.split()[0])
    return names


def _hierarchies() -> list[dict]:
    """The caller's cgroup hierarchies: mount point, mount options for the box, caller's path."""
    mounts = _mountinfo()
    controllers = _controllers()
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        want = set(ctrl.split(",")) if ctrl else set()
        for m in mounts:
            if m["fstype"] == "cgroup2" and not ctrl:
                pass
            elif m["fstype"] == "cgroup" and ctrl:
                opts = set(m["super"].split(","))
                if want - opts:
                    continue
                if {o for o in opts if o in controllers or o.startswith("name=")} != want:
                    continue
            else:
                continue
            if m["mountpoint"] != CGROUP_FS and not m["mountpoint"].startswith(CGROUP_FS + "/"):
                continue
            root = m["root"].rstrip("/")
            if not (path + "/").startswith(root + "/"):
                continue
            rel = path[len(root):].strip("/")
            mount_opts = ",".join(sorted(want)) if ctrl else ""
            if ctrl and not (want & controllers):
                mount_opts = "none," + mount_opts
            out.append({"mountpoint": m["mountpoint"], "fstype": m["fstype"],
                        "opts": mount_opts, "dir": os.path.join(m["mountpoint"], rel)})
            break
    return out


def _cgroup_has_procs(top: str) -> bool:
    for dirpath, _, _ in os.walk(top):
        with contextlib.suppress(OSError):
            if Path(dirpath, "cgroup.procs").read_text().strip():
                return True
    return False


def _rmdir_tree(top: str) -> None:
    for dirpath, _, _ in sorted(os.walk(top, topdown=False), key=lambda t: -t[0].count("/")):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


def _remove_cgroup_trees(dirs: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        errors = []
        for top in dirs:
            try:
                _rmdir_tree(top)
            except OSError as e:
                errors.append(f"{top}: {e}")
        if not errors:
            return
        if time.monotonic() > deadline:
            raise BoxError("could not remove box cgroups: " + "; ".join(errors))
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _box_name_re(prefix: str = r"[A-Za-z0-9][A-Za-z0-9-]*") -> re.Pattern:
    return re.compile(rf"({prefix})-(\d+)-[0-9a-f]{{8}}")


def remove_stale_cgroups(name_prefix: str) -> list[str]:
    """Remove cgroups left by crashed boxes named ``<name_prefix>-<pid>-<hex>``.

    Only trees whose creator process is gone (or is us, for boxes we no longer run) and that hold
    no process are removed. Returns the removed directories.
    """
    pattern = _box_name_re(re.escape(name_prefix))
    ours = {box.name for box in _live_boxes}
    removed = []
    for h in _hierarchies():
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(h["dir"]):
                m = pattern.fullmatch(entry)
                if not m or entry in ours:
                    continue
                creator = int(m.group(2))
                if creator != os.getpid() and _pid_alive(creator):
                    continue
                top = os.path.join(h["dir"], entry)
                if not os.path.isdir(top) or _cgroup_has_procs(top):
                    continue
                try:
                    _rmdir_tree(top)
                except OSError:
                    continue
                removed.append(top)
    return removed


# ----------------------------------------------------------------------------------------------
# masks


def _dpkg_unit_names(packages: tuple[str, ...]) -> set[str] | None:
    info = Path("/var/lib/dpkg/info")
    names: set[str] = set()
    found = False
    for pkg in packages:
        for lst in (info / f"{pkg}.list", *info.glob(f"{pkg}:*.list")):
            if not lst.is_file():
                continue
            found = True
            for line in lst.read_text().splitlines():
                if "/systemd/system/" in line or "/systemd/system-generators/" in line:
                    names.add(os.path.basename(line))
    return names if found else None


def _installed(dirs: tuple[str, ...]) -> set[str]:
    names: set[str] = set()
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(d):
                if not entry.is_dir(follow_symlinks=False):
                    names.add(entry.name)
    return names


def masked_units() -> tuple[list[str], list[str]]:
    """(units, generators) a box masks: fixed list + timers + non-core units found installed."""
    core = _dpkg_unit_names(CORE_PACKAGES)
    if core is None:  # no dpkg: treat systemd's own naming as core
        def is_core(name: str) -> bool:
            return name.startswith(("systemd-", "dbus")) or name.endswith(".target")
    else:
        def is_core(name: str) -> bool:
            return name in core
    units = set(ALWAYS_MASKED)
    for name in _installed(UNIT_DIRS):
        if name.startswith(OWN_UNITS_PREFIX):
            continue
        if name.endswith(".timer"):
            units.add(name)
        elif name.endswith((".service", ".socket", ".path")) and not is_core(name):
            units.add(name)
    generators = set(MASKED_GENERATORS)
    generators.update(g for g in _installed(GENERATOR_DIRS) if not is_core(g))
    return sorted(units), sorted(generators)


# ----------------------------------------------------------------------------------------------


class SystemdBox:
    """A systemd booted as PID 1 in fresh namespaces. See the module docstring. Usage::

        with SystemdBox(binds={str(tmp_path): "/srv/data"}) as box:
            box.write_file("/etc/systemd/system/x.service", unit_text)
            box.systemctl("daemon-reload")
            box.systemctl("start", "x.service")
            print(box.journalctl("-u", "x.service").stdout)

    Commands run through ``nsenter`` after moving into the box's cgroups, as root of the box,
    with the reduced bounding set; ``start`` must be called from a thread that outlives the box
    (its processes carry a parent-death signal).
    """

    def __init__(self, name_prefix: str = "tvbox", *, binds: dict[str, str] | None = None):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,30}", name_prefix):
            raise ValueError(f"bad name_prefix {name_prefix!r}")
        self.name_prefix = name_prefix
        self.name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self.binds = dict(binds or {})
        for host, inside in self.binds.items():
            if not (os.path.isabs(host) and os.path.isabs(inside)) or ".." in Path(inside).parts:
                raise ValueError(f"binds need absolute paths: {host!r} -> {inside!r}")
        self.boot_seconds: float | None = None
        self.shutdown_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._cgroup_dirs: list[str] = []
        self._procs_files: list[str] = []
        self._master = self._slave = None
        self._wake = None
        self._console = bytearray()
        self._console_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._started = False
        self._systemd_up = False
        self._stopped = False

    # -- properties ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Host pid of the box's PID 1 (systemd)."""
        if self._pid is None:
            raise BoxError("box not started")
        return self._pid

    @property
    def root(self) -> str:
        """Host path of the box's root, through /proc/PID/root.

        Fine for reading plain files. Absolute symlinks inside the box resolve against the
        *host's* root when followed through this path: write with ``write_file``.
        """
        return f"/proc/{self.pid}/root"

    @property
    def console(self) -> str:
        """What the box wrote to /dev/console (last 256 KiB)."""
        with self._console_lock:
            return self._console.decode("utf-8", "replace")

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> SystemdBox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> SystemdBox:
        """Boot; return once ``systemctl is-system-running`` says running or degraded."""
        if self._started:
            raise BoxError("a SystemdBox starts once")
        self._started = True
        if os.geteuid() != 0:
            raise BoxError("SystemdBox needs root")
        t0 = time.monotonic()
        _live_boxes.add(self)
        try:
            self._boot(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def _boot(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        remove_stale_cgroups(self.name_prefix)
        hierarchies = _hierarchies()
        if not hierarchies:
            raise BoxError("no cgroup hierarchies found under " + CGROUP_FS)
        procs = []
        for h in hierarchies:
            d = os.path.join(h["dir"], self.name)
            os.mkdir(d)
            self._cgroup_dirs.append(d)
            if "cpuset" in h["opts"].split(","):
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    Path(d, knob).write_text(Path(h["dir"], knob).read_text())
            if "devices" in h["opts"].split(","):
                Path(d, "devices.deny").write_text("b *:* rwm\n")  # no host disks in the box
            procs.append(os.path.join(d, "cgroup.procs"))
        self._procs_files = procs

        self._master, self._slave = os.openpty()
        self._wake = os.pipe()
        self._reader = threading.Thread(target=self._drain_console, daemon=True,
                                        name=f"{self.name}-console")
        self._reader.start()

        unified = any(h["mountpoint"] == CGROUP_FS for h in hierarchies)
        links = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(CGROUP_FS):
                if entry.is_symlink() and not unified:
                    links.append((entry.name, os.readlink(entry.path)))
        units, generators = masked_units()
        files = [
            ("/etc/hostname", self.name + "\n", 0o644),
            ("/etc/machine-id", uuid.uuid4().hex + "\n", 0o444),
            ("/etc/fstab", "# tvbox: nothing to mount\n", 0o644),
            ("/etc/systemd/journald.conf.d/tvbox.conf",
             "[Journal]\nStorage=volatile\nRateLimitIntervalSec=0\n", 0o644),
            ("/etc/systemd/system.conf.d/tvbox.conf", "[Manager]\nDefaultLimitCORE=0\n", 0o644),
            ("/etc/systemd/system/tvbox.target",
             "[Unit]\nDescription=tvbox test boot target\nRequires=sysinit.target\n"
             "Wants=sockets.target\nAfter=sysinit.target sockets.target\nAllowIsolate=yes\n",
             0o644),
        ]
        symlinks = [("/etc/systemd/system/default.target", "tvbox.target")]
        symlinks += [(f"/etc/systemd/system/{u}", "/dev/null") for u in units]
        symlinks += [(f"/etc/systemd/system-generators/{g}", "/dev/null") for g in generators]
        cfg = {
            "hostname": self.name,
            "host_ns": {ns: os.readlink(f"/proc/self/ns/{ns}")
                        for ns in ("mnt", "uts", "ipc", "net", "cgroup")},
            "console": os.ttyname(self._slave),
            "cgroup_unified": unified,
            "cgroup_mounts": [(os.path.relpath(h["mountpoint"], CGROUP_FS), h["fstype"], h["opts"])
                              for h in hierarchies],
            "cgroup_links": links,
            "binds": sorted(self.binds.items()),
            "files": files,
            "symlinks": symlinks,
            "path": PATH,
            "systemd": SYSTEMD,
        }
        argv = [
            "setpriv", "--pdeathsig", "KILL", "--bounding-set", BOUNDING_SET, "--",
            "/bin/sh", "-c", _ENTER_CGROUPS, "sh", str(len(procs)), *procs,
            "unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            "--uts", "--ipc", "--net", "--cgroup", "--",
            PYTHON, "-I", "-S", "-c", _STAGE, json.dumps(cfg),
        ]
        self._proc = subprocess.Popen(argv, stdin=self._slave, stdout=self._slave,
                                      stderr=self._slave, env={"PATH": PATH}, cwd="/",
                                      close_fds=True)

        # The box's PID 1 is unshare's only child; it becomes systemd by exec.
        while True:
            self._check_alive("while starting")
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
                kids = children.read_text().split()
                if kids:
                    self._pid = int(kids[0])
                    self._pidfd = os.pidfd_open(self._pid)
                    break
            self._wait_tick(deadline, "box PID 1 did not appear")
        while True:
            self._check_alive("while starting")
            with contextlib.suppress(OSError):
                if os.path.basename(os.readlink(f"/proc/{self._pid}/exe")) == "systemd":
                    self._systemd_up = True
                    break
            self._wait_tick(deadline, "stage did not exec systemd")
        state = ""
        while True:
            self._check_alive("while booting")
            left = max(1.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                state = self.systemctl("is-system-running", check=False,
                                       timeout=min(5.0, left)).stdout.strip()
            if state in ("running", "degraded"):
                return
            if state in ("maintenance", "stopping", "offline"):
                raise BoxError(f"box reached state {state!r}\n{self._diagnostics()}")
            self._wait_tick(deadline, f"box still {state!r}")

    def _wait_tick(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise BoxError(f"{self.name}: {what} before the deadline\n{self._diagnostics()}")
        time.sleep(0.02)

    def _check_alive(self, when: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise BoxError(f"{self.name}: box exited ({self._proc.returncode}) {when}\n"
                           f"--- console ---\n{self.console[-4000:]}")

    def _diagnostics(self) -> str:
        out = [f"--- console ---\n{self.console[-4000:]}"]
        with contextlib.suppress(Exception):
            out.append("--- failed units ---\n"
                       + self.systemctl("--failed", check=False, timeout=5).stdout)
            out.append("--- jobs ---\n"
                       + self.systemctl("list-jobs", check=False, timeout=5).stdout)
        return "\n".join(out)

    def _drain_console(self) -> None:
        while True:
            ready, _, _ = select.select([self._master, self._wake[0]], [], [])
            if self._wake[0] in ready:
                return
            try:
                data = os.read(self._master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._console_lock:
                self._console += data
                del self._console[:-CONSOLE_KEEP]

    def stop(self, timeout: float = 20) -> None:
        """Power the box off (SIGKILL after ``timeout`` s), then remove its cgroups. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        try:
            if self._proc is not None and self._proc.poll() is None:
                if self._pidfd is not None:
                    # SIGRTMIN+4 = poweroff.target, --job-mode=replace-irreversibly. Before
                    # systemd has exec'd, PID 1 has no handler for it: kill right away.
                    sig = signal.SIGRTMIN + 4 if self._systemd_up else signal.SIGKILL
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(self._pidfd, sig)
                    try:
                        self._proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()  # unshare --kill-child takes the box's PID 1 along
                    self._proc.wait(5)
            self.shutdown_seconds = time.monotonic() - t0
        finally:
            try:
                if self._cgroup_dirs:
                    _remove_cgroup_trees(self._cgroup_dirs, timeout=10)
            finally:
                self._close_console()
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
                _live_boxes.discard(self)

    def _close_console(self) -> None:
        if self._wake is not None:
            os.write(self._wake[1], b"x")
            if self._reader is not None:
                self._reader.join(5)
            for fd in (*self._wake, self._master, self._slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake = None

    # -- commands ------------------------------------------------------------------------------

    def _enter(self, argv: list[str]) -> list[str]:
        if isinstance(argv, str | bytes):
            raise TypeError("argv must be a list of strings, not a string")
        if self._stopped or self._pid is None:
            raise BoxError(f"{self.name} is not running")
        # Into the box's cgroups first (nsenter changes namespaces, not cgroups), so commands
        # get the box's limits (e.g. no block devices) and show up as box processes.
        return ["setpriv", "--pdeathsig", "KILL", "--bounding-set", BOUNDING_SET, "--",
                "/bin/sh", "-c", _ENTER_CGROUPS, "sh", str(len(self._procs_files)),
                *self._procs_files,
                "nsenter", "-t", str(self._pid), "-a", "--",
                "setpriv", "--pdeathsig", "KILL", "--",
                "env", "-i", *BOX_ENV, *argv]

    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the box as root (all its namespaces, reduced bounding set, clean env).

        Text output is captured. ``check`` raises BoxCommandError (a CalledProcessError whose
        message shows stdout and stderr).
        """
        cp = subprocess.run(self._enter(list(argv)), input=input, capture_output=True, text=True,
                            timeout=timeout, env={"PATH": PATH}, cwd="/")
        cp.args = list(argv)
        if check and cp.returncode:
            raise BoxCommandError(cp.returncode, cp.args, cp.stdout, cp.stderr)
        return cp

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start argv inside the box and return at once (e.g. a ping running across a reload)."""
        return subprocess.Popen(self._enter(list(argv)), env={"PATH": PATH}, cwd="/", **kwargs)

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def journalctl(self, *args: str, check: bool = True,
                   timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["journalctl", "--no-pager", *args], check=check, timeout=timeout)

    def write_file(self, path: str, text: str | bytes, mode: int = 0o644) -> None:
        """Write a file inside the box (atomically, creating parent dirs).

        Goes through the box's own root, so symlinks resolve inside the box; an existing symlink
        at ``path`` (e.g. a mask) is replaced, not followed. Lands in the overlay's upper layer.
        """
        if not os.path.isabs(path):
            raise ValueError(f"absolute path needed: {path!r}")
        data = text.encode() if isinstance(text, str) else text
        script = ('set -e; mkdir -p -- "$(dirname -- "$1")"; t=$(mktemp -- "$1.XXXXXX"); '
                  'cat > "$t"; chmod "$2" "$t"; mv -fT -- "$t" "$1"')
        argv = ["/bin/sh", "-c", script, "sh", path, format(mode, "o")]
        cp = subprocess.run(self._enter(argv), input=data, capture_output=True, timeout=30,
                            env={"PATH": PATH}, cwd="/")
        if cp.returncode:
            raise BoxCommandError(cp.returncode, argv, cp.stdout.decode(errors="replace"),
                                  cp.stderr.decode(errors="replace"))

    def read_file(self, path: str) -> str:
        """Read a text file inside the box."""
        return self.run(["cat", "--", path], timeout=30).stdout


def sdbox():
    """Plain generator for a pytest fixture: yields a started SystemdBox, stops it afterwards."""
    with SystemdBox() as box:
        yield box


@atexit.register
def _stop_leftover_boxes() -> None:
    for box in list(_live_boxes):
        with contextlib.suppress(Exception):
            box.stop(timeout=5)


# ----------------------------------------------------------------------------------------------
# host snapshot


def _strip_peer_ids(optional: list[str]) -> tuple[str, ...]:
    return tuple(sorted(re.sub(r":\d+$", "", o) for o in optional))


def _other_box_dir(name: str) -> bool:
    """A top-level cgroup of a box made by another process (a concurrent or crashed test run)."""
    m = _box_name_re().fullmatch(name)
    return bool(m) and int(m.group(2)) != os.getpid()


def host_snapshot() -> dict:
    """What a box must not change on the host; compare two snapshots with ``==``.

    mounts: /proc/self/mountinfo without mount ids and peer-group numbers, and without the
    volatile network-namespace entries (nsfs mounts and /run/netns itself): those come and go
    with ``ip netns add/del`` of any test on the host and are covered by ``netns``. The harness
    mounts nothing on the host (every box mount is in the box's private mount namespace).
    Also: /sys/fs/cgroup mounts with their ro/rw state, links of the root network namespace,
    ``ip netns list``, cgroup directories under the caller's cgroups (boxes made by other
    processes left out: concurrent runs come and go, crashed ones are swept by prefix), /dev
    entries with type, mode, owner and device number, journal directory listings, hostname.

    ``netns`` and ``links`` are shared with anything else running on the host; see
    ``host_diff`` for comparing them.
    """
    mounts = _mountinfo()
    snap: dict = {
        "mounts": sorted((m["mountpoint"], m["root"], m["fstype"], m["source"], m["opts"],
                          m["super"], _strip_peer_ids(m["optional"])) for m in mounts
                         if m["fstype"] != "nsfs" and m["mountpoint"] != "/run/netns"
                         and not m["mountpoint"].startswith("/run/netns/")),
        "cgroupfs": sorted((m["mountpoint"], m["fstype"], m["opts"].split(",")[0])
                           for m in mounts if m["mountpoint"] == CGROUP_FS
                           or m["mountpoint"].startswith(CGROUP_FS + "/")),
        "hostname": socket.gethostname(),
    }
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout or "[]")
    snap["links"] = sorted((li["ifname"], tuple(sorted(li.get("flags", []))), li.get("mtu"),
                            li.get("address")) for li in links)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    snap["netns"] = sorted(line.split()[0] for line in netns.stdout.splitlines() if line.strip())
    cgroups = {}
    for h in _hierarchies():
        found = []
        for dirpath, dirnames, _ in os.walk(h["dir"]):
            if dirpath == h["dir"]:
                dirnames[:] = [d for d in dirnames if not _other_box_dir(d)]
            found.append(os.path.relpath(dirpath, h["dir"]))
        cgroups[h["dir"]] = sorted(found)
    snap["cgroups"] = cgroups
    dev = []
    for name in sorted(os.listdir("/dev")):
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(os.path.join("/dev", name))
            dev.append((name, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, st.st_rdev))
    snap["dev"] = dev
    journal = {}
    for top in ("/var/log/journal", "/run/log/journal"):
        if os.path.isdir(top):
            journal[top] = sorted(os.path.relpath(os.path.join(d, f), top)
                                  for d, subdirs, files in os.walk(top) for f in files + subdirs)
        else:
            journal[top] = None
    snap["journal"] = journal
    return snap


def host_diff(before: dict, after: dict) -> dict:
    """{key: {"removed": [...], "added": [...]}} for every snapshot key that differs."""
    def flat(value) -> set[str]:
        if isinstance(value, dict):
            return {f"{k}: {item!r}" for k, v in value.items()
                    for item in (v or ["<empty>"] if isinstance(v, list) else [v])}
        if isinstance(value, list):
            return {repr(v) for v in value}
        return {repr(value)}

    diff = {}
    for key in sorted(set(before) | set(after)):
        a, b = flat(before.get(key)), flat(after.get(key))
        if a != b:
            diff[key] = {"removed": sorted(a - b), "added": sorted(b - a)}
    return diff


# Shared with whatever else runs on this host (other test suites add and delete network
# namespaces and links there): checked by name instead of by equality.
SHARED_KEYS = ("netns", "links")


def assert_host_same(before: dict, after: dict, token: str) -> None:
    """The host looks as in `before`; for shared keys, nothing named with `token` changed."""
    diff = host_diff(before, after)
    strict = {k: v for k, v in diff.items() if k not in SHARED_KEYS}
    assert strict == {}, f"host changed: {json.dumps(strict, indent=1)}"
    for key in SHARED_KEYS:
        for item in diff.get(key, {}).get("added", []) + diff.get(key, {}).get("removed", []):
            assert token not in item, f"box leaked {key} onto the host: {item}"
