"""Service lifecycle: set up, tell systemd, forward, reload on SIGHUP, clean up on SIGTERM.

The order matters to systemd: READY=1 only once the TUN is up with its addresses and routes,
forwarding is on and the socket is bound, so units ordered after us find a working tunnel.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path

import sdnotify

from . import fulltunnel, instance, transport
from .core import Core, Counters
from .logs import PacketLog, set_level
from .loop import Forwarder
from .netconf import NetConfig
from .peers import Peer, PeerTable
from .profile import Profile, ProfileError, covering_route, load_profile
from .ratelog import RateLimit
from .tun import check_free, open_tun, open_tun_offload
from .wire import PlainWire

log = logging.getLogger("tunvpnd")

TICK = 1.0            # seconds between timer checks (keepalives, expiry, watchdog at most this)
STATUS_INTERVAL = 5.0
PEERS_LISTED = 10     # peer names a reload logs; the rest are counted
EVERYWHERE = (ip_network("0.0.0.0/0"), ip_network("::/0"))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


def run_dir() -> Path:
    """Where the crash-recovery state and the instance lock live (see instance.run_dir)."""
    return instance.run_dir()


class _StoppedDuringStart(Exception):
    """SIGTERM/SIGINT arrived while starting: undo what was done and exit 0."""


class Daemon:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.notifier = sdnotify.SystemdNotifier()
        if self.notifier.socket is not None:
            # Never wait for the reader: the kernel queues only net.unix.max_dgram_qlen (often
            # 10) datagrams, and a blocked send would stop the loop and every packet with it.
            # A message that does not fit is dropped (sdnotify ignores the error).
            self.notifier.socket.setblocking(False)
        self.netconf: NetConfig | None = None
        self.lock_fd = -1
        self._stop_signal = 0
        self._wake_r = -1
        self.tun_fd = -1
        self.sock = None
        self.forwarder: Forwarder | None = None
        self.server_peer: Peer | None = None
        self.core: Core | None = None
        self.device = None  # wire: wireguard: the tunvpnd.wireguard.device.Device
        self.servers = None  # control.Servers: the control socket and the WireGuard UAPI
        self._metrics: tuple | None = None  # (address, handle) of the /metrics listener
        self.nat = None  # server with masquerade: the tunvpnd.nat.Masquerade
        self._next_nat_check = 0.0
        self._resolving: threading.Thread | None = None
        self._resolved: tuple | None = None
        self._resolved_for: tuple | None = None  # the profile's server that _resolved is for
        self._resolve_error: str = ""
        self._resolve_delay = 1.0
        self._next_resolve = 0.0
        self._retry = False  # resolve and connect again at _next_resolve
        self._addresses: transport.AddressWatch | None = None
        self._silent_warned = False
        self._connected_at = 0.0
        self._next_status = self._next_watchdog = 0.0
        self._watchdog = watchdog_interval()
        self._expired_log = RateLimit()  # server: lines about expired peers
        self._refused_log: dict[str, RateLimit] = {}  # drop reason -> lines about new sources
        self._refused_seen: dict[str, int] = {}  # drop reason -> its counter when last looked
        self.fwmark = 0  # client with a full tunnel: the mark on our socket (fulltunnel.py)

    # -- start and stop ---------------------------------------------------------------------

    def run(self) -> int:
        """Set up, forward until SIGTERM/SIGINT, clean up. The exit code for the process."""
        self._signals()  # before the first change: a signal never finds us half set up
        try:
            self.start()
        except _StoppedDuringStart as stop:
            log.info("%s while starting: stopping", stop)
            self.cleanup()
            return 0
        except Exception as error:  # noqa: BLE001 - any set-up failure: undo, report, exit 1
            # A refusal (OSError, InstanceError) says it all; anything else is a bug.
            bug = not isinstance(error, (OSError, instance.InstanceError))
            log.error("start failed: %s", error, exc_info=bug and log.isEnabledFor(logging.DEBUG))
            self.cleanup()
            return 1
        code = 0
        others = {self.servers.fileno(): self.servers.on_ready} if self.servers else None
        try:
            self.forwarder.run(self._wake_r, self._on_signal, self._on_tick, others)
        except Exception:  # noqa: BLE001 - a bug must still leave the host as it was
            log.exception("forwarding loop failed")
            code = 1
        self.notify("STOPPING=1", f"STATUS=stopping; {self.status()}")
        self.cleanup()
        log.info("stopped; %s", self.status())
        return code

    def start(self) -> None:
        p = self.profile
        # The lock first: a second daemon on this profile must not touch anything of ours.
        self.lock_fd = instance.lock_instance(p.name)
        check_free(p.ifname)  # an interface we did not create is never adopted
        self._stop_point()
        state = run_dir() / f"{p.name}.state"
        self.netconf = NetConfig(state)
        for line in self.netconf.recover():
            log.warning("undid what an earlier run left behind: %s", line)
        self._stop_point()
        offloads = 0
        if offloads_wanted():
            self.tun_fd, self.ifname, offloads = open_tun_offload(p.ifname)
        else:
            self.tun_fd, self.ifname = open_tun(p.ifname)
        self.ifindex = self.netconf.setup_interface(self.ifname, p.addresses, p.mtu)
        self._stop_point()
        main_routes, everywhere = _split_routes(p)
        self.netconf.sync_routes(self.ifindex, main_routes, strict=True)
        if everywhere:
            self._full_tunnel(p, everywhere)
        if p.forward:
            self.netconf.enable_forwarding(self.ifindex)
        self._apply_masquerade(p)
        self._stop_point()

        peers = PeerTable()
        pktinfo = False
        wire = PlainWire() if p.wire == "plain" else self._wireguard_wire(p)
        if p.mode == "client":
            family = transport.client_family(p.server[0])
            self.sock = transport.open_udp("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
            if self.fwmark:  # before the first datagram: none may take the tunnel's way
                fulltunnel.mark_socket(self.sock, self.fwmark)
            # Only where we connect to: until then the socket takes datagrams from anyone, and
            # the first to guess its port must not become our server.
            self.server_peer = Peer("server", EVERYWHERE, roams=False)
            peers.add(self.server_peer)
            self._watch_addresses()
        else:
            self.sock = transport.open_udp(*p.listen)
            pktinfo = transport.enable_pktinfo(self.sock)  # answer from the address asked
            for peer in self._configured_peers(p):
                peers.add(peer)
        if self.device is not None:
            self._attach_sessions(p, peers)
        # WireGuard has keepalives of its own (passive and persistent): no plain echo
        self.core = Core(peers, wire, echo_keepalives=p.mode == "server" and p.wire == "plain")
        self.forwarder = Forwarder(self.tun_fd, self.sock, self.core, offloads, pktinfo)
        self._apply_logging(p)
        self._apply_learning(p)
        self._apply_addresses(p)
        self._apply_mss(p)
        if p.mode == "client":
            self._start_resolving(time.monotonic())

        where = transport.format_endpoint(self.sock.getsockname())
        log.info("%s %s up: %s mtu %d, %s, socket %s", p.mode, self.ifname,
                 " ".join(map(str, p.addresses)), p.mtu,
                 f"routes {' '.join(map(str, p.routes))}" if p.routes else "no routes", where)
        log.info("offloads: %s", self.forwarder.describe_offloads())
        if self.device is not None:
            log.info("wireguard: public key %s, %d peers", self._encode(self.device.public_key),
                     len(self.device.peers))
        self._serve()
        self._apply_metrics(p)
        self._stop_point()
        self.notify("READY=1", f"STATUS={self.status()}")

    def _full_tunnel(self, p: Profile, versions: list[int]) -> None:
        recs = self.netconf.full_tunnel(self.ifindex, versions, p.table, p.fwmark)
        self.fwmark = recs[0]["fwmark"]
        log.info("full tunnel: IPv%s through %s by policy routing (table %d, fwmark %#x)",
                 " and IPv".join(map(str, versions)), self.ifname, recs[0]["table"],
                 self.fwmark)
        strict = self.netconf.strict_rp_filter(self.ifindex) if 4 in versions else []
        if strict:
            log.warning("full tunnel: strict reverse-path filtering (rp_filter=1) on %s drops "
                        "the server's replies there: set net.ipv4.conf.all.rp_filter and that "
                        "interface's to 2 (loose)", ", ".join(strict))
        if versions == [4]:
            leak = self.netconf.global_ipv6(self.ifindex)
            if leak:
                log.warning("full tunnel for IPv4 only, but this host has global IPv6 (%s): "
                            "IPv6 traffic leaves outside the tunnel; add ::/0 to routes to "
                            "send it through the tunnel too", leak)

    def cleanup(self) -> None:
        """Put the host back as it was: routes, forwarding, TUN, socket, state file."""
        if self.servers is not None:  # first: nobody asks about a tunnel going away
            self.servers.close()
            self.servers = None
        if self.nat is not None:  # its table goes with the state file's other records
            self.nat.close()
            self.nat = None
        if self.netconf is not None:
            try:
                self.netconf.restore()
            except Exception as error:  # noqa: BLE001 - keep going: close what we can
                log.error("could not restore network settings: %s", error)
            self.netconf.close()
            self.netconf = None
        if self.tun_fd >= 0:
            os.close(self.tun_fd)  # non-persistent: the kernel removes the TUN and its routes
            self.tun_fd = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._addresses is not None:
            self._addresses.close()
            self._addresses = None
        if self.lock_fd >= 0:  # last: the next run may start once everything is back
            os.close(self.lock_fd)
            self.lock_fd = -1

    # -- signals ----------------------------------------------------------------------------

    def _signals(self) -> None:
        # The C-level handler writes each signal number to this pipe, which wakes epoll; the
        # loop reads the numbers and acts between packets.  The Python handler only notes a
        # stop for start(), which checks it between steps.  cli.py blocked these signals
        # before reading the profile; they are unblocked here, so one that came in between
        # is handled now, not lost.  A SIGHUP while starting waits in the pipe: the loop
        # reloads once it runs.
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

        def note(number: int, _frame: object) -> None:
            if number in STOP_SIGNALS and not self._stop_signal:
                self._stop_signal = number

        for number in HANDLED_SIGNALS:
            signal.signal(number, note)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _stop_point(self) -> None:
        """Between two steps of start(): give up now if SIGTERM/SIGINT came in."""
        if self._stop_signal:
            raise _StoppedDuringStart(signal.Signals(self._stop_signal).name)

    def _on_signal(self) -> None:
        try:
            numbers = os.read(self._wake_r, 64)
        except BlockingIOError:
            return
        for number in numbers:
            if number in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: stopping", signal.Signals(number).name)
                self.forwarder.stop()
            elif number == signal.SIGHUP:
                self.reload()

    # -- control socket and UAPI -----------------------------------------------------------

    def _serve(self) -> None:
        """RUN_DIR/NAME.sock for `tunvpnd show`; /run/wireguard/IFNAME.sock for `wg` (wire:
        wireguard). Either failing is logged and the tunnel runs without it. Both stay as they
        are on reload (neither the name nor the interface can change without a restart), and
        what they answer is read afresh at each request."""
        from . import control, uapi

        self.servers = control.Servers()
        path = run_dir() / f"{self.profile.name}.sock"
        try:
            self.servers.listen(path, control.show_handler(self.snapshot),
                                control.CONTROL_LIMIT)
        except OSError as error:
            log.warning("no control socket (tunvpnd show will not see us): %s", error)
        if self.device is None:
            return
        path = uapi.socket_path(self.ifname)
        hint = f"systemctl reload tunvpnd@{self.profile.name}"
        protocol = uapi.Protocol(self._uapi_get, str(self.profile.path), hint)
        try:
            try:
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                self.servers.listen(path, protocol, uapi.SET_LIMIT)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                # Under the unit /run/wireguard is root's: serve in our run directory, where
                # the unit's `tunvpnd wg-link` (as root) links /run/wireguard/IFNAME.sock to.
                from . import wglink

                path = wglink.private_path(run_dir(), self.profile.name)
                self.servers.listen(path, protocol, uapi.SET_LIMIT)
                log.info("WireGuard UAPI socket %s (%s is not writable for us)", path,
                         uapi.SOCKET_DIR)
        except OSError as error:  # control.SocketBusy: another live process holds the path
            log.warning("no WireGuard UAPI socket (wg will not see us): %s", error)

    def _apply_metrics(self, profile: Profile) -> None:
        """Serve /metrics where the profile says (start, reload): a changed address closes
        the old port, then opens the new one; none closes it. A bind that fails is logged and
        the tunnel runs on without metrics (a reload tries again)."""
        wanted = profile.metrics
        if self._metrics is not None:
            if self._metrics[0] == wanted:
                return
            self.servers.unlisten(self._metrics[1])
            log.info("metrics: stopped serving on %s", transport.format_endpoint(
                self._metrics[0]))
            self._metrics = None
        if wanted is None or self.servers is None:
            return
        from . import metrics
        from .core import DROP_REASONS

        where = transport.format_endpoint(wanted)
        reasons = [*DROP_REASONS, *(self.device.drops if self.device is not None else ())]
        try:
            handle = self.servers.listen_tcp(wanted, metrics.Endpoint(self.snapshot, reasons),
                                             metrics.REQUEST_LIMIT)
        except OSError as error:
            log.error("metrics: cannot serve on %s: %s", where, error.strerror or error)
            return
        self._metrics = (wanted, handle)
        log.info("metrics: serving http://%s%s", where, metrics.PATH)

    def snapshot(self) -> dict:
        """What `tunvpnd show` shows (status.snapshot), never a private or preshared key."""
        from . import status

        return status.snapshot(self.profile, self.ifname, self.sock, self.core, self.device)

    def _uapi_get(self) -> str:
        from . import uapi

        return uapi.get_text(self.profile.private_key, self.sock.getsockname()[1],
                             self.device.peers.values())

    # -- reload -----------------------------------------------------------------------------

    _reload_job: threading.Thread | None = None  # reading and checking the profile
    _reload_outcome: tuple[Profile | None, list[str]] | None = None  # what the job found
    _reload_again = False  # a SIGHUP came while the job ran: read once more when it is done

    def reload(self) -> None:
        """SIGHUP: re-read the profile and apply what changed without closing the TUN or the
        socket. Reading and checking run in a thread (a huge or odd file must not stall
        forwarding); the thread then sends us a SIGHUP of its own, and the loop applies the
        result here. SIGHUPs that come meanwhile make one more reload once this one is done.
        Whatever the file, a failed reload keeps the running profile."""
        outcome, self._reload_outcome = self._reload_outcome, None
        if outcome is not None:
            self._reload_job = None
            try:
                self._reload_apply(*outcome)
            except Exception as error:  # noqa: BLE001 - a reload must never stop the tunnel
                log.error("reload failed while applying the profile: %s", error,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                self.notify("READY=1", f"STATUS=reload failed; {self.status()}")
            if not self._reload_again:
                return
            self._reload_again = False
        elif self._reload_job is not None and self._reload_job.is_alive():
            self._reload_again = True
            return
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                    "STATUS=reloading")
        path, loop = self.profile.path, threading.main_thread().ident

        def read() -> None:
            # While this thread computes, the loop waits up to the switch interval (5 ms) for
            # the GIL after each system call, and a full garbage collection triggered by the
            # new profile's objects would hold the GIL for 30 to 90 ms: with a short interval
            # and no collection meanwhile, forwarding barely notices (4,000 peers: pings every
            # 20 ms took at most 100 ms before, under 10 ms with both).
            interval, collecting = sys.getswitchinterval(), gc.isenabled()
            sys.setswitchinterval(0.0005)
            gc.disable()
            try:
                found: tuple[Profile | None, list[str]] = (load_profile(path), [])
            except ProfileError as error:
                found = (None, error.problems)
            except BaseException as error:  # noqa: BLE001 - load_profile should not; still
                found = (None, [f"{path}: cannot be checked: {type(error).__name__}"])
            finally:
                sys.setswitchinterval(interval)
                if collecting:
                    gc.enable()
            self._reload_outcome = found
            if self.forwarder.running:  # not once stopping: a late SIGHUP could kill the exit
                signal.pthread_kill(loop, signal.SIGHUP)  # wakes the loop, which calls us back

        self._reload_job = threading.Thread(target=read, name="reload", daemon=True)
        self._reload_job.start()

    def _reload_apply(self, new: Profile | None, problems: list[str]) -> None:
        old = self.profile
        if new is None:
            for problem in problems:
                log.error("%s", problem)
            log.error("reload failed: keeping the running profile")
            self.notify("READY=1", f"STATUS=reload failed, running on the old profile; "
                        f"{self.status()}")
            return
        for key in ("mode", "listen", "ifname", "forward", "wire"):
            if getattr(new, key) != getattr(old, key):
                log.warning("%s changed: restart the service to apply it", key)
                new = replace(new, **{key: getattr(old, key)})
        if new.private_key != old.private_key:  # our identity: every session would be lost
            log.warning("private_key_file changed: restart the service to apply it")
            new = replace(new, private_key=old.private_key, public_key=old.public_key)
        try:
            if (new.addresses, new.mtu) != (old.addresses, old.mtu):
                self.netconf.setup_interface(self.ifname, new.addresses, new.mtu)
            if _split_routes(new)[1] != _split_routes(old)[1] or \
                    (new.table, new.fwmark) != (old.table, old.fwmark):
                log.warning("the full tunnel (0.0.0.0/0, ::/0, table, fwmark) changed: restart "
                            "the service to apply it")
                new = replace(new, table=old.table, fwmark=old.fwmark, routes=tuple(
                    _split_routes(new)[0]) + tuple(r for r in old.routes if not r.prefixlen))
            if new.routes != old.routes:
                for skipped in self.netconf.sync_routes(self.ifindex, _split_routes(new)[0],
                                                        strict=False):
                    log.warning("reload: skipped %s", skipped)
        except Exception as error:  # noqa: BLE001 - a netlink refusal must not kill the tunnel
            log.error("reload: could not apply interface settings: %s", error)
        nat_inputs = ("masquerade", "addresses", "routes", "peers")  # what its rules come from
        if (new.masquerade or old.masquerade) and any(getattr(new, key) != getattr(old, key)
                                                      for key in nat_inputs):
            try:
                self._apply_masquerade(new)
            except OSError as error:  # the old rules stay: the batch is all or nothing
                log.error("reload: %s", error)
        if new.peers != old.peers:
            self._replace_peers(new)
        elif self.device is not None and self._wireguard_peers(new) != \
                self._wireguard_peers(old):  # a client's server key, psk or keepalive
            self._attach_sessions(new, self.core.peers)
        self.profile = new
        self._apply_metrics(new)
        self._apply_logging(new)
        self._apply_learning(new)
        self._apply_addresses(new)
        self._apply_mss(new)
        if new.mode == "client":  # even the same name: it may point elsewhere, our source too
            self._start_resolving(time.monotonic())
        log.info("reloaded %s", new.path)
        self.notify("READY=1", f"STATUS={self.status()}")

    def _replace_peers(self, profile: Profile) -> None:
        """Swap in the configured peers, keeping what we knew of those that stay the same."""
        old = {peer.name: peer for peer in self.core.peers.peers}
        table = PeerTable()
        for peer in self._configured_peers(profile):
            before = old.get(peer.name)
            if before is not None and not before.learned and before.endpoint is not None \
                    and peer.accepts_endpoint(before.endpoint):
                peer.endpoint = before.endpoint
                for field in ("last_rx", "last_tx", "rx_packets", "rx_bytes", "tx_packets",
                              "tx_bytes", "local"):
                    setattr(peer, field, getattr(before, field))
            table.add(peer)
        if self.device is not None:  # sessions of unchanged keys are kept
            self._attach_sessions(profile, table)
        if not profile.peers:  # still learning: keep the clients we have
            for peer in old.values():
                if peer.learned:
                    table.add(peer)
        self.core.peers = table
        names = [p.name for p in itertools.islice(table.peers, PEERS_LISTED)]
        more = len(table) - len(names)
        log.info("peers: %s%s", ", ".join(names) or "none yet (learning)",
                 f" and {more} more" if more > 0 else "")

    # -- wireguard --------------------------------------------------------------------------

    def _wireguard_wire(self, profile: Profile):
        """The Device for our private key, and the wire around it (peers: _attach_sessions)."""
        from .wire import WireGuardWire
        from .wireguard.device import Device  # here: a plain daemon never loads the crypto

        self.device = Device(profile.private_key, wall_offset=time.time() - time.monotonic())
        return WireGuardWire(self.device)

    def _wireguard_peers(self, profile: Profile) -> list[tuple]:
        """(public key, psk, endpoint, persistent keepalive) per peer, in profile order: the
        client's one peer is its server (its endpoint comes from resolving `server`)."""
        if profile.mode == "client":
            return [(profile.server_public_key, profile.preshared_key, None, profile.keepalive)]
        family = self.sock.family
        found = []
        for config in profile.peers:
            endpoint = None
            if config.endpoint is not None:
                endpoint = Peer(config.name, (), pinned=config.endpoint).pinned_sockaddr(family)
            found.append((config.public_key, config.preshared_key, endpoint, profile.keepalive))
        return found

    def _attach_sessions(self, profile: Profile, table: PeerTable) -> None:
        """Make the Device's peers those of `profile` (a reload keeps the sessions of keys
        that stay) and tie each Session to its Peer in `table`."""
        wanted = self._wireguard_peers(profile)
        self.device.replace_peers(wanted)
        peers = [self.server_peer] if profile.mode == "client" else \
            [peer for peer in table.peers if not peer.learned]
        for peer, (key, *_rest) in zip(peers, wanted, strict=True):
            session = self.device.peers[key]
            session.mtu = profile.mtu
            session.user, peer.session = peer, session
            if session.endpoint is None and peer.endpoint is not None:  # a client's server
                session.endpoint = peer.endpoint
            peer.endpoint = session.endpoint  # where it was last heard from, if it roamed

    @staticmethod
    def _encode(key: bytes) -> str:
        from .wireguard.keys import encode_key
        return encode_key(key)

    def _handshakes(self, now: float) -> str:
        """'hostu up, handshake 12s ago' per peer (the first PEERS_LISTED), for STATUS."""
        parts = []
        wall = time.time()
        for peer in itertools.islice(self.core.peers.peers, PEERS_LISTED):
            session = peer.session
            if session is None:
                continue
            up = session.current is not None
            when = session.last_handshake_wall
            parts.append(f"{peer.name} {'up' if up else 'down'}, " +
                         (f"handshake {max(0, int(wall - when))}s ago" if when is not None
                          else "no handshake yet"))
        more = len(self.core.peers) - len(parts)
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")

    def _configured_peers(self, profile: Profile) -> list[Peer]:
        family = self.sock.family
        peers = []
        for config in profile.peers:
            if profile.wire == "wireguard":  # its endpoint is a starting point: the Session's
                peers.append(Peer(config.name, config.allowed_ips))
                continue
            peer = Peer(config.name, config.allowed_ips, pinned=config.endpoint)
            peer.endpoint = peer.pinned_sockaddr(family)  # None without a pinned port
            if peer.pinned_scope == -1:
                log.warning("peer %s: no interface %r for the zone of its endpoint %s: "
                            "nothing will match it", config.name,
                            config.endpoint[0].partition("%")[2], config.endpoint[0])
            peers.append(peer)
        return peers

    def _apply_masquerade(self, profile: Profile) -> None:
        """Server: source NAT for the tunnel networks out of the interfaces asked (tunvpnd.nat),
        or none (a reload turning it off)."""
        if not profile.masquerade:
            if self.nat is not None:
                self.nat.remove()
                self.nat.close()
                self.nat = None
                log.info("masquerade off")
            return
        from .nat import Masquerade, tunnel_networks  # here: most profiles never need it

        if self.nat is None:
            self.nat = Masquerade(profile.name, self.netconf.record_nft_table)
        networks = tunnel_networks(profile.addresses, profile.routes,
                                   (net for peer in profile.peers for net in peer.allowed_ips))
        out = None if profile.masquerade is True else profile.masquerade
        self.nat.apply(networks, out, self.ifname)
        shown = " ".join(map(str, networks[:PEERS_LISTED])) + (
            f" and {len(networks) - PEERS_LISTED} more" if len(networks) > PEERS_LISTED else "")
        log.info("masquerade: %s out of %s (nftables table inet %s)", shown,
                 f"every interface but {self.ifname}" if out is None else " ".join(out),
                 self.nat.table)

    def _apply_logging(self, profile: Profile) -> None:
        set_level(profile.log_level)
        self.core.log_packet = PacketLog() if profile.log_packets else None

    def _apply_learning(self, profile: Profile) -> None:
        # Without a peers list, a server learns clients (the lab's behaviour), but only for inner
        # sources that belong behind the tunnel: its own subnets and the routes it sends into it.
        # Never learned: the server's own addresses, network and broadcast addresses, ... (core).
        learnable = [a.network for a in profile.addresses] + list(profile.routes)
        self.core.set_learning(learnable if profile.mode == "server" and not profile.peers
                               else (), own=[a.ip for a in profile.addresses],
                               max_peers=profile.max_learned_peers,
                               max_per_endpoint=profile.max_addresses_per_endpoint)

    def _apply_addresses(self, profile: Profile) -> None:
        # A client's keepalives announce its tunnel addresses, and it answers challenges for
        # them (plain only: WireGuard proves who sends)
        self.core.set_addresses(profile.addresses if profile.mode == "client"
                                and profile.wire == "plain" else ())

    def _apply_mss(self, profile: Profile) -> None:
        # SYNs crossing the tunnel get an MSS that fits the TUN's MTU (mss.py)
        self.core.set_mss_clamp(profile.mtu if profile.mss_clamp else None)

    # -- timers -----------------------------------------------------------------------------

    def _on_tick(self, now: float) -> float:
        """Everything periodic; runs in the loop between wake-ups. Returns seconds to the next."""
        p = self.profile
        if self._watchdog and now >= self._next_watchdog:
            self.notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog
        if p.mode == "client":
            self._client_tick(now)
        else:
            self._expire_peers(now)
            self._report_refusals(now)
            self._settle_claims()
            if self.nat is not None and now >= self._next_nat_check:
                self.nat.repair()  # someone may have flushed the ruleset
                self._next_nat_check = now + self.nat.CHECK_INTERVAL
        if self.device is not None:  # WireGuard's timers: handshakes, keepalives, expiry
            self.device.tick(now, time.time())
        elif p.keepalive:
            for keepalive in self.core.keepalives_due(p.keepalive):
                self.forwarder.send(*keepalive)
        if self.servers is not None:
            self.servers.tick(now)  # hang up on clients past their deadline
        if now >= self._next_status:
            self.notify(f"STATUS={self.status()}")
            self._next_status = now + STATUS_INTERVAL
        return min(TICK, self._watchdog or TICK)

    def _settle_claims(self, most: int = 5) -> None:
        """Claims on held addresses whose challenge wait is over; a few lines a tick at most."""
        settled = self.core.resolve_claims()
        for peer, claimant, moved in settled[:most]:
            if moved:
                log.info("peer %s moved to %s: its old endpoint did not answer the challenge",
                         peer.name, transport.format_endpoint(claimant))
            else:
                log.info("peer %s stays at %s: refused %s, which claimed its address",
                         peer.name, transport.format_endpoint(peer.endpoint),
                         transport.format_endpoint(claimant))
        if len(settled) > most:
            log.info("and %d more claims settled (%d moved)", len(settled) - most,
                     sum(moved for _, _, moved in settled[most:]))
    def _expire_peers(self, now: float) -> None:
        """Forget silent learned peers, a bounded number per tick; log a few, count the rest."""
        timeout = self.profile.peer_timeout
        gone = self.core.peers.expire(now - timeout)
        for peer in gone[:self._expired_log.take(now, len(gone))]:
            log.info("peer %s at %s expired after %d s of silence", peer.name,
                     transport.format_endpoint(peer.endpoint), timeout)
        more = self._expired_log.summary(now)
        if more:
            log.info("expired %d more learned peers (silent for %d s)", more, timeout)

    def _report_refusals(self, now: float) -> None:
        """One line now and then about new sources refused by the learning limits."""
        counters, p = self.core.counters, self.profile
        for reason in ("table_full", "endpoint_limit"):
            total = getattr(counters, reason)
            limit = self._refused_log.setdefault(reason, RateLimit())
            limit.add(total - self._refused_seen.get(reason, 0))
            self._refused_seen[reason] = total
            count = limit.summary(now)
            if not count:
                continue
            why = (f"table full, {p.max_learned_peers} learned peers" if reason == "table_full"
                   else f"endpoint limit, {p.max_addresses_per_endpoint} addresses per endpoint")
            log.warning("refused %d new sources (%s); the last from %s", count, why,
                        transport.format_endpoint(self.core.refused_from.get(reason)))

    def _client_tick(self, now: float) -> None:
        if self._resolving is not None and not self._resolving.is_alive():
            self._resolving = None
            self._finish_resolving(now)
        elif self._resolving is None:
            changed = self._addresses is not None and self._addresses.changed()
            if self._retry:
                if changed:  # an address or a route changed: the server may be reachable
                    self._next_resolve = now
                if now >= self._next_resolve:
                    self._start_resolving(now)
            elif (changed or self.forwarder.rebind_wanted) and self.server_peer.endpoint:
                # our address may have changed: reconnect if the kernel picks another source
                self._connect(now, self.server_peer.endpoint)
        keepalive = self.profile.keepalive
        # WireGuard's server does not answer keepalives: silence there says nothing
        if not keepalive or self.server_peer.endpoint is None or self.device is not None:
            return
        # silent since the last reply, or since we first reached the server if none came yet
        heard = max(self.server_peer.last_rx, self._connected_at)
        silent = now - heard
        if silent > 3 * keepalive and not self._silent_warned:
            log.warning("no reply from server %s for %d s", self._server_text(), silent)
            self._silent_warned = True
        elif silent <= 3 * keepalive and self._silent_warned:
            log.info("server %s is answering again", self._server_text())
            self._silent_warned = False

    def _watch_addresses(self) -> None:
        try:
            self._addresses = transport.AddressWatch()
        except Exception as error:  # noqa: BLE001 - send errors still trigger a reconnect
            log.warning("cannot watch address changes (%s): noticed on send errors only", error)

    def _start_resolving(self, now: float) -> None:
        if self._resolving is not None:  # one at a time; _finish_resolving starts over if the
            return                        # profile's server changed meanwhile
        host, port = server = self.profile.server
        family = self.sock.family

        def resolve() -> None:
            try:
                self._resolved = transport.resolve(host, port, family)
            except OSError as error:
                self._resolved, self._resolve_error = None, str(error)
            self._resolved_for = server

        self._resolving = threading.Thread(target=resolve, name="resolve", daemon=True)
        self._resolving.start()
        if transport.is_ip(host):  # a literal resolves at once: no need to wait a tick
            self._resolving.join()
            self._resolving = None
            self._finish_resolving(now)

    def _finish_resolving(self, now: float) -> None:
        if self._resolved_for != self.profile.server:  # a reload changed it meanwhile
            self._start_resolving(now)
            return
        if self._resolved is None:
            self._retry_later(now, f"cannot resolve server {self._server_text()} "
                                   f"({self._resolve_error})")
            return
        # what `check` refuses for a literal server, for the address a name resolved to
        address = self._resolved[0]
        p = self.profile
        inside = covering_route([*_split_routes(p)[0], *(a.network for a in p.addresses)],
                                address)
        if inside is not None:
            self._retry_later(now, f"server {self._server_text()} is at "
                                   f"{transport.format_host(address)}, inside {inside}, so the "
                                   "tunnel would carry its own datagrams into itself: not "
                                   "connecting")
            return
        self._connect(now, self._resolved)

    def _connect(self, now: float, endpoint: tuple) -> None:
        """Talk to the server at `endpoint`: connect the socket, or reconnect it when the
        kernel would now send from another source address (ours changed or went away), or do
        nothing if all is as it was. Without a route: stay as we are, retry with back-off."""
        forwarder, retrying = self.forwarder, self._retry
        before = self.sock.getsockname()[0] if forwarder.peer_endpoint is not None else None
        try:
            source = transport.source_for(self.sock.family, endpoint, self.fwmark)
            if endpoint == forwarder.peer_endpoint and source == before:
                forwarder.rebind_wanted = False
            else:
                forwarder.connect(endpoint)
        except OSError as error:
            where = transport.format_endpoint(endpoint)
            self._retry_later(now, f"cannot reach server {self._server_text()}"
                                   + ("" if where == self._server_text() else f" at {where}")
                                   + f": {error.strerror or error}")
            return
        self._retry, self._resolve_delay = False, 1.0
        session = self.server_peer.session
        if session is not None and session.endpoint != endpoint:  # wireguard: reach it there
            session.endpoint = endpoint
            if session.persistent_keepalive:
                session.persistent_at = now  # handshake at once (the next tick)
        if endpoint != self.server_peer.endpoint:
            self.core.peers.move(self.server_peer, endpoint)
            # idle from now: the first keepalive goes out one interval later, not at once
            self._connected_at = self.server_peer.last_tx = now
            log.info("server %s is at %s", self._server_text(),
                     transport.format_endpoint(endpoint))
        elif source != before:
            log.info("source address for server %s is now %s (was %s): reconnected",
                     self._server_text(), transport.format_host(source),
                     transport.format_host(before) if before else "none")
            self.server_peer.last_tx = float("-inf")  # tell the server at once where we are
            if session is not None and session.current is not None:
                session.send_keepalive(now)  # wireguard: it roams on an authentic datagram
        elif retrying:
            log.info("server %s is reachable again", self._server_text())

    def _retry_later(self, now: float, why: str) -> None:
        log.warning("%s; retrying in %d s", why, self._resolve_delay)
        self._retry = True
        self._next_resolve = now + self._resolve_delay
        self._resolve_delay = min(self._resolve_delay * 2, 60.0)

    def _server_text(self) -> str:
        host, port = self.profile.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- systemd ----------------------------------------------------------------------------

    def status(self) -> str:
        """One ASCII line for STATUS= (sdnotify silently drops text it cannot encode)."""
        c = self.core.counters if self.core else Counters()
        if self.profile.mode == "client":
            server = self.server_peer
            who = (f"server {transport.format_endpoint(server.endpoint)}"
                   if server and server.endpoint else f"resolving {self._server_text()}")
        else:
            who = f"{len(self.core.peers) if self.core else 0} peers"
        drops = c.drops()
        if self.core is not None:
            drops.update(self.core.wire.drops())  # the wire's reasons do not overlap ours
        dropped = sum(drops.values())
        drops = ", ".join(f"{k} {v}" for k, v in drops.items())
        text = (f"{who}; rx {c.rx_packets} pkts {c.rx_bytes} B, tx {c.tx_packets} pkts "
                f"{c.tx_bytes} B, dropped {dropped}" + (f" ({drops})" if drops else "")
                + (f", keepalives {c.keepalives}" if c.keepalives else "")
                + (f", challenges {c.challenges}" if c.challenges else "")
                + (f", staged {c.staged}" if c.staged else "")
                + (f", mss_clamped {c.mss_clamped}" if c.mss_clamped else ""))
        if self.device is not None and self.core is not None:
            text += f"; {self._handshakes(time.monotonic())}"
        return text.encode("ascii", "replace").decode()

    def notify(self, *fields: str) -> None:
        self.notifier.notify("\n".join(fields))


def _split_routes(p: Profile) -> tuple[list, list[int]]:
    """(routes for the main table, IP versions a client routes everywhere: its full tunnel)."""
    if p.mode != "client":
        return list(p.routes), []
    return fulltunnel.split_routes(p.routes)


def offloads_wanted() -> bool:
    """TUN and UDP offloads (the fast path) unless TUNVPN_OFFLOAD=0."""
    return os.environ.get("TUNVPN_OFFLOAD", "1") != "0"


def watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings: a third of systemd's WatchdogSec, 0 if none asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6 / 3

