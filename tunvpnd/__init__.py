"""tunvpnd: a small, readable, systemd-native UDP VPN daemon."""

__version__ = "0.1.0"
