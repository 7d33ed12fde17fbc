"""Configuration: conf/simzmq.toml, then an operator's TOML file, then SIMZMQ_*
environment variables, then flags; checked as a whole before anything starts.

The file holds every default, commented; nothing else in the code invents a
default, so the file is the one place an operator reads them. Each key is
declared once below, with its kind (type, range, allowed values); from that
declaration come the environment variable's name and parser, the check, the
"did you mean" hints and the typed, frozen section objects a process uses.
Every problem found is reported, one line each, with where the value came
from; a configuration with any problem is refused as a whole.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from simzmq.limits import LimitsConfig

ENV_PREFIX = "SIMZMQ_"
# The ports written in conf/simzmq.toml are those of a region whose
# region.port_base is this; another port_base shifts every port by the difference.
DEFAULT_PORT_BASE = 7700
# SIMZMQ_* variables that are not configuration keys: the file to read, and
# knobs of the test and benchmark tools (a region started from a shell where
# one is set must not refuse to start).
NOT_CONFIGURATION = frozenset({
    "SIMZMQ_CONFIG", "SIMZMQ_TEST_PG_DSN", "SIMZMQ_TEST_STORE", "SIMZMQ_TEST_WORKERS", "SIMZMQ_TEST_GATES",
    "SIMZMQ_FUZZ_EXAMPLES", "SIMZMQ_CHAOS_RESULTS",
    "SIMZMQ_ATTACK_RESULTS", "SIMZMQ_ATTACK_USERS", "SIMZMQ_ATTACK_NICE", "SIMZMQ_ATTACKS",
})


class ConfigError(Exception):
    """One or more problems, each a line an operator can act on."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def default_config_path() -> Path:
    """conf/simzmq.toml beside the package (a source checkout or editable
    install), else the copy setup.py installs under sys.prefix."""
    here = Path(__file__).resolve().parent.parent / "conf" / "simzmq.toml"
    if here.is_file():
        return here
    installed = Path(sys.prefix) / "share" / "simzmq" / "simzmq.toml"
    if installed.is_file():
        return installed
    raise ConfigError(["cannot find the default configuration conf/simzmq.toml"])


# --- kinds of values -----------------------------------------------------------
#
# A kind parses an environment variable's text (from_text) and checks a value
# from TOML or a flag (check, which returns it normalized); both raise
# ValueError with what was expected.


class Kind:
    expect = "a value"

    def from_text(self, text: str) -> Any:
        return text

    def check(self, value: Any) -> Any:
        return value

    def shift(self, value: Any, delta: int) -> Any:
        """The value in a region whose ports are `delta` from the file's."""
        return value


@dataclass(frozen=True)
class Bool(Kind):
    expect = "true or false"

    def from_text(self, text: str) -> bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(self.expect)

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(self.expect)
        return value


@dataclass(frozen=True)
class Int(Kind):
    lo: int
    hi: int | None = None

    @property
    def expect(self) -> str:
        return f"an integer {self.lo}-{self.hi}" if self.hi is not None else f"an integer >= {self.lo}"

    def from_text(self, text: str) -> int:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(self.expect) from None

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(self.expect)
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise ValueError(self.expect)
        return value


@dataclass(frozen=True)
class Port(Int):
    """A TCP port; with `off`, 0 turns the listener off."""
    lo: int = 1
    hi: int | None = 65535
    off: bool = False

    @property
    def expect(self) -> str:
        return "a port 1-65535" + (" (0: off)" if self.off else "")

    def check(self, value: Any) -> int:
        if self.off and value == 0 and not isinstance(value, bool):
            return 0
        return super().check(value)

    def shift(self, value: int, delta: int) -> int:
        if value == 0:
            return 0
        return _shifted_port(value, delta)


def _shifted_port(port: int, delta: int) -> int:
    moved = port + delta
    if not 1 <= moved <= 65535:
        raise ValueError(f"from {port} to {moved}")
    return moved


@dataclass(frozen=True)
class Seconds(Kind):
    """A positive duration or amount (float; ints accepted)."""
    expect = "a number > 0"

    def from_text(self, text: str) -> float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(self.expect) from None

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(self.expect)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(self.expect)
        return value


@dataclass(frozen=True)
class Choice(Kind):
    values: tuple[str, ...]
    upper: bool = False  # compare and keep in upper case (SQLite pragma values)

    @property
    def expect(self) -> str:
        return "one of " + ", ".join(self.values)

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(self.expect)
        value = value.upper() if self.upper else value
        if value not in self.values:
            raise ValueError(self.expect)
        return value


@dataclass(frozen=True)
class Text(Kind):
    empty: bool = False
    expect = "a string"

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or (not self.empty and not value.strip()):
            raise ValueError("a string" if self.empty else "a non-empty string")
        return value


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host)) and not host.replace(".", "").isdigit()


@dataclass(frozen=True)
class Host(Kind):
    expect = "an IP address or host name"

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not _valid_host(value):
            raise ValueError(self.expect)
        return value


@dataclass(frozen=True)
class Endpoint(Kind):
    """A ZeroMQ endpoint the brokers bind and the others connect to."""
    expect = "tcp://HOST:PORT or ipc://PATH"

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(self.expect)
        if value.startswith("ipc://"):
            if not value[len("ipc://"):].strip():
                raise ValueError(self.expect + " (the ipc path is empty)")
            return value
        if not value.startswith("tcp://"):
            raise ValueError(self.expect)
        host, port = split_tcp(value)
        if host != "*" and not _valid_host(host):
            raise ValueError(f"{self.expect} ({host!r} is not an IP address or host name)")
        if port is None:
            raise ValueError(f"{self.expect} (the port must be 1-65535)")
        return value

    def shift(self, value: str, delta: int) -> str:
        if not value.startswith("tcp://"):
            return value
        host, port = split_tcp(value)
        shown = f"[{host}]" if ":" in host else host
        return f"tcp://{shown}:{_shifted_port(port, delta)}"


def split_tcp(endpoint: str) -> tuple[str, int | None]:
    """("127.0.0.1", 7721) from "tcp://127.0.0.1:7721" ("::1" from "[::1]");
    port None when missing or out of range."""
    rest = endpoint[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return host, None
    return host, int(port)


@dataclass(frozen=True)
class StoreUrl(Kind):
    expect = "sqlite (im.sqlite_path in the data directory), sqlite:///PATH or postgresql://..."

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(self.expect)
        if value == "sqlite":
            return value
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if scheme == "sqlite" and value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if scheme in ("postgresql", "postgres") and value.startswith(scheme + "://"):
            try:
                parts.port  # noqa: B018 -- raises on a malformed port
            except ValueError:
                raise ValueError(self.expect + " (the port is not a number 1-65535)") from None
            return value
        raise ValueError(self.expect)


@dataclass(frozen=True)
class WebhookUrl(Kind):
    """Empty (off), or a URL the push service may call (simzmq/push/webhook.py)."""
    expect = "empty, or an https:// URL (http:// to a loopback address only)"

    def check(self, value: Any) -> str:
        from simzmq.push.webhook import url_problem
        if not isinstance(value, str):
            raise ValueError(self.expect)
        why = url_problem(value) if value else None
        if why:
            raise ValueError(why)
        return value


@dataclass(frozen=True)
class Names(Kind):
    """A list of strings; in the environment, comma-separated."""
    empty: bool = True  # whether the list may be empty
    expect = "a list of strings"

    def from_text(self, text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    def check(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(self.expect)
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError("a list of non-empty strings")
        if not value and not self.empty:
            raise ValueError("a non-empty list of strings")
        return tuple(value)


@dataclass(frozen=True)
class NonNegative(Kind):
    """A [gate.limits] number: of its default's type, LimitsConfig checks the rest."""
    integer: bool

    @property
    def expect(self) -> str:
        return "an integer >= 0" if self.integer else "a number >= 0"

    def from_text(self, text: str) -> int | float:
        try:
            return int(text.strip()) if self.integer else float(text.strip())
        except ValueError:
            raise ValueError(self.expect) from None

    def check(self, value: Any) -> int | float:
        ok = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or value < 0 or not math.isfinite(value):
            raise ValueError(self.expect)
        return value if self.integer else float(value)


def setting(kind: Kind):
    return field(metadata={"kind": kind})


# --- the sections ---------------------------------------------------------------------


@dataclass(frozen=True)
class RegionConfig:
    data: Path = setting(Text())
    metrics_host: str = setting(Host())
    port_base: int = setting(Int(1, 65535))
    name: str = setting(Text())
    peers: tuple[str, ...] = setting(Names())
    federation_metrics_port: int = setting(Port(off=True))


@dataclass(frozen=True)
class GateConfig:
    host: str = setting(Host())
    port: int = setting(Port())
    http_host: str = setting(Host())
    http_port: int = setting(Port())
    tls_cert: str = setting(Text(empty=True))
    tls_key: str = setting(Text(empty=True))
    behind_tls_proxy: bool = setting(Bool())
    gates: int = setting(Int(1, 100))
    max_frame: int = setting(Int(1024, 64 * 1024 * 1024))
    max_body: int = setting(Int(1, 64 * 1024 * 1024))
    max_group_members: int = setting(Int(1, 10_000))
    handshake_timeout_s: float = setting(Seconds())
    idle_timeout_s: int = setting(Int(1, 2**32 - 1))  # whole seconds: clients read it in Ready
    request_timeout_s: float = setting(Seconds())
    probe_interval_ms: int = setting(Int(1))
    failover_after_ms: int = setting(Int(1))
    push_hole_timeout_ms: int = setting(Int(1))
    allow_register: bool = setting(Bool())
    max_outbound_bytes: int = setting(Int(1))
    limits: LimitsConfig = field(default=None)


@dataclass(frozen=True)
class BusConfig:
    curve: bool = setting(Bool())


@dataclass(frozen=True)
class BrokerEndpointsConfig:
    frontend: str = setting(Endpoint())
    backend: str = setting(Endpoint())
    notify_in: str = setting(Endpoint())
    notify_out: str = setting(Endpoint())
    state: str = setting(Endpoint())
    metrics_port: int = setting(Port(off=True))


@dataclass(frozen=True)
class BrokerConfig:
    heartbeat_ms: int = setting(Int(1))
    liveness: int = setting(Int(1))
    peer_heartbeat_ms: int = setting(Int(1))
    request_timeout_ms: int = setting(Int(1))
    keyed_services: tuple[str, ...] = setting(Names())
    primary: BrokerEndpointsConfig = field(default=None)
    backup: BrokerEndpointsConfig = field(default=None)

    def role(self, name: str) -> BrokerEndpointsConfig:
        return self.primary if name == "primary" else self.backup


@dataclass(frozen=True)
class IMConfig:
    workers: int = setting(Int(1, 100))
    store: str = setting(StoreUrl())
    sqlite_path: str = setting(Text())
    sqlite_synchronous: str = setting(Choice(("OFF", "NORMAL", "FULL", "EXTRA"), upper=True))
    credit: int = setting(Int(1, 100000))
    token_ttl_s: int = setting(Int(1))
    pwhash_strength: str = setting(Choice(("interactive", "moderate", "sensitive")))
    pwhash_threads: int = setting(Int(1, 256))
    pwhash_nice: int = setting(Int(0, 19))
    metrics_port: int = setting(Port(off=True))


@dataclass(frozen=True)
class PushConfig:
    """The push service (docs/push.md); off while webhook is empty."""
    webhook: str = setting(WebhookUrl())
    secret: str = setting(Text(empty=True))
    delay_ms: int = setting(Int(0))
    coalesce_ms: int = setting(Int(0))
    timeout_s: float = setting(Seconds())
    max_age_s: int = setting(Int(1))
    backoff_min_ms: int = setting(Int(1))
    backoff_max_ms: int = setting(Int(1))
    concurrency: int = setting(Int(1, 10000))
    jobs_per_user: int = setting(Int(1, 100000))
    lease_s: int = setting(Int(1))
    scan_interval_ms: int = setting(Int(1))
    presence_interval_s: float = setting(Seconds())
    instances: int = setting(Int(1, 16))
    metrics_port: int = setting(Port(off=True))

    @property
    def enabled(self) -> bool:
        return bool(self.webhook)

    @property
    def job_delay_ms(self) -> int:
        """How long after its message a job is due: the wait, and with
        coalescing the window after it, so the window's jobs are all queued."""
        return self.delay_ms + self.coalesce_ms


# Section name -> its dataclass; nested sections are fields of their parent.
SECTIONS: dict[str, type] = {
    "region": RegionConfig, "gate": GateConfig, "gate.limits": LimitsConfig, "bus": BusConfig,
    "broker": BrokerConfig, "broker.primary": BrokerEndpointsConfig, "broker.backup": BrokerEndpointsConfig,
    "im": IMConfig, "push": PushConfig,
}


def _kind_of(section: str, f) -> Kind | None:
    if "kind" in f.metadata:
        return f.metadata["kind"]
    if SECTIONS[section] is LimitsConfig:
        default = f.default
        if isinstance(default, tuple):
            return Names()
        return NonNegative(integer=isinstance(default, int))
    return None  # a nested section


def _schema() -> dict[str, Kind]:
    out = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            kind = _kind_of(section, f)
            if kind is not None:
                out[f"{section}.{f.name}"] = kind
    return out


# Every key, dotted ("gate.limits.sends_per_s"), and its kind.
SCHEMA: dict[str, Kind] = _schema()


def env_name(key: str) -> str:
    """SIMZMQ_GATE_LIMITS_SENDS_PER_S for gate.limits.sends_per_s."""
    return ENV_PREFIX + key.replace(".", "_").upper()


ENV_NAMES: dict[str, str] = {env_name(key): key for key in SCHEMA}


def _did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """The closest choice, compared without the `prefix` they all share."""
    by_rest = {c[len(prefix):]: c for c in choices}
    close = difflib.get_close_matches(word[len(prefix):], list(by_rest), n=1, cutoff=0.6)
    return f" (did you mean {by_rest[close[0]]}?)" if close else ""


# --- the configuration of a process ----------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """A checked configuration: `cfg.gate.port`, plus where it came from."""
    region: RegionConfig
    gate: GateConfig
    bus: BusConfig
    broker: BrokerConfig
    im: IMConfig
    push: PushConfig
    sources: tuple[str, ...]

    @property
    def data_dir(self) -> Path:
        return self.region.data

    def describe(self) -> str:
        return " + ".join(self.sources)

    def store_url(self) -> str:
        """The store as open_store takes it: "sqlite" is im.sqlite_path in the data directory."""
        if self.im.store == "sqlite":
            return "sqlite:///" + str(self.data_dir / self.im.sqlite_path)
        return self.im.store


# --- loading ------------------------------------------------------------------------------


class _Layers:
    """Values by dotted key, each with where it came from."""

    def __init__(self):
        self.values: dict[str, Any] = {}
        self.origin: dict[str, str] = {}
        self.problems: list[str] = []

    def set(self, key: str, value: Any, origin: str) -> None:
        self.values[key] = value
        self.origin[key] = origin

    def add_toml(self, data: dict, origin: str, prefix: str = "") -> None:
        for name, value in data.items():
            key = prefix + name
            if key in SECTIONS:
                if not isinstance(value, dict):
                    self.problems.append(f"{origin}: {key} must be a table [{key}]")
                else:
                    self.add_toml(value, origin, key + ".")
            elif key in SCHEMA:
                if isinstance(value, dict):
                    self.problems.append(f"{origin}: {key} must be a value, not a table")
                else:
                    self.set(key, value, origin)
            else:
                self.problems.append(f"{origin}: unknown key {key}" + _did_you_mean(key, list(SCHEMA) + list(SECTIONS)))

    def add_env(self, env: Mapping[str, str]) -> list[str]:
        applied = []
        for name in sorted(env):
            if not name.startswith(ENV_PREFIX) or name in NOT_CONFIGURATION:
                continue
            key = ENV_NAMES.get(name)
            if key is None:
                self.problems.append(f"unknown environment variable {name}"
                                     + _did_you_mean(name, list(ENV_NAMES) + sorted(NOT_CONFIGURATION), ENV_PREFIX))
                continue
            text = env[name]
            try:
                value = SCHEMA[key].from_text(text)
            except ValueError as exc:
                self.problems.append(f"{name}={text!r}: {key} must be {exc}")
                continue
            self.set(key, value, name)
            applied.append(name)
        return applied


def _read_toml(path: Path, origin: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"cannot read {origin}: {exc}"]) from None


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None, flag_names: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file at `path` (if given; it may set any subset of
    keys), then SIMZMQ_* variables, then `overrides` (from flags, by section
    like the file: {"gate": {"port": 7000}}; None means not given;
    `flag_names` says which flag set a dotted key, for messages). Raises
    ConfigError listing every problem."""
    default_path = default_config_path()
    layers = _Layers()
    layers.add_toml(_read_toml(default_path, str(default_path)), str(default_path))
    sources = [str(default_path)]
    if path is not None and Path(path).resolve() != default_path:
        layers.add_toml(_read_toml(Path(path), str(path)), str(path))
        sources.append(str(path))
    applied = layers.add_env(os.environ if env is None else env)
    if applied:
        sources.append("env " + ",".join(applied))
    flagged = []
    for key, value in _flatten(overrides or {}).items():
        if key not in SCHEMA:
            raise KeyError(f"no configuration key {key}")  # a programming error, not an operator's
        if value is not None:
            layers.set(key, value, (flag_names or {}).get(key, "a flag"))
            flagged.append(key)
    if flagged:
        sources.append("flags " + ",".join(flagged))
    return _build(layers, tuple(sources))


def _flatten(tables: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in tables.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def _check_values(layers: _Layers) -> dict[str, Any]:
    """Each value against its kind, then shifted by region.port_base."""
    problems = layers.problems
    checked: dict[str, Any] = {}
    for key, kind in SCHEMA.items():
        if key not in layers.values:
            problems.append(f"{key} is missing from the configuration")
            continue
        value, origin = layers.values[key], layers.origin[key]
        try:
            checked[key] = kind.check(value)
        except ValueError as exc:
            problems.append(f"{key} = {value!r} (from {origin}): must be {exc}")
    delta = checked.get("region.port_base", DEFAULT_PORT_BASE) - DEFAULT_PORT_BASE
    if delta:
        outside = []
        for key, value in checked.items():
            try:
                checked[key] = SCHEMA[key].shift(value, delta)
            except ValueError as exc:
                outside.append(f"{key} {exc}")
        if outside:
            more = f", and {len(outside) - 1} more port{'s' if len(outside) > 2 else ''}," if len(outside) > 1 else ""
            problems.append(f"region.port_base = {checked['region.port_base']} (from {layers.origin['region.port_base']}) "
                            f"moves {outside[0]}{more} outside 1-65535")
    return checked


def _section(cls: type, prefix: str, values: dict[str, Any], nested: dict[str, Any]):
    args = {}
    for f in fields(cls):
        key = prefix + f.name
        args[f.name] = nested[f.name] if f.name in nested else values[key]
    return cls(**args)


def _build(layers: _Layers, sources: tuple[str, ...]) -> Config:
    values = _check_values(layers)
    problems = layers.problems
    if problems:
        raise ConfigError(problems)
    limit_values = {k.split(".", 2)[2]: v for k, v in values.items() if k.startswith("gate.limits.")}
    try:
        limits = LimitsConfig.from_mapping(limit_values)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    values["region.data"] = Path(values["region.data"]).resolve()
    cfg = Config(
        region=_section(RegionConfig, "region.", values, {}),
        gate=_section(GateConfig, "gate.", values, {"limits": limits}),
        bus=_section(BusConfig, "bus.", values, {}),
        broker=_section(BrokerConfig, "broker.", values, {
            role: _section(BrokerEndpointsConfig, f"broker.{role}.", values, {}) for role in ("primary", "backup")}),
        im=_section(IMConfig, "im.", values, {}),
        push=_section(PushConfig, "push.", values, {}),
        sources=sources)
    problems = cross_check(cfg, layers.origin)
    if problems:
        raise ConfigError(problems)
    return cfg


def cross_check(cfg: Config, origin: Mapping[str, str]) -> list[str]:
    """What no single key can be wrong about alone (`origin`: where each
    dotted key's value came from, for messages)."""
    problems = []
    g, b = cfg.gate, cfg.broker
    if g.max_body > g.max_frame:
        problems.append(f"gate.max_body ({g.max_body}) must not exceed gate.max_frame ({g.max_frame})")
    if g.failover_after_ms <= g.probe_interval_ms:
        problems.append(f"gate.failover_after_ms ({g.failover_after_ms}) must be more than "
                        f"gate.probe_interval_ms ({g.probe_interval_ms})")
    if bool(g.tls_cert) != bool(g.tls_key):
        problems.append("gate.tls_cert and gate.tls_key go together: set both or neither")
    if b.request_timeout_ms >= g.request_timeout_s * 1000:
        problems.append(f"broker.request_timeout_ms ({b.request_timeout_ms}) must be below "
                        f"gate.request_timeout_s ({g.request_timeout_s} s), so that a request the gate "
                        "gave up on is dropped at the broker rather than still taking effect")
    problems += push_problems(cfg.push, origin)
    seen: dict[str, str] = {}
    for role in ("primary", "backup"):
        eps = b.role(role)
        for name in ("frontend", "backend", "notify_in", "notify_out", "state"):
            ep = getattr(eps, name)
            key = f"broker.{role}.{name}"
            if ep in seen:
                problems.append(f"{key} = {ep!r} is also {seen[ep]}: every broker endpoint must differ")
            else:
                seen[ep] = key
    return problems


def push_problems(p: PushConfig, origin: Mapping[str, str]) -> list[str]:
    problems = []
    if p.secret and not p.webhook:
        # A secret alone means a forgotten webhook: pushes would silently not go out.
        problems.append(f"push.secret is set (from {origin['push.secret']}) but push.webhook is not, and the push "
                        "service runs only with a webhook to call: add --webhook URL (push.webhook, "
                        "SIMZMQ_PUSH_WEBHOOK), or drop the secret")
    if p.webhook and not p.secret:
        problems.append("push.secret must be set when push.webhook is (the calls are signed with it): "
                        "--webhook-secret S, or SIMZMQ_PUSH_SECRET")
    if p.backoff_min_ms > p.backoff_max_ms:
        problems.append(f"push.backoff_min_ms ({p.backoff_min_ms}) must not exceed "
                        f"push.backoff_max_ms ({p.backoff_max_ms})")
    if p.lease_s <= 2 * p.timeout_s:
        problems.append(f"push.lease_s ({p.lease_s}) must be more than twice push.timeout_s ({p.timeout_s}), "
                        "so a claim outlives a call that times out")
    return problems


# --- the listeners of a region on one machine ----------------------------------------------


@dataclass(frozen=True)
class Listener:
    process: str   # "gate-2", "broker-primary", "im-1"
    what: str      # "client port", "frontend", "metrics", ...
    host: str
    port: int

    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def gate_ports(cfg: Config, index: int) -> tuple[int, int]:
    """gate-N's client and HTTP ports: gate.port + N - 1, gate.http_port + N - 1."""
    return cfg.gate.port + index - 1, cfg.gate.http_port + index - 1


def im_metrics_port(cfg: Config, index: int) -> int:
    """im-N serves /metrics on im.metrics_port + N - 1 (0: off)."""
    return cfg.im.metrics_port + index - 1 if cfg.im.metrics_port else 0


def push_metrics_port(cfg: Config, index: int) -> int:
    """push-N serves /metrics on push.metrics_port + N - 1 (0: off)."""
    return cfg.push.metrics_port + index - 1 if cfg.push.metrics_port else 0


def push_listeners(cfg: Config, index: int) -> list[Listener]:
    port = push_metrics_port(cfg, index)
    return [Listener(f"push-{index}", "metrics", cfg.region.metrics_host, port)] if port else []


def broker_listeners(cfg: Config, role: str) -> list[Listener]:
    eps = cfg.broker.role(role)
    out = []
    for name in ("frontend", "backend", "notify_in", "notify_out", "state"):
        ep = getattr(eps, name)
        if ep.startswith("tcp://"):
            host, port = split_tcp(ep)
            out.append(Listener(f"broker-{role}", name, host, port))
    if eps.metrics_port:
        out.append(Listener(f"broker-{role}", "metrics", cfg.region.metrics_host, eps.metrics_port))
    return out


def im_listeners(cfg: Config, index: int) -> list[Listener]:
    port = im_metrics_port(cfg, index)
    return [Listener(f"im-{index}", "metrics", cfg.region.metrics_host, port)] if port else []


def gate_listeners(cfg: Config, name: str, port: int, http_port: int) -> list[Listener]:
    return [Listener(name, "client port", cfg.gate.host, port), Listener(name, "http port", cfg.gate.http_host, http_port)]


def federation_listeners(cfg: Config) -> list[Listener]:
    port = cfg.region.federation_metrics_port
    return [Listener("federation", "metrics", cfg.region.metrics_host, port)] if port and cfg.region.peers else []


def region_listeners(cfg: Config) -> list[Listener]:
    """Everything `simzmq up` will listen on, on this machine."""
    out = broker_listeners(cfg, "primary") + broker_listeners(cfg, "backup") + federation_listeners(cfg)
    for i in range(1, cfg.im.workers + 1):
        out += im_listeners(cfg, i)
    if cfg.push.enabled:
        for i in range(1, cfg.push.instances + 1):
            out += push_listeners(cfg, i)
    for i in range(1, cfg.gate.gates + 1):
        out += gate_listeners(cfg, f"gate-{i}", *gate_ports(cfg, i))
    return out


def local_problems(cfg: Config) -> list[str]:
    """What stops a whole region from running on this one machine (`simzmq
    up`): ports used twice (one line for all: the first clash and how many
    more), a gate's TLS files missing here."""
    problems = []
    clashes = port_clashes(region_listeners(cfg))
    if clashes:
        more = f", and {len(clashes) - 1} more port{'s' if len(clashes) > 2 else ''} used twice" if len(clashes) > 1 else ""
        problems.append(f"{clashes[0]}{more} (gate-N listens on gate.port + N - 1 and gate.http_port + N - 1; "
                        "docs/running.md shows the port layout)")
    for key in ("tls_cert", "tls_key"):
        path = getattr(cfg.gate, key)
        if path and not os.access(path, os.R_OK):
            problems.append(f"gate.{key} = {path!r}: no readable file there")
    return problems


def port_clashes(listeners: list[Listener]) -> list[str]:
    """Two listeners of one machine on one port (a wildcard host clashes with any)."""
    problems = []
    by_port: dict[int, Listener] = {}
    for lst in listeners:
        other = by_port.get(lst.port)
        if other is not None and (other.host == lst.host or "*" in (other.host, lst.host)
                                  or _wildcard(other.host) or _wildcard(lst.host)):
            problems.append(f"port {lst.port} is both {other.process} {other.what} and {lst.process} {lst.what}")
        else:
            by_port.setdefault(lst.port, lst)
    return problems


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "*")


# --- to child processes ----------------------------------------------------------------------


def env_for(overrides: Mapping[str, Any]) -> dict[str, str]:
    """The SIMZMQ_* variables that carry `overrides` (as load takes them) to a child process."""
    out = {}
    for key, value in _flatten(overrides).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(value)
        out[env_name(key)] = str(value)
    return out
