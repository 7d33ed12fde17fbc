"""Key files in the data directory's keys/ folder.

The gate's static X25519 key pair (shared/protocol.md section 2): `gate.key`
holds the secret (hex, mode 0600), `gate.pub` the public key as the 64 hex
characters clients pin.
"""

from __future__ import annotations

import os
from pathlib import Path

from nacl.public import PrivateKey


class KeyFileError(Exception):
    pass


def _write_private(path: Path, text: str) -> None:
    # Create with 0600 from the start so the secret is never world-readable,
    # then rename into place so a reader never sees a half-written file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def keys_dir(data_dir: Path) -> Path:
    d = Path(data_dir) / "keys"
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_gate_key(data_dir: Path) -> tuple[bytes, bytes]:
    """Load the gate key pair, making it on first start. Returns (sk, pk)."""
    d = keys_dir(data_dir)
    sk_path, pk_path = d / "gate.key", d / "gate.pub"
    if sk_path.exists():
        return load_gate_secret(data_dir)
    sk = PrivateKey.generate()
    _write_private(sk_path, bytes(sk).hex() + "\n")
    _write_public(pk_path, bytes(sk.public_key).hex() + "\n")
    return bytes(sk), bytes(sk.public_key)


def load_gate_secret(data_dir: Path) -> tuple[bytes, bytes]:
    d = Path(data_dir) / "keys"
    try:
        sk = bytes.fromhex((d / "gate.key").read_text().strip())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the gate key {d / 'gate.key'}: {exc}") from None
    if len(sk) != 32:
        raise KeyFileError(f"{d / 'gate.key'} must hold 64 hex characters")
    pk = bytes(PrivateKey(sk).public_key)
    pub = d / "gate.pub"
    if not pub.exists() or pub.read_text().strip() != pk.hex():
        _write_public(pub, pk.hex() + "\n")
    return sk, pk


def load_gate_public(data_dir: Path) -> bytes:
    path = Path(data_dir) / "keys" / "gate.pub"
    try:
        pk = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read {path}: {exc}") from None
    if len(pk) != 32:
        raise KeyFileError(f"{path} must hold 64 hex characters")
    return pk
