"""Command line: `tunvpnd run|check PROFILE`, `tunvpnd show [NAME]`, `tunvpnd lab up|demo|down`,
`tunvpnd genkey|pubkey|genpsk` (WireGuard keys, as `wg` makes them), `tunvpnd import WG_CONF`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:  # imported when used: `run` blocks its signals as early as it can
    from .profile import Profile

EX_CONFIG = 78  # sysexits.h: the unit's RestartPreventExitStatus= keeps a bad profile from looping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunvpnd", description="A small UDP VPN daemon.")
    parser.add_argument("--version", action="version", version=f"tunvpnd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run in the foreground"), ("check", "validate a profile")):
        command = commands.add_parser(name, help=text)
        command.add_argument("profile", help="a .yaml path, or an instance name NAME for "
                             "CONFIG_DIR/NAME.yaml")
        command.add_argument("--config-dir", help="where instance names are looked up "
                             "(default: $TUNVPN_CONFIG_DIR or /etc/tunvpn)")
    undo = commands.add_parser(
        "cleanup", help="undo what a crashed run of PROFILE left outside its TUN (the unit's "
        "ExecStopPost)")
    undo.add_argument("profile", help="the profile's path or instance name")
    wglink = commands.add_parser(
        "wg-link", help="as root, make /run/wireguard/IFNAME.sock lead to instance NAME's "
        "WireGuard UAPI in the run directory, so that `wg` sees it (the unit's ExecStartPost)")
    wglink.add_argument("name", help="the instance name")
    wglink.add_argument("--remove", action="store_true", help="remove the links to it instead "
                        "(the unit's ExecStopPost)")
    show_cmd = commands.add_parser("show", help="what running instances are doing (like `wg "
                               "show`)")
    show_cmd.add_argument("name", nargs="?", help="an instance name (default: every running one)")
    show_cmd.add_argument("--json", action="store_true", help="one JSON document, every field")
    show_cmd.add_argument("--check", action="store_true", help="exit 0 if every configured peer "
                      "had a handshake (plain: a packet) in the last --max-age seconds, 1 if "
                      "not, 3 if the instance is not running")
    show_cmd.add_argument("--max-age", type=float, default=180.0, metavar="SECONDS",
                      help="for --check (default 180)")
    lab = commands.add_parser("lab", help="the SEED lab topology in network namespaces")
    lab.add_argument("action", choices=("up", "demo", "down"))
    lab.add_argument("--prefix", default="tvlab", help="namespace name prefix (default tvlab)")
    lab.add_argument("--wire", choices=("plain", "wireguard"), default="plain",
                     help="up/demo: the wire the daemons speak (default plain; wireguard: "
                     "the wg-*.yaml examples with fresh keys)")
    for name, text in (("genkey", "print a new WireGuard private key (as `wg genkey`)"),
                       ("pubkey", "read a private key on stdin, print its public key (as "
                        "`wg pubkey`)"),
                       ("genpsk", "print a new preshared key (as `wg genpsk`)")):
        commands.add_parser(name, help=text)
    imports = commands.add_parser("import", help="turn a wg-quick config into a profile "
                                  "(DIR/NAME.yaml) and its key files")
    imports.add_argument("config", help="a wg-quick file, such as /etc/wireguard/wg0.conf")
    imports.add_argument("--name", help="the profile's name (default: the file's stem)")
    imports.add_argument("--out", metavar="DIR", help="where to write it (default: "
                         "$TUNVPN_CONFIG_DIR or /etc/tunvpn)")
    imports.add_argument("--force", action="store_true", help="replace an existing profile "
                         "and its key files")
    args = parser.parse_args(argv)
    if args.command == "run":
        # Held, not lost, until the daemon's handlers are in place (service.Daemon._signals):
        # a SIGHUP or SIGTERM while starting must neither kill it nor leave half a set-up.
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

    if args.command == "lab":
        from . import lab as lab_module

        if args.action == "down":
            return lab_module.lab_down(args.prefix)
        action = {"up": lab_module.lab_up, "demo": lab_module.lab_demo}[args.action]
        return action(args.prefix, wire=args.wire)
    if args.command == "cleanup":
        return cleanup(args.profile)
    if args.command == "wg-link":
        return wg_link(args.name, args.remove)
    if args.command == "show":
        return show(args.name, args.json, args.check, args.max_age)
    if args.command in ("genkey", "genpsk", "pubkey"):
        return key_command(args.command)
    if args.command == "import":
        from .importer import import_command

        return import_command(args.config, args.name, args.out, args.force)
    return run_or_check(args.command, args.profile, args.config_dir)


def wg_link(name: str, remove: bool) -> int:
    """`tunvpnd wg-link [--remove] NAME`: 0 unless the name is bad; what it did or could not
    do is one line (stdout, stderr), and `wg` not seeing an instance never fails its unit."""
    from . import wglink
    from .instance import InstanceError, instance_name, run_dir

    try:
        instance = instance_name(name)
    except InstanceError as error:
        _print_error(f"wg-link: {error}")
        return 2
    try:
        if remove:
            for path in wglink.unlink(run_dir(), instance):
                print(f"removed {path}")
        else:
            print(wglink.link(run_dir(), instance))
    except OSError as error:
        _print_error(f"wg-link: {instance}: {error.strerror or error}")
    return 0


def cleanup(name: str) -> int:
    """Put back what a dead run recorded in its state file; nothing to do after a clean stop.

    Works from the instance name alone, so a profile broken since is no obstacle. Holds the
    instance lock while it works: a running daemon's state is never touched.
    """
    from .instance import InstanceBusy, InstanceError, check_run_dir, instance_name, lock_instance
    from .logs import setup_logging
    from .netconf import NetConfig
    from .service import run_dir

    setup_logging()
    log = logging.getLogger("tunvpnd")
    try:
        instance = instance_name(name)
    except InstanceError as error:
        _error(f"cleanup: {error}")
        return 2  # a usage error, like argparse's
    directory = run_dir()
    state = directory / f"{instance}.state"
    try:
        if not check_run_dir(directory) or not (state.exists() or state.is_symlink()):
            return 0  # after a clean stop: nothing to do, nothing touched
        lock = lock_instance(instance, directory)
    except InstanceBusy as busy:
        _error(f"cleanup: {busy}: nothing done (it cleans up itself when it stops)")
        return 1
    except InstanceError as error:
        _error(f"cleanup: {error}")
        return 1
    try:
        with NetConfig(state) as netconf:
            for line in netconf.recover():
                log.warning("undid what a crashed run left behind: %s", line)
    except OSError as error:  # NetConfigError included: say what, no traceback
        _error(f"cleanup: {error}")
        return 1
    finally:
        os.close(lock)
    return 0


EX_NOT_RUNNING = 3  # `show --check`: as LSB init scripts' status says "not running"


def show(name: str | None, as_json: bool, check: bool, max_age: float) -> int:
    """`tunvpnd show [NAME] [--json] [--check]`: ask each instance's control socket."""
    import json

    from .control import query
    from .instance import InstanceError, instance_name, run_dir
    from .status import healthy, render

    directory = run_dir()
    if name is not None:
        try:
            names = [instance_name(name)]
        except InstanceError as error:
            _print_error(f"show: {error}")
            return 2
    else:
        try:
            names = sorted(p.stem for p in directory.glob("*.sock"))
        except OSError:
            names = []
    docs = []
    for instance in names:
        try:
            docs.append(query(directory / f"{instance}.sock"))
        except (FileNotFoundError, ConnectionRefusedError):
            if name is not None:
                _print_error(f"show: tunvpnd {instance} is not running (no answer on "
                             f"{directory / instance}.sock)")
        except OSError as error:
            _print_error(f"show: {instance}: {error.strerror or error}")
    if not docs:
        if name is None:
            _print_error(f"show: no tunvpnd instance is running (none answers in {directory})")
        return EX_NOT_RUNNING
    if as_json:
        print(json.dumps(docs[0] if name is not None else docs, indent=2))
    elif not check:
        print("\n\n".join(render(doc) for doc in docs))
    if check:
        return 0 if all(healthy(doc, max_age) for doc in docs) else 1
    return 0


def _print_error(text: str) -> None:
    print(f"tunvpnd {text}", file=sys.stderr)


def key_command(command: str) -> int:
    """`wg genkey`, `wg genpsk` and `wg pubkey`, byte for byte: one base64 key and a newline on
    stdout. Imports neither pyroute2 nor the daemon. Errors never quote the input key."""
    from .wireguard import keys

    if command == "pubkey":
        stdin = sys.stdin.buffer
        text = stdin.read(keys.KEY_TEXT_SIZE)
        # like wg: after the key, only whitespace (and NULs) until the end of the input
        while chunk := stdin.read(4096):
            if chunk.strip(b" \t\n\v\f\r\0"):
                print("tunvpnd pubkey: trailing characters after the key", file=sys.stderr)
                return 1
        try:
            private = keys.decode_key(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            print("tunvpnd pubkey: the input is not a private key: 44 characters of base64 "
                  "(32 bytes), as `wg genkey` writes it", file=sys.stderr)
            return 1
        key = keys.public_key(private)
    else:
        try:
            mode = os.fstat(sys.stdout.fileno()).st_mode
        except (OSError, ValueError):
            mode = 0
        if stat.S_ISREG(mode) and mode & stat.S_IRWXO:  # the same warning as wg's
            sys.stderr.write("Warning: writing to world accessible file.\n"
                             "Consider setting the umask to 077 and trying again.\n")
        key = keys.generate_private() if command == "genkey" else keys.generate_psk()
    sys.stdout.write(keys.encode_key(key) + "\n")
    sys.stdout.flush()
    return 0


def run_or_check(command: str, name: str, config_dir: str | None) -> int:
    from .logs import setup_logging
    from .profile import ProfileError, load_profile, resolve_profile

    try:
        profile = load_profile(resolve_profile(name, config_dir))
    except ProfileError as error:
        if command == "check":  # plain lines, for a person or an editor's error parser
            print("\n".join(error.problems), file=sys.stderr)
            return EX_CONFIG
        setup_logging()  # under systemd: one journal line per problem, at error priority
        for problem in error.problems:
            _error(problem)
        _error(f"{error.count} problem(s) in the profile: not starting")
        return EX_CONFIG
    if command == "check":
        print(summary(profile))
        return 0
    setup_logging(profile.log_level)
    from .service import Daemon

    return Daemon(profile).run()


def _error(text: str) -> None:
    logging.getLogger("tunvpnd").error("%s", text)


def summary(profile: Profile) -> str:
    """One line that says what the profile will do."""
    addresses = " ".join(map(str, profile.addresses))
    if profile.mode == "client":
        host, port = profile.server
        peer = f"server {'[' + host + ']' if ':' in host else host}:{port}"
    else:
        host, port = profile.listen
        peer = f"listen {'[' + host + ']' if ':' in host else host}:{port}, " + (
            f"{len(profile.peers)} peers" if profile.peers else "learning peers")
    routes = f"{len(profile.routes)} route{'s' if len(profile.routes) != 1 else ''}"
    wire = ""
    if profile.wire == "wireguard":  # our public key, as `wg show` shows it; never the private
        from .wireguard.keys import encode_key

        wire = f", wireguard, public key {encode_key(profile.public_key)}"
    return (f"{profile.path}: OK: {profile.mode} {profile.ifname} {addresses} mtu {profile.mtu}, "
            f"{peer}, {routes}" + (", forwarding" if profile.forward else "") + wire)


if __name__ == "__main__":
    sys.exit(main())
