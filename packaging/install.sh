#!/bin/sh
# Install tunvpnd on a fresh Debian 12 machine, as root, the way an operator would:
# Debian's Python in a venv under /opt/tunvpnd (Debian's /usr/bin/python3 refuses a system-wide
# pip install, PEP 668), with the `tunvpnd` command linked into /usr/local/bin.
#   sh packaging/install.sh          the daemon and what `tunvpnd lab demo` needs
#   sh packaging/install.sh --test   also what the test suite needs
set -eu
cd "$(dirname "$0")/.."
VENV=/opt/tunvpnd
APT="python3 python3-venv iproute2 iputils-ping ca-certificates"
EXTRA=""
if [ "${1:-}" = "--test" ]; then
    # python3-cryptography, python3-nacl and python3-prometheus-client: the .deb's Depends,
    # installed with dpkg -i in a box that shares this root (tests/test_packaging.py);
    # nftables: its `nft` drops ICMP in a lab host (tests/test_mss.py; the daemon needs none)
    APT="$APT iperf3 openvpn wireguard-go wireguard-tools systemd util-linux procps groff-base
         man-db python3-cryptography python3-nacl python3-prometheus-client nftables"
    EXTRA="[test]"
fi
export DEBIAN_FRONTEND=noninteractive
missing=""
for p in $APT; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check ".$EXTRA"
ln -sf "$VENV/bin/tunvpnd" /usr/local/bin/tunvpnd
echo "tunvpnd installed in $VENV ($("$VENV/bin/python" -c 'import pyroute2; print("pyroute2", pyroute2.__version__)'))"
