"""The region's configuration, checked and typed, for tests that build a
process's objects in their own process (a Gate, a Broker, an IMWorker)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from simzmq import config


def defaults(data_dir: Path | None = None) -> config.Config:
    """conf/simzmq.toml as it is, with nothing from this process's environment
    (and region.data at `data_dir`, if given)."""
    return config.load(env={}, overrides={"region": {"data": str(data_dir) if data_dir else None}})


def with_brokers(cfg: config.Config, primary: dict, backup: dict | None = None, **settings) -> config.Config:
    """`cfg` with the broker endpoints in `primary` and `backup` (the keys of
    [broker.primary]; a role without one has empty endpoints: nothing binds
    or connects there) and the [broker] `settings` changed."""
    def role(endpoints: dict | None) -> config.BrokerEndpointsConfig:
        fields = {"frontend": "", "backend": "", "notify_in": "", "notify_out": "", "state": "", "metrics_port": 0}
        return config.BrokerEndpointsConfig(**{**fields, **(endpoints or {})})
    broker = dataclasses.replace(cfg.broker, primary=role(primary), backup=role(backup), **settings)
    return dataclasses.replace(cfg, broker=broker)
