"""Bundle signatures: who made this bundle, and has anything changed since.

A signature covers the *canonical serialization* of ``manifest.json`` (the parsed JSON
dumped with sorted keys, no whitespace, UTF-8), and the manifest lists every other
file's sha256, so every file is covered transitively. It is stored beside the manifest
in ``manifest.sig`` (JSON, documented in docs/bundle-security.md):

    {"format": "ugsep-manifest-signature", "version": 1,
     "algorithm": "ed25519" | "hmac-sha256", "key_id": "<16 hex>",
     "manifest_sha256": "<hex of the canonical bytes>", "signature": "<base64>"}

The signed message is ``b"ugsep-manifest-signature-v1\\n" + canonical bytes``.

Keys (``load_key``): a PEM file is an Ed25519 key (private to sign; public, or private,
to verify) from the ``cryptography`` package; ``hmac:FILE`` is a shared HMAC-SHA256
secret (the file's bytes, surrounding whitespace stripped, at least 32 bytes). Which
algorithm a bundle is verified with is decided by the verify key, never by the
signature file. ``cryptography`` is imported only when an Ed25519 key is used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import BundleError, UgsepError

SIGNATURE_NAME = "manifest.sig"
SIG_FORMAT = "ugsep-manifest-signature"
SIG_VERSION = 1
DOMAIN = b"ugsep-manifest-signature-v1\n"
ED25519, HMAC_SHA256 = "ed25519", "hmac-sha256"
MIN_SECRET_BYTES = 32
HMAC_PREFIX = "hmac:"


class SignatureError(BundleError):
    """A bundle is unsigned, its manifest was altered after signing, or another key signed it."""


class SigningKeyError(UgsepError, ValueError):
    """A key file is missing, unreadable, or not a key ugsep can sign or verify with."""


def canonical_manifest(data: Any) -> bytes:
    """The bytes a signature covers: the parsed manifest, sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class BundleKey:
    """An Ed25519 key (private and/or public) or an HMAC-SHA256 secret, with its origin."""

    algorithm: str
    source: str
    secret: bytes | None = None  # HMAC
    private: Any = None  # cryptography Ed25519PrivateKey
    public: Any = None  # cryptography Ed25519PublicKey

    @property
    def key_id(self) -> str:
        """A short public fingerprint: sha256 of the raw public key / of the labelled secret."""
        if self.algorithm == HMAC_SHA256:
            material = b"ugsep-hmac-key-id\n" + self.secret
        else:
            from cryptography.hazmat.primitives import serialization as ser

            material = self.public.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        return hashlib.sha256(material).hexdigest()[:16]

    @property
    def can_sign(self) -> bool:
        return self.secret is not None or self.private is not None

    def sign(self, message: bytes) -> bytes:
        if self.algorithm == HMAC_SHA256:
            return hmac.new(self.secret, message, hashlib.sha256).digest()
        if self.private is None:
            raise SigningKeyError(
                f"key '{self.source}' is an Ed25519 public key: signing needs the private key"
            )
        return self.private.sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if self.algorithm == HMAC_SHA256:
            return hmac.compare_digest(self.sign(message), signature)
        from cryptography.exceptions import InvalidSignature

        try:
            self.public.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def load_key(key: str | os.PathLike | BundleKey) -> BundleKey:
    """A key from a PEM Ed25519 file or ``hmac:FILE`` (see the module docstring)."""
    if isinstance(key, BundleKey):
        return key
    text = os.fspath(key)
    if text.startswith(HMAC_PREFIX):
        return _hmac_key(Path(text[len(HMAC_PREFIX):]))
    data = _read_key_file(Path(text))
    if not data.lstrip().startswith(b"-----BEGIN"):
        raise SigningKeyError(
            f"key file '{text}' is not a PEM Ed25519 key (make one with `ugsep keygen`); for a "
            f"shared HMAC-SHA256 secret, name it {HMAC_PREFIX}{text}"
        )
    return _ed25519_key(text, data)


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise SigningKeyError(f"key file '{path}' does not exist") from e
    except OSError as e:
        raise SigningKeyError(f"cannot read key file '{path}': {e}") from e


def _hmac_key(path: Path) -> BundleKey:
    secret = _read_key_file(path).strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise SigningKeyError(
            f"HMAC secret '{path}' holds {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(`ugsep keygen --hmac` writes 64 random hex characters)"
        )
    return BundleKey(HMAC_SHA256, f"{HMAC_PREFIX}{path}", secret=secret)


def _ed25519_key(source: str, data: bytes) -> BundleKey:
    try:
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise SigningKeyError(
            f"Ed25519 key '{source}' needs the 'cryptography' package: pip install cryptography"
        ) from e
    try:
        if b"PRIVATE KEY" in data.lstrip().split(b"\n", 1)[0]:
            private = ser.load_pem_private_key(data, password=None)
            public = private.public_key() if isinstance(private, ed25519.Ed25519PrivateKey) else None
        else:
            private, public = None, ser.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"cannot load PEM key '{source}': {e}") from e
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise SigningKeyError(
            f"key '{source}' is a PEM {type(public or private).__name__} key; ugsep signs with "
            "Ed25519 keys (`ugsep keygen`) or HMAC secrets (hmac:FILE)"
        )
    return BundleKey(ED25519, source, private=private, public=public)


# -- signing and verifying bundles -----------------------------------------------------------
def sign_bundle(bundle_dir: str | Path, key: str | os.PathLike | BundleKey) -> Path:
    """Verify the bundle (files, structure), then write its ``manifest.sig``; returns its path."""
    from runtime.bundle import Bundle
    from runtime.manifest import Manifest

    key = load_key(key)
    if not key.can_sign:
        key.sign(b"")  # raises the "needs the private key" error
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"'{root}' is not a bundle directory (sign it before packing a .tar)")
    Bundle.open(root)  # refuse to vouch for a bundle that is already broken
    payload = canonical_manifest(Manifest.read_data(root))
    doc = {
        "format": SIG_FORMAT,
        "version": SIG_VERSION,
        "algorithm": key.algorithm,
        "key_id": key.key_id,
        "manifest_sha256": hashlib.sha256(payload).hexdigest(),
        "signature": base64.b64encode(key.sign(DOMAIN + payload)).decode(),
    }
    path = root / SIGNATURE_NAME
    tmp = root / (SIGNATURE_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def verify_manifest(root: Path, data: Any, key: str | os.PathLike | BundleKey) -> None:
    """Refuse unless ``manifest.sig`` in ``root`` is ``key``'s signature of ``data``."""
    key = load_key(key)
    where = f"bundle '{root}'"
    doc = _read_signature(root, key)
    if doc.get("algorithm") != key.algorithm:
        raise SignatureError(
            f"{where}: {SIGNATURE_NAME} holds a signature of algorithm {doc.get('algorithm')!r}, "
            f"but the verify key '{key.source}' is {key.algorithm}; refusing the bundle"
        )
    if doc.get("key_id") != key.key_id:
        raise SignatureError(
            f"{where}: {SIGNATURE_NAME} was signed by key {doc.get('key_id')!r}, not by the "
            f"verify key '{key.source}' (key id {key.key_id}); refusing the bundle"
        )
    try:
        signature = base64.b64decode(str(doc.get("signature")), validate=True)
    except ValueError as e:
        raise SignatureError(f"{where}: {SIGNATURE_NAME} holds no valid base64 signature") from e
    if not key.verify(DOMAIN + canonical_manifest(data), signature):
        raise SignatureError(
            f"{where}: manifest.json does not match its signature in {SIGNATURE_NAME} (key "
            f"{key.key_id}): the manifest was altered after signing; refusing the bundle"
        )


def _read_signature(root: Path, key: BundleKey) -> dict:
    path = root / SIGNATURE_NAME
    if path.is_symlink() or not path.is_file():
        raise SignatureError(
            f"bundle '{root}' is not signed ({SIGNATURE_NAME} is missing) and a verify key was "
            f"given ('{key.source}'); sign it with `ugsep sign {root} --key KEY`"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"bundle '{root}': cannot parse {SIGNATURE_NAME}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != SIG_FORMAT or doc.get("version") != SIG_VERSION:
        raise SignatureError(
            f"bundle '{root}': {SIGNATURE_NAME} is not a {SIG_FORMAT} version {SIG_VERSION} document"
        )
    return doc


# -- key generation -------------------------------------------------------------------------
def generate_key(out: str | Path, *, algorithm: str = ED25519, overwrite: bool = False) -> list[Path]:
    """Write a new key: Ed25519 -> ``out`` (private PEM) + ``out.pub``; HMAC -> ``out``."""
    out = Path(out)
    if algorithm == HMAC_SHA256:
        _write_secret_file(out, (secrets.token_hex(32) + "\n").encode(), overwrite)
        return [out]
    if algorithm != ED25519:
        raise SigningKeyError(f"unknown key algorithm {algorithm!r}: use {ED25519} or {HMAC_SHA256}")
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub = private.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    pub_path = out.with_name(out.name + ".pub")
    _refuse_existing(pub_path, overwrite)  # before writing either file
    _write_secret_file(out, pem, overwrite)
    _write_secret_file(pub_path, pub, overwrite, mode=0o644)
    return [out, pub_path]


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SigningKeyError(f"'{path}' already exists; pass --overwrite to replace it")


def _write_secret_file(path: Path, data: bytes, overwrite: bool, mode: int = 0o600) -> None:
    _refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
