"""Configuration: conf/simzmq.toml, then SIMZMQ_* environment variables, then flags.

The file holds every default, commented; nothing else in the code invents a
default, so the file is the one place an operator reads them.
"""

from __future__ import annotations

import copy
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "SIMZMQ_"


class ConfigError(Exception):
    pass


def default_config_path() -> Path:
    """conf/simzmq.toml beside the package (a source checkout or editable
    install), else the copy setup.py installs under sys.prefix."""
    here = Path(__file__).resolve().parent.parent / "conf" / "simzmq.toml"
    if here.is_file():
        return here
    installed = Path(sys.prefix) / "share" / "simzmq" / "simzmq.toml"
    if installed.is_file():
        return installed
    raise ConfigError("cannot find the default configuration conf/simzmq.toml")


class Config:
    """A loaded configuration: `cfg["gate"]["port"]`, plus where it came from."""

    def __init__(self, data: dict, sources: list[str]):
        self.data = data
        self.sources = sources

    def __getitem__(self, section: str) -> Any:
        return self.data[section]

    @property
    def data_dir(self) -> Path:
        return Path(self.data["region"]["data"]).resolve()

    def describe(self) -> str:
        return " + ".join(self.sources)


def _coerce(current: Any, text: str, name: str) -> Any:
    """Parse an environment value to the type of the default it replaces."""
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, list):
            return [part.strip() for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected {type(current).__name__}") from None
    return text


def _apply_env(data: dict, env: Mapping[str, str], path: tuple[str, ...] = ()) -> list[str]:
    applied = []
    for key, value in data.items():
        here = path + (key,)
        if isinstance(value, dict):
            applied += _apply_env(value, env, here)
            continue
        name = ENV_PREFIX + "_".join(here).upper()
        if name in env:
            data[key] = _coerce(value, env[name], name)
            applied.append(name)
    return applied


def _merge(base: dict, override: dict, path: str = "") -> None:
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown configuration key {where}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table")
            _merge(base[key], value, where + ".")
        else:
            base[key] = value


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Defaults, then the file at `path` (if given; it may set any subset of
    keys), then SIMZMQ_* variables, then `overrides` (from flags)."""
    default_path = default_config_path()
    with open(default_path, "rb") as f:
        data = tomllib.load(f)
    sources = [str(default_path)]
    if path is not None and Path(path).resolve() != default_path:
        try:
            with open(path, "rb") as f:
                _merge(data, tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        sources.append(str(path))
    applied = _apply_env(data, os.environ if env is None else env)
    if applied:
        sources.append("env " + ",".join(applied))
    if overrides:
        clean = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()}
        clean = {s: kv for s, kv in clean.items() if kv}
        if clean:
            _merge(data, copy.deepcopy(clean))
            sources.append("flags " + ",".join(f"{s}.{k}" for s, kv in clean.items() for k in kv))
    return Config(data, sources)


def env_for(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The SIMZMQ_* variables that carry `overrides` to a child process."""
    out = {}
    for section, values in overrides.items():
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, list):
                value = ",".join(value)
            out[ENV_PREFIX + f"{section}_{key}".replace(".", "_").upper()] = str(value)
    return out
