"""WireGuard keys: the base64 text form `wg` uses, new keys, public from private, key files.

A key is 32 bytes; its text form is standard base64 with one '=' (44 characters), exactly what
`wg genkey`, `wg pubkey` and `wg genpsk` print. Private and preshared keys are secrets: no
message here ever contains one (or the text it was read from), public keys may be shown.
X25519 comes from `cryptography`, randomness from the kernel (os.urandom = getrandom(2)).
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_SIZE = 32
KEY_TEXT_SIZE = 44  # base64 of 32 bytes: 43 characters and one '='
KEY_FILE_LIMIT = 4096  # a key file is 44 characters and some whitespace; more is not a key file
_SPACE = b" \t\n\v\f\r"  # what wireguard-tools' char_is_space() skips after the key


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and never holds key material."""

    def __init__(self, path: Path | str, what: str) -> None:
        super().__init__(f"{path}: {what}")
        self.path = path
        self.what = what


def decode_key(text: str) -> bytes:
    """The 32 bytes of a key written as `wg` writes it (44 characters of base64, one '=').

    Strict like wireguard-tools' key_from_base64(): no surrounding whitespace, no missing
    padding, no unused bits set in the last character. The ValueError never quotes the text:
    it may be a private key.
    """
    if not isinstance(text, str):
        raise TypeError("a key is a str of base64")
    if len(text) != KEY_TEXT_SIZE:
        raise ValueError(f"a key is {KEY_TEXT_SIZE} characters of base64 (32 bytes, as `wg "
                         f"genkey` writes it), not {len(text)} characters")
    try:
        key = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("a key is 32 bytes of base64 (as `wg genkey` writes it): this is not "
                         "valid base64") from None
    if len(key) != KEY_SIZE:
        raise ValueError(f"a key is 32 bytes of base64 (as `wg genkey` writes it), this one "
                         f"decodes to {len(key)} bytes")
    if encode_key(key) != text:  # unused low bits set: `wg` refuses it, so do we
        raise ValueError("a key is 32 bytes of base64 (as `wg genkey` writes it): this is not "
                         "its canonical form")
    return key


def encode_key(key: bytes) -> str:
    """The text form of a 32-byte key, byte for byte what `wg` prints (without the newline)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"a key is {KEY_SIZE} bytes, not {len(key)}")
    return base64.b64encode(key).decode("ascii")


def generate_private() -> bytes:
    """A new X25519 private key, clamped as `wg genkey` does (curve25519_clamp_secret)."""
    key = bytearray(os.urandom(KEY_SIZE))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def generate_psk() -> bytes:
    """A new preshared key: 32 random bytes, as `wg genpsk` makes (no clamping)."""
    return os.urandom(KEY_SIZE)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a private key (clamped inside, as `wg pubkey` does)."""
    if len(private) != KEY_SIZE:
        raise ValueError(f"a private key is {KEY_SIZE} bytes, not {len(private)}")
    public = X25519PrivateKey.from_private_bytes(bytes(private)).public_key()
    if hasattr(public, "public_bytes_raw"):     # cryptography >= 40
        return public.public_bytes_raw()
    # Debian 12's 38: the serialization module (~0.8 MB of RSS), only there
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def find_key_file(name: str, profile_dir: Path) -> Path:
    """Where a profile's key file NAME is: an absolute path as it is; a relative one in
    $CREDENTIALS_DIRECTORY first (systemd's LoadCredential=NAME, so only a plain file name,
    no directories), then beside the profile."""
    path = Path(name)
    if path.is_absolute():
        return path
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and len(path.parts) == 1 and name not in (".", ".."):
        candidate = Path(credentials) / name
        if os.path.lexists(candidate) and not _blank_credential(candidate):
            return candidate
    return profile_dir / path


def _blank_credential(path: Path) -> bool:
    """A credential holding only whitespace: tunvpnd@.service's SetCredential= default for a
    key file that does not exist (systemd 252 fails the unit on a missing LoadCredential= file
    otherwise). It means "not given", not "a bad key": look beside the profile instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # let read_key_file report it
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and not os.read(fd, KEY_FILE_LIMIT).strip(
            _SPACE + b"\0")
    except OSError:
        return False
    finally:
        os.close(fd)


def read_key_file(name: str, profile_dir: Path, private: bool) -> bytes:
    """The key in key file NAME (see find_key_file), as `wg` reads one: 44 characters of base64,
    then nothing but whitespace. A private or preshared key file (private=True) must not be
    readable or writable by "other" (wg-quick warns about a world-accessible config; we refuse).
    Raises KeyFileError naming the file.
    """
    if not name:
        raise KeyFileError(repr(name), "empty key file name")
    path = find_key_file(name, profile_dir)
    try:
        # O_NONBLOCK: a FIFO must not hang us in open() before fstat() can refuse it
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        where = path
        if not Path(name).is_absolute() and os.environ.get("CREDENTIALS_DIRECTORY"):
            where = f"{path} (nor in $CREDENTIALS_DIRECTORY)"
        raise KeyFileError(where, "no such key file") from None
    except OSError as error:
        raise KeyFileError(path, f"cannot open the key file: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(path, "not a regular file")
        if private and info.st_mode & stat.S_IRWXO:
            raise KeyFileError(path, f"a secret key file must not be accessible by other users "
                               f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 it")
        data = b""
        try:
            while len(data) <= KEY_FILE_LIMIT and (chunk := os.read(fd, KEY_FILE_LIMIT + 1)):
                data += chunk
        except OSError as error:
            raise KeyFileError(path, f"cannot read the key file: {error.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > KEY_FILE_LIMIT:
        raise KeyFileError(path, "too long for a key file (one base64 key, as `wg genkey` "
                           "writes it)")
    text, rest = data[:KEY_TEXT_SIZE], data[KEY_TEXT_SIZE:]
    if rest.strip(_SPACE):
        raise KeyFileError(path, "not a key file: characters after the key (one base64 key, "
                           "as `wg genkey` writes it)")
    try:
        return decode_key(text.decode("ascii"))
    except UnicodeDecodeError:
        raise KeyFileError(path, "not a key file: not base64 text") from None
    except ValueError as error:
        raise KeyFileError(path, str(error)) from None


def write_key_file(path: Path, key: bytes) -> None:
    """Create PATH holding KEY as `wg genkey > PATH` would, with mode 0600 from the start
    (O_CREAT|O_EXCL: an existing file, or a symlink, is never overwritten or followed)."""
    text = (encode_key(key) + "\n").encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise KeyFileError(path, "already exists: not overwritten") from None
    except OSError as error:
        raise KeyFileError(path, f"cannot create the key file: {error.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
        if os.write(fd, text) != len(text):
            raise OSError(errno.EIO, "short write")
        os.fsync(fd)
    except OSError as error:
        os.close(fd)
        os.unlink(path)  # no half-written key left behind
        raise KeyFileError(path, f"cannot write the key file: {error.strerror}") from None
    os.close(fd)
