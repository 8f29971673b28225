"""WireGuard keys (tunvpnd/wireguard/keys.py) and `tunvpnd genkey|pubkey|genpsk`, checked against
wireguard-tools' `wg` itself: same formats byte for byte, same public keys, same refusals."""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tunvpnd.wireguard import keys
from tunvpnd.wireguard.keys import KeyFileError

REPO = Path(__file__).resolve().parent.parent
WG = shutil.which("wg")
# 44 characters: 42 free, the 43rd carries 4 bits (so its 2 low bits are zero), then '='
KEY_LINE = re.compile(rb"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\n")


def tunvpnd(*argv: str, stdin: bytes | None = None, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "tunvpnd", *argv], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)


def wg(*argv: str, stdin: bytes | None = None, stdout=subprocess.PIPE):
    assert WG, "wireguard-tools' wg is needed (packaging/install.sh --test installs it)"
    return subprocess.run([WG, *argv], input=stdin, stdout=stdout, stderr=subprocess.PIPE,
                          timeout=30)


def clamped(key: bytes) -> bool:
    return key[0] & 7 == 0 and key[31] & 0x80 == 0 and key[31] & 0x40 != 0


# --- the command line against wg ----------------------------------------------------------------

def test_wg_pubkey_and_tunvpnd_pubkey_agree_on_keys_from_both():
    privates = [wg("genkey").stdout for _ in range(4)] + [tunvpnd("genkey").stdout
                                                          for _ in range(4)]
    assert len(set(privates)) == 8
    for private in privates:
        ours, theirs = tunvpnd("pubkey", stdin=private), wg("pubkey", stdin=private)
        assert (ours.returncode, ours.stderr) == (0, b""), ours.stderr
        assert theirs.returncode == 0
        assert ours.stdout == theirs.stdout
        assert KEY_LINE.fullmatch(ours.stdout)
        # and the library agrees with both
        public = keys.public_key(keys.decode_key(private.decode().rstrip("\n")))
        assert ours.stdout == keys.encode_key(public).encode() + b"\n"


def test_public_key_known_answer_rfc7748():
    # RFC 7748 section 6.1, Alice's key pair
    private = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    public = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert keys.public_key(private) == public
    text = keys.encode_key(private).encode() + b"\n"
    assert tunvpnd("pubkey", stdin=text).stdout == keys.encode_key(public).encode() + b"\n"
    assert wg("pubkey", stdin=text).stdout == keys.encode_key(public).encode() + b"\n"


@pytest.mark.parametrize("command", ["genkey", "genpsk"])
def test_generated_keys_have_wgs_format_byte_for_byte(command):
    ours = [tunvpnd(command) for _ in range(12)]
    theirs = wg(command)
    assert KEY_LINE.fullmatch(theirs.stdout)  # what wg prints: 44 characters and "\n", nothing else
    for result in ours:
        assert (result.returncode, result.stderr) == (0, b"")
        assert len(result.stdout) == 45 and result.stdout.endswith(b"\n")
        assert KEY_LINE.fullmatch(result.stdout), result.stdout
    decoded = [base64.b64decode(result.stdout) for result in ours]
    assert len(set(decoded)) == len(decoded)
    if command == "genkey":  # clamped exactly as curve25519_clamp_secret
        assert all(clamped(key) for key in decoded)
    else:  # a preshared key is not clamped: 12 random keys all looking clamped is a 2^-60 chance
        assert not all(clamped(key) for key in decoded)


def test_generate_private_is_clamped_and_generate_psk_is_random():
    privates = [keys.generate_private() for _ in range(64)]
    assert all(len(key) == 32 and clamped(key) for key in privates)
    assert len(set(privates)) == 64
    psks = [keys.generate_psk() for _ in range(64)]
    assert all(len(key) == 32 for key in psks) and len(set(psks)) == 64
    assert not all(clamped(key) for key in psks)


def test_pubkey_accepts_trailing_whitespace_like_wg():
    private = keys.encode_key(keys.generate_private()).encode()
    expected = keys.encode_key(keys.public_key(keys.decode_key(private.decode()))).encode()
    for tail in (b"", b"\n", b"\r\n", b" \t\n\n", b"\n\0"):
        ours, theirs = tunvpnd("pubkey", stdin=private + tail), wg("pubkey", stdin=private + tail)
        assert theirs.stdout == expected + b"\n", tail
        assert ours.stdout == expected + b"\n", (tail, ours.stderr)


SECRET = keys.encode_key(bytes(range(64, 96)))  # a stand-in private key, to see it never echoed
BAD_INPUTS = {
    "short": SECRET[:20],
    "one character missing": SECRET[:43],
    "31 bytes": base64.b64encode(bytes(range(64, 95))).decode(),
    "33 bytes": base64.b64encode(bytes(range(64, 97))).decode(),
    "bad character": SECRET[:10] + "*" + SECRET[11:],
    "whitespace inside": SECRET[:10] + " " + SECRET[11:],
    "url-safe alphabet": SECRET.replace("D", "-").replace("E", "_"),
    "non-canonical last character": SECRET[:42] + chr(ord(SECRET[42]) + 1) + "=",
    "no padding": SECRET[:43] + "A",
    "non-ascii": SECRET[:42] + "é=",
    "hex": bytes(range(64, 96)).hex(),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_pubkey_refuses_what_wg_refuses_without_echoing_it(name):
    text = BAD_INPUTS[name].encode() + b"\n"
    theirs = wg("pubkey", stdin=text)
    assert theirs.returncode == 1, name  # the reference refuses it too
    ours = tunvpnd("pubkey", stdin=text)
    assert ours.returncode == 1 and ours.stdout == b""
    assert b"tunvpnd pubkey: " in ours.stderr and b"Traceback" not in ours.stderr
    assert not shares_a_run(ours.stderr.decode(), BAD_INPUTS[name])


def test_pubkey_refuses_trailing_characters_after_the_key():
    text = (SECRET + "\nextra\n").encode()
    assert wg("pubkey", stdin=text).returncode == 1
    ours = tunvpnd("pubkey", stdin=text)
    assert ours.returncode == 1 and ours.stdout == b""
    assert b"trailing characters" in ours.stderr and SECRET.encode() not in ours.stderr


def shares_a_run(message: str, secret: str, run: int = 8) -> bool:
    """Whether MESSAGE contains any RUN consecutive characters of SECRET."""
    return any(secret[i:i + run] in message for i in range(max(1, len(secret) - run + 1)))


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_decode_key_errors_never_contain_the_input(name):
    with pytest.raises(ValueError) as error:
        keys.decode_key(BAD_INPUTS[name])
    message = str(error.value)
    assert "key" in message and not shares_a_run(message, BAD_INPUTS[name])


def test_decode_key_and_encode_key_round_trip():
    for key in (bytes(32), bytes([255]) * 32, keys.generate_private(), keys.generate_psk()):
        text = keys.encode_key(key)
        assert len(text) == 44 and text.endswith("=") and text.count("=") == 1
        assert keys.decode_key(text) == key
    for length in (0, 31, 33):
        with pytest.raises(ValueError):
            keys.encode_key(bytes(length))
        with pytest.raises(ValueError):
            keys.public_key(bytes(length))
    with pytest.raises(ValueError):  # surrounding whitespace is the caller's business, as in wg
        keys.decode_key(" " + keys.encode_key(bytes(32))[:-1])


def test_key_commands_import_neither_pyroute2_nor_the_daemon():
    code = ("import sys, io, contextlib; from tunvpnd import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()): cli.main(['genkey'])\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2' or m in "
            "('tunvpnd.service', 'tunvpnd.loop', 'tunvpnd.core', 'tunvpnd.tun', "
            "'tunvpnd.netconf', 'tunvpnd.profile'))\n"
            "print(bad)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["genkey", "genpsk"])
def test_writing_to_a_world_readable_file_warns_like_wg(tmp_path, command):
    outputs = {}
    for who, run in (("ours", tunvpnd), ("theirs", wg)):
        for mode in (0o644, 0o600):
            path = tmp_path / f"{who}-{mode:o}.key"
            path.touch()
            path.chmod(mode)
            with path.open("wb") as out:
                result = run(command, stdout=out)
            assert result.returncode == 0
            outputs[who, mode] = result.stderr
            assert KEY_LINE.fullmatch(path.read_bytes())
    assert outputs["ours", 0o644] == outputs["theirs", 0o644]
    assert outputs["ours", 0o644].startswith(b"Warning: writing to world accessible file.\n")
    assert outputs["ours", 0o600] == outputs["theirs", 0o600] == b""


# --- key files ------------------------------------------------------------------------------------

def key_file(path: Path, key: bytes, mode: int = 0o600, tail: bytes = b"\n") -> Path:
    path.write_bytes(keys.encode_key(key).encode() + tail)
    path.chmod(mode)
    return path


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    profile_dir, credentials = tmp_path / "etc", tmp_path / "credentials"
    profile_dir.mkdir()
    credentials.mkdir()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return profile_dir, credentials


def test_key_file_in_the_credentials_directory_comes_first(dirs, monkeypatch):
    profile_dir, credentials = dirs
    beside, loaded = keys.generate_private(), keys.generate_private()
    key_file(profile_dir / "client.key", beside)
    key_file(credentials / "client.key", loaded, mode=0o400)  # as systemd's LoadCredential=
    assert keys.read_key_file("client.key", profile_dir, private=True) == beside  # no env
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert keys.read_key_file("client.key", profile_dir, private=True) == loaded
    # not among the credentials: beside the profile
    other = keys.generate_psk()
    key_file(profile_dir / "client.psk", other)
    assert keys.read_key_file("client.psk", profile_dir, private=True) == other
    # a path with a directory is never a credential name
    (profile_dir / "keys").mkdir()
    key_file(profile_dir / "keys" / "client.key", other)
    (credentials / "keys").mkdir()
    key_file(credentials / "keys" / "client.key", loaded)
    assert keys.read_key_file("keys/client.key", profile_dir, private=True) == other


def test_absolute_key_path_is_used_as_it_is(dirs, monkeypatch, tmp_path):
    profile_dir, credentials = dirs
    key = keys.generate_private()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    key_file(elsewhere / "server.key", key)
    key_file(credentials / "server.key", keys.generate_private())
    key_file(profile_dir / "server.key", keys.generate_private())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert keys.read_key_file(str(elsewhere / "server.key"), profile_dir, private=True) == key


def test_missing_key_file_is_named(dirs, monkeypatch):
    profile_dir, credentials = dirs
    with pytest.raises(KeyFileError) as error:
        keys.read_key_file("nope.key", profile_dir, private=True)
    assert str(error.value) == f"{profile_dir / 'nope.key'}: no such key file"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with pytest.raises(KeyFileError) as error:
        keys.read_key_file("nope.key", profile_dir, private=True)
    assert "nope.key" in str(error.value) and "CREDENTIALS_DIRECTORY" in str(error.value)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o601, 0o666])
def test_secret_key_file_accessible_by_other_is_refused(dirs, mode):
    profile_dir, _ = dirs
    key = keys.generate_private()
    path = key_file(profile_dir / "client.key", key, mode=mode)
    with pytest.raises(KeyFileError) as error:
        keys.read_key_file("client.key", profile_dir, private=True)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and f"{mode:04o}" in message and "chmod 600" in message
    assert not shares_a_run(message, keys.encode_key(key))
    # a public key may be readable by everyone
    assert keys.read_key_file("client.key", profile_dir, private=False) == key


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_secret_key_file_for_owner_or_group_is_accepted(dirs, mode):
    profile_dir, _ = dirs
    key = keys.generate_private()
    key_file(profile_dir / "client.key", key, mode=mode)
    assert keys.read_key_file("client.key", profile_dir, private=True) == key


def test_key_file_written_by_wg_genkey_is_read(dirs):
    profile_dir, _ = dirs
    path = profile_dir / "wg.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        assert wg("genkey", stdout=out).returncode == 0
    key = keys.read_key_file("wg.key", profile_dir, private=True)
    assert keys.encode_key(keys.public_key(key)).encode() + b"\n" == \
        wg("pubkey", stdin=path.read_bytes()).stdout


@pytest.mark.parametrize("tail", [b"", b"\n", b"\r\n", b" \t\n\n\v\f"])
def test_key_file_may_end_in_whitespace(dirs, tail):
    profile_dir, _ = dirs
    key = keys.generate_psk()
    key_file(profile_dir / "a.psk", key, tail=tail)
    assert keys.read_key_file("a.psk", profile_dir, private=True) == key


@pytest.mark.parametrize("content", [
    b"", b"\n", SECRET[:43].encode() + b"\n", SECRET.encode() + b"\nsecond line\n",
    b" " + SECRET.encode(), SECRET.encode() + SECRET.encode(), b"\xff" * 44,
    SECRET.encode() + b"\n" * 5000, ("PrivateKey = " + SECRET).encode()])
def test_key_file_of_the_wrong_format_is_named_and_not_echoed(dirs, content):
    profile_dir, _ = dirs
    path = profile_dir / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as error:
        keys.read_key_file("bad.key", profile_dir, private=True)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert not shares_a_run(message, SECRET)


def test_key_file_that_is_a_directory_or_a_fifo_is_refused_at_once(dirs):
    profile_dir, _ = dirs
    (profile_dir / "dir.key").mkdir(mode=0o700)
    os.mkfifo(profile_dir / "fifo.key", 0o600)
    for name in ("dir.key", "fifo.key"):
        outcome: list[BaseException] = []

        def read(name=name, outcome=outcome):
            try:
                keys.read_key_file(name, profile_dir, private=True)
            except BaseException as error:  # noqa: B036 -- handed to the test thread
                outcome.append(error)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=10)
        if reader.is_alive():  # it hangs in open(): free it with a writer, then fail
            os.close(os.open(profile_dir / name, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"read_key_file({name}) blocked")
        assert len(outcome) == 1 and isinstance(outcome[0], KeyFileError), outcome
        assert str(outcome[0]) == f"{profile_dir / name}: not a regular file"


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_write_key_file_creates_0600_and_wg_reads_it(tmp_path, umask):
    key = keys.generate_private()
    path = tmp_path / "new.key"
    old = os.umask(umask)
    try:
        keys.write_key_file(path, key)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == keys.encode_key(key).encode() + b"\n"
    assert keys.read_key_file(str(path), tmp_path, private=True) == key
    assert wg("pubkey", stdin=path.read_bytes()).stdout == \
        keys.encode_key(keys.public_key(key)).encode() + b"\n"


def test_write_key_file_never_overwrites_or_follows_a_symlink(tmp_path):
    path = tmp_path / "old.key"
    path.write_text("precious\n")
    with pytest.raises(KeyFileError) as error:
        keys.write_key_file(path, keys.generate_private())
    assert str(error.value) == f"{path}: already exists: not overwritten"
    assert path.read_text() == "precious\n"
    link, target = tmp_path / "link.key", tmp_path / "target"
    link.symlink_to(target)  # dangling: O_EXCL must not create the target through it
    with pytest.raises(KeyFileError):
        keys.write_key_file(link, keys.generate_private())
    assert not target.exists() and link.is_symlink()
