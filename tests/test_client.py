"""The client's life with its server: names that do not resolve yet, a server that goes quiet."""

from __future__ import annotations

import re
import time

from tests.conftest import client_profile, ping, server_profile
from tunvpnd.lab import wait_until

HOSTV = "192.168.60.5"


def test_server_name_is_resolved_with_backoff(lab, daemons, sockdir):
    # The client gets a private /etc/hosts (its own mount namespace), without the name at first.
    hosts = sockdir / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    wrapper = ["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
               f'/bin/mount --bind {hosts} /etc/hosts && exec "$0" "$@"']
    daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile(server="vpn-server.test"), wrapper=wrapper)
    assert client.status().startswith("resolving vpn-server.test:9090")
    wait_until(lambda: client.log().count("cannot resolve server vpn-server.test:9090") >= 2,
               15, what="two failed attempts")
    assert "retrying in 1 s" in client.log() and "retrying in 2 s" in client.log()
    with open(hosts, "w") as f:  # same inode: the bind mount sees the new content
        f.write("127.0.0.1 localhost\n10.9.0.11 vpn-server.test\n")
    wait_until(lambda: "server vpn-server.test:9090 is at 10.9.0.11:9090" in client.log(), 15,
               what="the name to resolve")
    ping(lab, "hostu", HOSTV)


def test_silent_server_is_reported_and_its_return_noticed(lab, daemons):
    client = daemons(lab, "hostu", client_profile(keepalive=1))
    wait_until(lambda: "no reply from server 10.9.0.11:9090" in client.log(), 15,
               what="the silence warning")
    daemons(lab, "server", server_profile())
    ping(lab, "hostu", HOSTV)
    wait_until(lambda: "server 10.9.0.11:9090 is answering again" in client.log(), 15,
               what="the all-clear")


def test_silence_warning_counts_from_the_connect_not_from_boot(lab, daemons):
    """No warning before the server has been silent for 3 keepalive intervals, and the
    number of seconds in it is no more than the client has been running."""
    started = time.monotonic()
    client = daemons(lab, "hostu", client_profile(keepalive=1))
    warning = re.compile(r"no reply from server 10\.9\.0\.11:9090 for (\d+) s")
    wait_until(lambda: warning.search(client.log()), 15, what="the silence warning")
    seen = time.monotonic() - started
    silent = int(warning.search(client.log()).group(1))
    assert 3 <= silent <= seen, (silent, seen)
    assert seen >= 3


def test_keepalives_are_answered_by_the_server(lab, daemons):
    server = daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile(keepalive=1))
    ping(lab, "hostu", HOSTV, count=1)  # the server learns the client from real traffic
    # then, idle: keepalives every second, each answered
    server.wait_status(lambda s: "keepalives 4" in s)
    client.wait_status(lambda s: "keepalives 3" in s or "keepalives 4" in s)
    assert "dropped 0" in client.status()
    # the only drop the server may count: a keepalive that beat the ping, before it knew us
    assert re.search(r"dropped (0|1 \(unknown_source 1\))", server.status())
    assert "no reply from server" not in client.log()
