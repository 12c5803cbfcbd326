"""Ed25519 signatures on model packages (`cryptography`): the server signs, every site verifies.

What is signed is the package description the server delivers with the weights (run, round, schema
hash, SHA-256 of the weight arrays, per-site epsilon, metrics...), as canonical JSON. The site
checks the signature against the consortium's model-signing public key (its trust anchor, from
provisioning) and then that the arrays it received hash to the signed `arrays_sha256`; either
failure means the package is not installed and the active model stays.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_KEY = "signature"


class SignatureError(ValueError):
    """A package that is unsigned, signed by another key, or altered after signing."""


def canonical(info: dict) -> bytes:
    body = {k: v for k, v in info.items() if k != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def generate_signing_key(private_path: str | Path, public_path: str | Path) -> None:
    """A new Ed25519 key pair: private key PEM (PKCS#8, mode 0600), public key PEM."""
    key = Ed25519PrivateKey.generate()
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    Path(public_path).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))


def write_private(path: str | Path, data: bytes) -> None:
    """Create a private-key file readable by its owner only (0600 from the first byte)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def load_private(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a readable model-signing private key ({e}); use the signing.key "
                             "written by `oncofed consortium init`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: a model-signing key must be Ed25519, this is {type(key).__name__}")
    if os.stat(path).st_mode & 0o077:
        raise SignatureError(f"{path}: the model-signing key is readable by other users; run `chmod 600 {path}`")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SignatureError(f"{path}: not a readable model-signing public key ({e}); use the signing.pub "
                             "of the consortium's public bundle") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: a model-signing public key must be Ed25519, this is {type(key).__name__}")
    return key


def sign(info: dict, key: Ed25519PrivateKey) -> dict:
    """The package description with its signature added."""
    return {**info, SIGNATURE_KEY: base64.b64encode(key.sign(canonical(info))).decode()}


def verify(info: dict, key: Ed25519PublicKey) -> None:
    """Raises SignatureError unless `info` carries a valid signature of the consortium's key."""
    sig = info.get(SIGNATURE_KEY)
    if not sig:
        raise SignatureError("the model package is not signed; this site accepts only packages signed with the "
                             "consortium's model-signing key")
    try:
        key.verify(base64.b64decode(sig), canonical(info))
    except (InvalidSignature, ValueError):
        raise SignatureError("the model package's signature does not verify with the consortium's model-signing "
                             "key: it was altered after signing or signed by another key") from None
