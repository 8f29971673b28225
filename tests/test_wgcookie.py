"""mac1, mac2 and cookie replies (tunvpnd.wireguard.cookie), on crafted bytes with a fake clock."""

import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

from tunvpnd.wireguard import cookie as ck
from tunvpnd.wireguard.cookie import (
    COOKIE_REFRESH_TIME,
    CookieChecker,
    CookieGenerator,
    mac1_ok,
    source_bytes,
    write_macs,
)

# A fixed responder key pair (RFC 7748 section 6.1, Bob's), so the known answers stay fixed.
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SOURCE = source_bytes(("10.9.0.5", 51820))
NOW = 1000.0


def initiation(seed: int = 1) -> bytearray:
    """A 148-byte message shaped like a handshake initiation (type 1, sender index 0x11223344),
    its body arbitrary but fixed."""
    body = hashlib.blake2s(seed.to_bytes(4, "little")).digest() * 4
    return bytearray(struct.pack("<II", 1, 0x11223344) + body[:108] + bytes(32))


def reference_mac1(message: bytes, public: bytes) -> bytes:
    # Written out from the protocol (whitepaper section 5.4.4, wireguard-go device/cookie.go):
    # mac1 = MAC(HASH("mac1----" || S_pub), msg[:-32]), MAC = keyed BLAKE2s-128.
    key = hashlib.blake2s(b"mac1----" + public).digest()
    return hashlib.blake2s(message[:-32], digest_size=16, key=key).digest()


# -- the keys and mac1 -------------------------------------------------------------------------

def test_public_key_is_bobs():
    pub = X25519PrivateKey.from_private_bytes(BOB_PRIVATE).public_key()
    assert pub.public_bytes(Encoding.Raw, PublicFormat.Raw) == BOB_PUBLIC


def test_mac1_key_and_cookie_key_are_labelled_hashes():
    assert ck.mac1_key(BOB_PUBLIC) == hashlib.blake2s(b"mac1----" + BOB_PUBLIC).digest()
    assert ck.cookie_key(BOB_PUBLIC) == hashlib.blake2s(b"cookie--" + BOB_PUBLIC).digest()
    assert ck.mac1_key(BOB_PUBLIC) != ck.cookie_key(BOB_PUBLIC)
    assert len(ck.mac1_key(BOB_PUBLIC)) == 32


def test_mac1_known_answer():
    msg = initiation()
    write_macs(msg, ck.mac1_key(BOB_PUBLIC), None)
    assert msg[116:132] == reference_mac1(bytes(msg), BOB_PUBLIC)
    assert msg[132:148] == bytes(16)                # no cookie: mac2 is zeros
    assert msg[:116] == initiation()[:116]          # nothing else touched
    # Pinned, so a change of either computation shows.
    assert msg[116:132].hex() == reference_mac1(bytes(initiation()), BOB_PUBLIC).hex()
    assert msg[116:132].hex() == "4a165922bb1cc4eb899f8a01c7fbd79b"


def test_mac1_round_trip_and_every_flipped_bit_fails():
    key = ck.mac1_key(BOB_PUBLIC)
    msg = initiation()
    write_macs(msg, key, None)
    assert mac1_ok(bytes(msg), key)
    assert mac1_ok(memoryview(msg), key)
    assert CookieChecker(BOB_PUBLIC).mac1_ok(bytes(msg))
    for bit in range(132 * 8):                      # the message and mac1 itself; not mac2
        bad = bytearray(msg)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert not mac1_ok(bytes(bad), key), f"bit {bit}"
    assert not mac1_ok(bytes(msg), ck.mac1_key(bytes(32)))     # for someone else


def test_mac1_ok_refuses_short_messages_and_write_macs_says_why():
    key = ck.mac1_key(BOB_PUBLIC)
    for size in range(32):
        assert not mac1_ok(bytes(size), key)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        write_macs(bytearray(31), key, None)


def test_source_bytes_is_netip_addrport_marshalbinary():
    # wireguard-go's cookie source: netip.AddrPort.MarshalBinary = address bytes + port LE.
    assert source_bytes(("192.168.13.37", 0x0A0A)) == bytes([192, 168, 13, 37, 10, 10])
    assert source_bytes(("fd00::1", 51820, 0, 0)) == bytes.fromhex("fd00" + "00" * 13 + "01") \
        + (51820).to_bytes(2, "little")
    assert source_bytes(("fe80::1%eth0", 1, 0, 2)) == source_bytes(("fe80::1", 1))


# -- wireguard-go's device/cookie_test.go, ported ----------------------------------------------
# From wireguard-go (MIT licence, Copyright (C) 2017-2025 WireGuard LLC), device/cookie_test.go
# TestCookieMAC1: the same messages, source and steps. It has no fixed vectors (its key is
# random), so it checks generator against checker.

GO_SRC = bytes([192, 168, 13, 37, 10, 10, 10])
GO_MAC1_MESSAGES = [
    "99bba5fc99aa83bd7b00c59a4cb9cf624023f38ed8d062645db28013dacec691"
    "61d630f132b3a2f47b43b5a7e2b1f56c746bb0cd1f94867bc8fb92ed549b44f5"
    "c87db78eff49c4e8397c19e0601951f8e48e02f17f1dcc8eb007fff8af7f6682"
    "83cc7cfa80db8153adf7d80c10e020fde80b3f9015cd93ad0bd50ccc8856e43f",
    "33e72a849fff576c2dc32de1f55c9756b893c27dd441dd7a4a593b50dd7a7a8c"
    "9b96af553ceb6d0b130b9798b340c3ccb85733456e8b092b812ed2b9660b9305",
    "9b96af553ceb6d0b130b9798b340c3ccb85733456e8b092b812ed2b9660b9305",
]
GO_REPLY_MESSAGE = (
    "6dd7c32eb076d8df30657d623ef89ae8e73c64a37848daf5256128537932869f"
    "a0279569b6bad0a2f868eaa862f2fd1be0b480e56b3a169e35f6a8f24f9a7be9"
    "770bc2b4edbaf922c30397429f797427fef9066e973aa68fc9570a544c644ae2"
    "4fa1ce959b23a92b859342b0a553edeb632af16d46cb2f618ce1e8fa6720806d")
GO_MAC2_MESSAGES = [
    "0331b99eb02a54a3c13fb49616b925153d3a82f95836863f132ffeb253208c3f"
    "baebfb4b1b2202692c90bcdccfcf85eb62666fe8e1a6a84ca004231542acfa38",
    "0e2f0ea92903e1f3240175ad16a56685ca66e0bdc634d884099a5814fb05daf5"
    "90f50c4e2210c9850fe37735e96bc2553246ae25e0e3377a4b71ccfc91dfd6ca"
    "feeece3f77a2fd598e730a8d5c2414ca3891b82c8ca2657bbc49bcb558fce3d7"
    "02cff74c6091ed55e9f9fed1442c75f2b35d7b2756c0484fb0bae47dd0aacd3d"
    "e350d2cfb9fa4b2dc6df3b329845e68f1c5ca2207d1c28c2d4a1e021528f1cd0"
    "629748bbf4a9cb35f207d350d8a9c59a0fbd37afe14519ee41f3f7e5e0303fbe"
    "3d3964007a1a515ee1700bb9775af0c48aa13a771ae0c20691d5e91cd3feab93"
    "1a0a4cbbf0ffdcaa6173cb034b7168643d823141d78b227b7da1d5856df01baa",
]


def test_wireguard_go_cookie_mac1():
    pub = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    generator, checker = CookieGenerator(pub), CookieChecker(pub)

    for text in GO_MAC1_MESSAGES:                           # checkMAC1
        msg = bytearray.fromhex(text)
        generator.write_macs(msg, NOW)
        assert checker.mac1_ok(msg)
        assert not checker.mac2_ok(msg, GO_SRC, NOW)

    msg = bytearray.fromhex(GO_REPLY_MESSAGE)               # exchange cookie reply
    generator.write_macs(msg, NOW)
    reply = checker.cookie_reply(msg, 1377, GO_SRC, NOW)
    assert generator.consume_reply(reply, NOW)

    for text in GO_MAC2_MESSAGES:                           # checkMAC2
        msg = bytearray.fromhex(text)
        generator.write_macs(msg, NOW)
        assert checker.mac1_ok(msg)
        assert checker.mac2_ok(msg, GO_SRC, NOW)
        msg[5] ^= 0x20
        assert not checker.mac1_ok(msg)
        assert not checker.mac2_ok(msg, GO_SRC, NOW)
        msg[5] ^= 0x20
        assert not checker.mac2_ok(msg, bytes([192, 168, 13, 37, 40, 1]), NOW)
        assert not checker.mac2_ok(msg, bytes([192, 168, 13, 38, 40, 1]), NOW)


def test_go_messages_are_the_lengths_in_cookie_test_go():
    # A guard on the transcription above (bytes per message in the Go source).
    assert [len(bytes.fromhex(t)) for t in GO_MAC1_MESSAGES] == [128, 64, 32]
    assert len(bytes.fromhex(GO_REPLY_MESSAGE)) == 128
    assert [len(bytes.fromhex(t)) for t in GO_MAC2_MESSAGES] == [64, 256]


# -- the cookie round trip ---------------------------------------------------------------------

def exchange(generator: CookieGenerator, checker: CookieChecker, now: float) -> bytes:
    """The initiator sends an initiation; the responder, under load, answers with a cookie
    reply instead of doing DH; the initiator takes it in. Returns the reply."""
    msg = initiation()
    generator.write_macs(msg, now)
    assert checker.mac1_ok(msg)
    assert not checker.mac2_ok(msg, SOURCE, now)           # no cookie yet: a reply goes out
    sender = struct.unpack_from("<I", msg, 4)[0]
    reply = checker.cookie_reply(msg, sender, SOURCE, now)
    assert generator.consume_reply(reply, now + 0.01)
    return reply


def test_cookie_round_trip_next_message_passes_mac2():
    generator, checker = CookieGenerator(BOB_PUBLIC), CookieChecker(BOB_PUBLIC)
    exchange(generator, checker, NOW)
    retry = initiation(2)                   # the next initiation (a new ephemeral, new mac1)
    generator.write_macs(retry, NOW + 5)
    assert checker.mac1_ok(retry)
    assert checker.mac2_ok(retry, SOURCE, NOW + 5)
    # The cookie is bound to the source: from another address or port it does not pass.
    assert not checker.mac2_ok(retry, source_bytes(("10.9.0.6", 51820)), NOW + 5)
    assert not checker.mac2_ok(retry, source_bytes(("10.9.0.5", 51821)), NOW + 5)
    # mac2 covers the message and mac1.
    for index in (0, 50, 120):
        bad = bytearray(retry)
        bad[index] ^= 1
        assert not checker.mac2_ok(bad, SOURCE, NOW + 5)


def test_reply_layout_and_mac2_by_hand():
    generator, checker = CookieGenerator(BOB_PUBLIC), CookieChecker(BOB_PUBLIC)
    msg = initiation()
    generator.write_macs(msg, NOW)
    reply = checker.cookie_reply(msg, 0x11223344, SOURCE, NOW)
    assert len(reply) == 64
    assert reply[:8] == bytes([3, 0, 0, 0, 0x44, 0x33, 0x22, 0x11])    # type 3, receiver LE
    # Open it without the module: key = HASH("cookie--" || responder public), AD = mac1.
    cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
        reply[32:64], bytes(msg[116:132]), reply[8:32],
        hashlib.blake2s(b"cookie--" + BOB_PUBLIC).digest())
    assert len(cookie) == 16
    assert generator.consume_reply(reply, NOW)
    retry = initiation(3)
    generator.write_macs(retry, NOW)
    mac2 = hashlib.blake2s(bytes(retry[:132]), digest_size=16, key=cookie).digest()
    assert retry[132:] == mac2
    # Two replies to one message differ (random nonce) but carry the same cookie; the second
    # now answers a message that is no longer our last, so the generator refuses it.
    again = checker.cookie_reply(msg, 0x11223344, SOURCE, NOW + 1)
    assert again[8:32] != reply[8:32]
    assert crypto_aead_xchacha20poly1305_ietf_decrypt(
        again[32:64], bytes(msg[116:132]), again[8:32],
        hashlib.blake2s(b"cookie--" + BOB_PUBLIC).digest()) == cookie
    assert not generator.consume_reply(again, NOW + 1)


def test_initiator_stops_using_a_cookie_after_120s():
    generator, checker = CookieGenerator(BOB_PUBLIC), CookieChecker(BOB_PUBLIC)
    exchange(generator, checker, NOW)
    at_limit = initiation(2)
    generator.write_macs(at_limit, NOW + 0.01 + COOKIE_REFRESH_TIME)
    assert at_limit[132:] != bytes(16)                      # 120 s old: still used, as Go
    late = initiation(3)
    generator.write_macs(late, NOW + 0.02 + COOKIE_REFRESH_TIME)
    assert late[132:] == bytes(16)                          # older: mac2 is zeros again
    assert not checker.mac2_ok(late, SOURCE, NOW + 0.02 + COOKIE_REFRESH_TIME)


def test_responder_refuses_a_cookie_of_an_old_secret():
    generator, checker = CookieGenerator(BOB_PUBLIC), CookieChecker(BOB_PUBLIC)
    exchange(generator, checker, NOW)
    msg = initiation(2)
    later = NOW + COOKIE_REFRESH_TIME + 1
    generator.write_macs(msg, NOW + 100)                    # the cookie was fresh when used
    assert checker.mac2_ok(msg, SOURCE, NOW + 100)
    assert not checker.mac2_ok(msg, SOURCE, later)          # the secret behind it expired
    # The next reply renews the secret; the old cookie stays refused, the new one passes.
    exchange(generator, checker, later)
    assert not checker.mac2_ok(msg, SOURCE, later)
    fresh = initiation(4)
    generator.write_macs(fresh, later + 1)
    assert checker.mac2_ok(fresh, SOURCE, later + 1)


def test_reply_for_another_messages_mac1_is_refused():
    generator, checker = CookieGenerator(BOB_PUBLIC), CookieChecker(BOB_PUBLIC)
    first, second = initiation(1), initiation(2)
    generator.write_macs(first, NOW)
    generator.write_macs(second, NOW + 1)                   # our last message is `second`
    reply = checker.cookie_reply(first, 0x11223344, SOURCE, NOW + 1)
    assert not generator.consume_reply(reply, NOW + 1)
    probe = initiation(5)
    generator.write_macs(probe, NOW + 2)
    assert probe[132:] == bytes(16)                         # nothing was kept


def test_reply_before_any_message_and_for_another_key_is_refused():
    checker = CookieChecker(BOB_PUBLIC)
    msg = initiation()
    write_macs(msg, ck.mac1_key(BOB_PUBLIC), None)
    reply = checker.cookie_reply(msg, 1, SOURCE, NOW)
    assert not CookieGenerator(BOB_PUBLIC).consume_reply(reply, NOW)   # never sent anything
    other = CookieGenerator(bytes(range(32)))               # thinks the peer has another key
    other.write_macs(bytearray(msg), NOW)
    assert not other.consume_reply(reply, NOW)


def test_truncated_garbage_and_tampered_replies_are_refused_without_exceptions():
    generator, checker = CookieGenerator(BOB_PUBLIC), CookieChecker(BOB_PUBLIC)
    msg = initiation()
    generator.write_macs(msg, NOW)
    reply = checker.cookie_reply(msg, 0x11223344, SOURCE, NOW)
    for size in range(64):
        assert not generator.consume_reply(reply[:size], NOW)
    assert not generator.consume_reply(reply + b"\0", NOW)
    assert not generator.consume_reply(memoryview(reply)[:63], NOW)
    for _ in range(200):
        assert not generator.consume_reply(b"\x03\0\0\0" + os.urandom(60), NOW)
        assert not generator.consume_reply(os.urandom(64), NOW)
    for wrong_type in (b"\x01\0\0\0", b"\x03\0\0\x01", b"\x04\0\0\0"):
        assert not generator.consume_reply(wrong_type + reply[4:], NOW)
    for index in range(8, 64):                              # nonce, ciphertext, tag
        bad = bytearray(reply)
        bad[index] ^= 0x80
        assert not generator.consume_reply(bytes(bad), NOW), f"byte {index}"
    assert generator.consume_reply(memoryview(bytearray(reply)), NOW)   # the real one works


# -- XChaCha20-Poly1305 ------------------------------------------------------------------------
# draft-irtf-cfrg-xchacha-03 appendix A.3.1, "Example and Test Vector for
# AEAD_XChaCha20_Poly1305" (https://datatracker.ietf.org/doc/html/draft-irtf-cfrg-xchacha-03);
# libsodium.js's test suite checks crypto_aead_xchacha20poly1305_ietf against the same vector.

XC_KEY = bytes.fromhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
XC_NONCE = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555657")
XC_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
XC_PLAINTEXT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
                b"for the future, sunscreen would be it.")
XC_CIPHERTEXT = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e")
XC_TAG = bytes.fromhex("c0875924c1c7987947deafd8780acf49")


def test_xchacha20_poly1305_draft_vector():
    sealed = ck._xaead_seal(XC_KEY, XC_NONCE, XC_PLAINTEXT, XC_AAD)
    assert sealed == XC_CIPHERTEXT + XC_TAG
    assert ck._xaead_open(XC_KEY, XC_NONCE, sealed, XC_AAD) == XC_PLAINTEXT
    assert ck._xaead_open(XC_KEY, XC_NONCE, sealed, XC_AAD[:-1]) is None    # AD is bound
    assert ck._xaead_open(XC_KEY, XC_NONCE, sealed[:-1] + b"\0", XC_AAD) is None
