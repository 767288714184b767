"""smtpgw.ed25519 against the RFC 8032 §7.1 test vectors, and the strict checks of §5.1.7."""

from __future__ import annotations

import hashlib

import pytest

from smtpgw.update import ed25519

# RFC 8032 §7.1: TEST 1, TEST 2, TEST 3 and TEST SHA(abc) (SECRET KEY, PUBLIC KEY, MESSAGE, SIGNATURE)
VECTORS = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
     "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     hashlib.sha512(b"abc").hexdigest(),
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
     "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]


@pytest.mark.parametrize("secret, public, message, signature", VECTORS, ids=["1", "2", "3", "SHA(abc)"])
def test_rfc8032_vectors(secret: str, public: str, message: str, signature: str) -> None:
    secret_b, public_b, message_b, signature_b = (bytes.fromhex(x) for x in (secret, public, message, signature))
    assert ed25519.public_key(secret_b) == public_b
    assert ed25519.sign(secret_b, message_b) == signature_b
    assert ed25519.verify(public_b, message_b, signature_b)


def vector(number: int) -> tuple[bytes, bytes, bytes]:
    _, public, message, signature = VECTORS[number]
    return bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)


@pytest.mark.parametrize("bit", [0, 7, 255, 256, 511])
def test_any_flipped_signature_bit_fails(bit: int) -> None:
    public, message, signature = vector(1)
    damaged = bytearray(signature)
    damaged[bit // 8] ^= 1 << (bit % 8)
    assert not ed25519.verify(public, message, bytes(damaged))


def test_another_message_or_key_fails() -> None:
    public, message, signature = vector(1)
    assert not ed25519.verify(public, message + b"\0", signature)
    assert not ed25519.verify(bytes.fromhex(VECTORS[0][1]), message, signature)


def test_s_not_below_the_group_order_is_refused() -> None:
    """§5.1.7 step 1: S + L verifies in the group equation but must be refused (malleability)."""
    public, message, signature = vector(0)
    s = int.from_bytes(signature[32:], "little") + ed25519.L
    assert s < 2**256
    assert not ed25519.verify(public, message, signature[:32] + s.to_bytes(32, "little"))


def test_non_canonical_and_off_curve_points_are_refused() -> None:
    """§5.1.3: y >= p is not a valid encoding; a y with no x on the curve is no point."""
    public, message, signature = vector(0)
    non_canonical = (ed25519.P + 1).to_bytes(32, "little")  # y = p + 1, "1" written the long way
    assert not ed25519.is_public_key(non_canonical)
    assert not ed25519.verify(non_canonical, message, signature)
    assert not ed25519.verify(public, message, non_canonical + signature[32:])
    off_curve = (2).to_bytes(32, "little")  # y = 2: (y²-1)/(dy²+1) is not a square
    assert not ed25519.is_public_key(off_curve)
    assert ed25519.is_public_key(public)


@pytest.mark.parametrize("public_len, signature_len", [(31, 64), (33, 64), (32, 63), (32, 65), (0, 0)])
def test_wrong_lengths_are_refused_not_raised(public_len: int, signature_len: int) -> None:
    public, message, signature = vector(0)
    assert not ed25519.verify((public * 2)[:public_len], message, (signature * 2)[:signature_len])


def test_a_secret_of_the_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError):
        ed25519.sign(b"short", b"")
