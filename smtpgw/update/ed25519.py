"""Ed25519 signatures (RFC 8032 §5.1), in pure Python: the curve arithmetic of the RFC's
reference code (§6), in extended homogeneous coordinates (§5.1.4).

Owns: deriving a public key from a 32-byte secret (§5.1.5), signing (§5.1.6) and verifying
(§5.1.7) a message, and the strict decoding of points (§5.1.3) and scalars that verifying
relies on.

Must never: accept a signature whose S is not below the group order L (§5.1.7 step 1: the
malleability check), a point encoding whose y is not below p or that is not on the curve
(§5.1.3), or a key or signature of the wrong length; raise on hostile input (``verify``
answers False). Signing is not constant-time (Python integers): it is meant for a release
manager's machine, never for a service that signs what the network asks for.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "PUBLIC_KEY_BYTES", "SECRET_KEY_BYTES", "SIGNATURE_BYTES", "is_public_key", "public_key", "sign", "verify",
]

SECRET_KEY_BYTES = PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# §5.1: the field, the curve constant d, the group order L and the base point B.
P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P
L = 2**252 + 27742317777372353535851937790883648493
SQRT_M1 = pow(2, (P - 1) // 4, P)  # a square root of -1, for the §5.1.3 decoding

Point = tuple[int, int, int, int]  # (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z (§5.1.4)
IDENTITY: Point = (0, 1, 1, 0)


def _sha512(*parts: bytes) -> bytes:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part)
    return digest.digest()


def _sha512_scalar(*parts: bytes) -> int:
    return int.from_bytes(_sha512(*parts), "little") % L


# region point arithmetic (§5.1.4)

def _add(p1: Point, p2: Point) -> Point:
    """The sum of two points (the "add-2008-hwcd-3" formulas the RFC gives)."""
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    dd = 2 * z1 * z2 % P
    e, f, g, h = b - a, dd - c, dd + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _double(p1: Point) -> Point:
    """2·P1 ("dbl-2008-hwcd"), cheaper than adding a point to itself."""
    x1, y1, z1, _ = p1
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % P
    g = a - b
    f = c + g
    return e * f % P, g * h % P, f * g % P, e * h % P


def _multiply(scalar: int, point: Point) -> Point:
    """[scalar]point, by doubling and adding from the most significant bit."""
    result = IDENTITY
    for bit in reversed(range(scalar.bit_length())):
        result = _double(result)
        if scalar >> bit & 1:
            result = _add(result, point)
    return result


def _same(p1: Point, p2: Point) -> bool:
    """x1/z1 == x2/z2 and y1/z1 == y2/z2, without inverting."""
    x1, y1, z1, _ = p1
    x2, y2, z2, _ = p2
    return (x1 * z2 - x2 * z1) % P == 0 and (y1 * z2 - y2 * z1) % P == 0


def _recover_x(y: int, sign: int) -> int | None:
    """§5.1.3 steps 2-4: the x of the curve point with this y and x's low bit, or None."""
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    return P - x if (x & 1) != sign else x


BASE_Y = 4 * pow(5, -1, P) % P
BASE_X = _recover_x(BASE_Y, 0)
assert BASE_X is not None
BASE: Point = (BASE_X, BASE_Y, 1, BASE_X * BASE_Y % P)


def _encode(point: Point) -> bytes:
    """§5.1.2: y in 255 bits, little-endian, with the low bit of x on top."""
    x, y, z, _ = point
    z_inverse = pow(z, -1, P)
    x, y = x * z_inverse % P, y * z_inverse % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _decode(data: bytes) -> Point | None:
    """§5.1.3, strictly: None for a non-canonical y or a y with no point on the curve."""
    if len(data) != 32:
        return None
    number = int.from_bytes(data, "little")
    y, sign = number & ((1 << 255) - 1), number >> 255
    x = _recover_x(y, sign)
    if x is None:
        return None
    return x, y, 1, x * y % P

# endregion
# region keys and signatures (§5.1.5-§5.1.7)


def _expand(secret: bytes) -> tuple[int, bytes]:
    """§5.1.5: the secret scalar s (pruned) and the prefix that makes signing deterministic."""
    if len(secret) != SECRET_KEY_BYTES:
        raise ValueError(f"an Ed25519 secret key is {SECRET_KEY_BYTES} bytes, not {len(secret)}")
    digest = _sha512(secret)
    scalar = int.from_bytes(digest[:32], "little")
    scalar &= (1 << 254) - 8
    scalar |= 1 << 254
    return scalar, digest[32:]


def public_key(secret: bytes) -> bytes:
    """The 32-byte public key A = [s]B of a 32-byte secret key (§5.1.5)."""
    scalar, _ = _expand(secret)
    return _encode(_multiply(scalar, BASE))


def is_public_key(public: bytes) -> bool:
    """Whether ``public`` is the encoding of a curve point (§5.1.3), as a public key must be."""
    return _decode(public) is not None


def sign(secret: bytes, message: bytes) -> bytes:
    """The 64-byte signature R || S of ``message`` (§5.1.6)."""
    scalar, prefix = _expand(secret)
    public = _encode(_multiply(scalar, BASE))
    nonce = _sha512_scalar(prefix, message)
    encoded_r = _encode(_multiply(nonce, BASE))
    challenge = _sha512_scalar(encoded_r, public, message)
    s = (nonce + challenge * scalar) % L
    return encoded_r + s.to_bytes(32, "little")


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s signature of ``message`` (§5.1.7): [S]B = R + [k]A."""
    if len(public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    point_a, point_r = _decode(public), _decode(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if point_a is None or point_r is None or s >= L:
        return False
    challenge = _sha512_scalar(signature[:32], public, message)
    return _same(_multiply(s, BASE), _add(point_r, _multiply(challenge, point_a)))

# endregion
