"""Keys and signatures of update sets: who may publish the databases a gateway installs.

A key pair is two files made by ``keepup2date keygen --out PREFIX``::

    PREFIX        ed25519-secret:<base64 of the 32-byte secret>      mode 0600, never published
    PREFIX.pub    ed25519:<base64 of the 32-byte public key> NAME     given to every gateway

An update set is signed by ``index.json.sig`` beside its ``index.json``: one line per signing
key, ``ed25519:<public key> <base64 of the 64-byte Ed25519 signature>``, each signature over
the exact bytes of ``index.json`` (RFC 8032 §5.1.6; the index names every file with its size
and SHA-256, so it covers the whole set). Several lines let a publisher sign with an old and
a new key while gateways move from one to the other.

Owns: the key and signature file formats, making a key pair, signing an index and checking
one against the trusted keys (``[updater.options] PublicKey``, else the project's own key
shipped as ``smtpgw/keys/smtpgw-release.pub``).

Must never: overwrite an existing key file, write a secret key readable by anyone but its
owner, read a secret key that others can read, accept a signature file larger than
``MAX_SIGNATURE_BYTES`` or with more than ``MAX_SIGNATURES`` lines, or call an index signed
unless a trusted key's signature over its exact bytes verifies. The arithmetic is
``smtpgw.ed25519``'s.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass

from smtpgw import PACKAGE_DIR
from smtpgw.update import ed25519

__all__ = [
    "MAX_SIGNATURES", "MAX_SIGNATURE_BYTES", "SHIPPED_KEY", "SIGNATURE", "PublicKey", "SignatureError",
    "check_signature", "generate", "parse_public_key", "read_public_key", "read_secret_key", "shipped_keys",
    "sign_index",
]

SIGNATURE = "index.json.sig"
MAX_SIGNATURE_BYTES = 4096
MAX_SIGNATURES = 8
MAX_KEY_FILE_BYTES = 4096
SHIPPED_KEY = os.path.join(PACKAGE_DIR, "keys", "smtpgw-release.pub")
PUBLIC_PREFIX, SECRET_PREFIX = "ed25519:", "ed25519-secret:"
_BASE64_32 = re.compile(r"[A-Za-z0-9+/]{43}=")
_BASE64_64 = re.compile(r"[A-Za-z0-9+/]{86}==")
_NAME = re.compile(r"[\x21-\x7e]{1,64}")


class SignatureError(ValueError):
    """A key file or a signature is unusable, or the index is not signed by a trusted key."""


@dataclass(frozen=True)
class PublicKey:
    raw: bytes
    name: str = ""  # the comment after the key: who holds the secret

    @property
    def text(self) -> str:
        return PUBLIC_PREFIX + base64.b64encode(self.raw).decode("ascii")

    def __str__(self) -> str:
        return f"{self.text} ({self.name})" if self.name else self.text


def _decode(text: str, pattern: re.Pattern[str], what: str) -> bytes:
    if not pattern.fullmatch(text):
        raise SignatureError(f"{what} is not base64 of the right length")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise SignatureError(f"{what} is not base64") from None


def parse_public_key(text: str) -> PublicKey:
    """``ed25519:<base64> [NAME]`` -> PublicKey; the key must be a point of the curve."""
    key, _, name = text.strip().partition(" ")
    name = name.strip()
    if not key.startswith(PUBLIC_PREFIX):
        raise SignatureError(f"a public key starts with {PUBLIC_PREFIX} (got {key[:20]!r})")
    if name and not _NAME.fullmatch(name):
        raise SignatureError("a key's name is one word of printable characters")
    raw = _decode(key[len(PUBLIC_PREFIX):], _BASE64_32, "the public key")
    if not ed25519.is_public_key(raw):
        raise SignatureError("the public key is not a point of Ed25519 (RFC 8032 §5.1.3)")
    return PublicKey(raw, name)


def _read_small(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise SignatureError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SignatureError(f"{path}: larger than a key file ({MAX_KEY_FILE_BYTES} bytes)")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SignatureError(f"{path}: not a key file (not ASCII text)") from None


def read_public_key(path: str) -> PublicKey:
    """The key in a ``.pub`` file (one line)."""
    text = _read_small(path)
    if "\n" in text:
        raise SignatureError(f"{path}: a public key file holds one line")
    try:
        return parse_public_key(text)
    except SignatureError as exc:
        raise SignatureError(f"{path}: {exc}") from None


def shipped_keys() -> tuple[PublicKey, ...]:
    """The project's own release key, trusted when no PublicKey is configured."""
    return (read_public_key(SHIPPED_KEY),)


def read_secret_key(path: str) -> bytes:
    """The 32-byte secret of a key file that only its owner can read (as ssh demands)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SignatureError(f"{path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SignatureError(f"{path}: a secret key must be readable by its owner only (chmod 600 {path})")
    text = _read_small(path)
    if not text.startswith(SECRET_PREFIX) or "\n" in text:
        raise SignatureError(f"{path}: not a secret key file (a line {SECRET_PREFIX}<base64>)")
    try:
        return _decode(text[len(SECRET_PREFIX):], _BASE64_32, "the secret key")
    except SignatureError as exc:
        raise SignatureError(f"{path}: {exc}") from None


def generate(prefix: str) -> PublicKey:
    """Make PREFIX (the secret, mode 0600) and PREFIX.pub; neither may exist yet. A missing
    folder is made, mode 0700."""
    public_path = prefix + ".pub"
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder, 0o700)  # a new folder for keys: its owner's only
        except OSError as exc:
            raise SignatureError(f"{folder}: {exc.strerror or exc}") from None
    for path in (prefix, public_path):
        if os.path.lexists(path):
            raise SignatureError(f"{path} exists: a key file is never overwritten")
    secret = os.urandom(ed25519.SECRET_KEY_BYTES)
    name = os.path.basename(prefix)
    key = PublicKey(ed25519.public_key(secret), name if _NAME.fullmatch(name) else "key")
    _write_new(prefix, (SECRET_PREFIX + base64.b64encode(secret).decode("ascii") + "\n").encode(), 0o600)
    try:
        _write_new(public_path, f"{key.text} {key.name}\n".encode(), 0o644)
    except BaseException:
        os.unlink(prefix)
        raise
    return key


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never a moment readable by others), durably."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise SignatureError(f"{path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits off the public key's mode
        with os.fdopen(os.dup(fd), "wb") as out:
            out.write(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def sign_index(index: bytes, secrets: list[bytes]) -> bytes:
    """The ``index.json.sig`` of ``index``: one line per secret key."""
    if not 1 <= len(secrets) <= MAX_SIGNATURES:
        raise SignatureError(f"an update set is signed by 1 to {MAX_SIGNATURES} keys")
    lines = []
    for secret in secrets:
        key = PublicKey(ed25519.public_key(secret))
        lines.append(f"{key.text} {base64.b64encode(ed25519.sign(secret, index)).decode('ascii')}\n")
    return "".join(lines).encode("ascii")


def _signatures(data: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """(public key, signature) of each line of a signature file."""
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{where}: larger than {MAX_SIGNATURE_BYTES} bytes")
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise SignatureError(f"{where}: not a signature file (not ASCII text)") from None
    if not 1 <= len(lines) <= MAX_SIGNATURES:
        raise SignatureError(f"{where}: holds 1 to {MAX_SIGNATURES} signature lines, not {len(lines)}")
    found = []
    for number, line in enumerate(lines, 1):
        key, _, signature = line.partition(" ")
        try:
            if not key.startswith(PUBLIC_PREFIX):
                raise SignatureError(f"does not start with {PUBLIC_PREFIX}")
            found.append((_decode(key[len(PUBLIC_PREFIX):], _BASE64_32, "the key"),
                          _decode(signature.strip(), _BASE64_64, "the signature")))
        except SignatureError as exc:
            raise SignatureError(f"{where}: line {number}: {exc}") from None
    return found


def check_signature(index: bytes, signature_file: bytes, trusted: tuple[PublicKey, ...], where: str) -> PublicKey:
    """The trusted key whose signature over ``index`` verifies; SignatureError saying why none does."""
    lines = _signatures(signature_file, where)
    by_raw = {key.raw: key for key in trusted}
    known = [(by_raw[raw], signature) for raw, signature in lines if raw in by_raw]
    if not known:
        keys = ", ".join(PublicKey(raw).text for raw, _ in lines)
        raise SignatureError(f"{where}: signed only by keys not trusted here ({keys}); "
                             f"[updater.options] PublicKey names the trusted ones")
    for key, signature in known:
        if ed25519.verify(key.raw, index, signature):
            return key
    raise SignatureError(f"{where}: the signature by {known[0][0]} does not verify: the index was "
                         f"changed after signing, or the signature is damaged")
