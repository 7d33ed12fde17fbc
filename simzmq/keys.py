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


# ---------------------------------------------------------------------------
# Bus keys: CURVE key pairs for the internal ZeroMQ sockets (docs/operations.md).
#
# keys/bus/ROLE.key         public certificate (ZPL, as zmq.auth.load_certificate reads it)
# keys/bus/ROLE.key_secret  secret certificate, mode 0600
# keys/bus/allow/ROLE/*.key more public keys the brokers accept for ROLE
#
# Roles: broker (the brokers' server key, shared by both brokers of a pair and
# also the key each presents to its peer), gate, worker, ops (simzmq monitor).
# ---------------------------------------------------------------------------

BUS_ROLES = ("broker", "gate", "worker", "ops")

_CERT_HEADER = (
    "#   simzmq bus key: role {role}\n"
    "#   ZeroMQ CURVE {kind} Certificate\n"
    "{warning}\n"
    "metadata\n"
    "    role = \"{role}\"\n"
    "curve\n"
)


def bus_keys_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "keys" / "bus"


def allow_dir(data_dir: Path, role: str) -> Path:
    return bus_keys_dir(data_dir) / "allow" / role


def curve_cert_text(role: str, public: bytes, secret: bytes | None = None) -> str:
    """A ZPL certificate: public only, or public and secret (z85 keys)."""
    if secret is None:
        text = _CERT_HEADER.format(role=role, kind="Public",
                                   warning="#   Give this file to every broker that must accept this key.\n")
    else:
        text = _CERT_HEADER.format(role=role, kind="**Secret**",
                                   warning="#   Keep this file secret: mode 0600, readable by the service user only.\n")
    text += f"    public-key = \"{public.decode('ascii')}\"\n"
    if secret is not None:
        text += f"    secret-key = \"{secret.decode('ascii')}\"\n"
    return text


def read_curve_cert(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) as z85 bytes from a ZPL certificate, checked:
    keys of 32 bytes, and a secret that belongs to its public key."""
    import zmq
    import zmq.auth
    from zmq.utils import z85

    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc}") from None
    except ValueError:
        raise KeyFileError(f"{path}: no public-key in it") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None:
            try:
                if len(z85.decode(key)) != 32:
                    raise ValueError("not 32 bytes")
            except (ValueError, KeyError, TypeError) as exc:
                raise KeyFileError(f"{path}: bad {what} key: {exc}") from None
    if secret is not None and zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: the public key does not belong to the secret key")
    return public, secret


def ensure_bus_keys(data_dir: Path) -> dict[str, bytes]:
    """Make every missing bus key pair; returns role -> public key (z85).

    A secret whose public file went missing gets its public file back; an
    existing pair is never replaced."""
    import zmq

    d = bus_keys_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for role in BUS_ROLES:
        allow_dir(data_dir, role).mkdir(parents=True, exist_ok=True)
    publics = {}
    for role in BUS_ROLES:
        secret_path, public_path = d / f"{role}.key_secret", d / f"{role}.key"
        if secret_path.exists():
            public, secret = read_curve_cert(secret_path)
            if secret is None:
                raise KeyFileError(f"{secret_path}: no secret-key in it")
        else:
            public, secret = zmq.curve_keypair()
            _write_private(secret_path, curve_cert_text(role, public, secret))
        if not public_path.exists() or read_curve_cert(public_path)[0] != public:
            _write_public(public_path, curve_cert_text(role, public))
        publics[role] = public
    return publics


def load_bus_pair(data_dir: Path, role: str) -> tuple[bytes, bytes]:
    """(public, secret) of ROLE's bus key, z85; a clear error if it is missing."""
    path = bus_keys_dir(data_dir) / f"{role}.key_secret"
    if not path.exists():
        raise KeyFileError(f"missing {path}: run `simzmq keys --data {data_dir}` on one machine and copy "
                           f"the keys this process needs (docs/operations.md, 'Bus keys')")
    public, secret = read_curve_cert(path)
    if secret is None:
        raise KeyFileError(f"{path}: no secret-key in it")
    return public, secret


def load_bus_public(data_dir: Path, role: str) -> bytes:
    path = bus_keys_dir(data_dir) / f"{role}.key"
    if not path.exists():
        secret_path = path.with_name(path.name + "_secret")
        if secret_path.exists():
            return read_curve_cert(secret_path)[0]
        raise KeyFileError(f"missing {path}: run `simzmq keys --data {data_dir}` and copy it here")
    return read_curve_cert(path)[0]


def allowed_bus_keys(data_dir: Path) -> dict[str, dict[bytes, str]]:
    """Role -> {public key (z85): where it came from}: each role's own key
    (keys/bus/ROLE.key, if present) and every keys/bus/allow/ROLE/*.key."""
    out: dict[str, dict[bytes, str]] = {}
    for role in BUS_ROLES:
        keys: dict[bytes, str] = {}
        own = bus_keys_dir(data_dir) / f"{role}.key"
        if own.exists() or own.with_name(own.name + "_secret").exists():
            keys[load_bus_public(data_dir, role)] = str(own)
        extra = allow_dir(data_dir, role)
        if extra.is_dir():
            for path in sorted(extra.glob("*.key")):
                keys.setdefault(read_curve_cert(path)[0], str(path))
        out[role] = keys
    return out
