import pytest

from simzmq import config


def test_defaults_come_from_the_commented_file():
    cfg = config.load(env={})
    assert cfg["gate"]["port"] == 7700 and cfg["gate"]["max_body"] == 65536
    assert cfg["broker"]["primary"]["frontend"].startswith("tcp://")
    assert cfg.sources == [str(config.default_config_path())]


def test_environment_overrides_with_types():
    env = {"SIMZMQ_GATE_PORT": "9000", "SIMZMQ_GATE_ALLOW_REGISTER": "false",
           "SIMZMQ_BROKER_PRIMARY_FRONTEND": "tcp://10.0.0.1:1", "SIMZMQ_BROKER_KEYED_SERVICES": "im, echo"}
    cfg = config.load(env=env)
    assert cfg["gate"]["port"] == 9000 and cfg["gate"]["allow_register"] is False
    assert cfg["broker"]["primary"]["frontend"] == "tcp://10.0.0.1:1"
    assert cfg["broker"]["keyed_services"] == ["im", "echo"]
    assert "env" in cfg.describe()


def test_bad_environment_value_is_a_clear_error():
    with pytest.raises(config.ConfigError, match="SIMZMQ_GATE_PORT"):
        config.load(env={"SIMZMQ_GATE_PORT": "seven"})


def test_file_overrides_and_unknown_keys(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text('[gate]\nport = 8000\n[im]\nworkers = 3\n')
    cfg = config.load(f, env={})
    assert cfg["gate"]["port"] == 8000 and cfg["im"]["workers"] == 3 and cfg["gate"]["http_port"] == 7780
    bad = tmp_path / "bad.toml"
    bad.write_text('[gate]\nprot = 8000\n')
    with pytest.raises(config.ConfigError, match="unknown configuration key gate.prot"):
        config.load(bad, env={})
    broken = tmp_path / "broken.toml"
    broken.write_text('[gate\n')
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(broken, env={})


def test_flags_beat_environment_and_travel_to_children():
    cfg = config.load(env={"SIMZMQ_GATE_PORT": "9000"}, overrides={"gate": {"port": 9100, "gates": None}})
    assert cfg["gate"]["port"] == 9100 and cfg["gate"]["gates"] == 1
    env = config.env_for({"gate": {"port": 9100, "allow_register": False}, "im": {"workers": None}})
    assert env == {"SIMZMQ_GATE_PORT": "9100", "SIMZMQ_GATE_ALLOW_REGISTER": "false"}
    assert config.load(env=env)["gate"]["allow_register"] is False


def test_the_multi_machine_example_is_valid():
    example = config.default_config_path().parent / "multi-machine.example.toml"
    cfg = config.load(example, env={})
    assert cfg["broker"]["backup"]["frontend"] == "tcp://10.0.0.12:7701"
    assert cfg["im"]["store"].startswith("postgresql://") and cfg["gate"]["allow_register"] is False


def test_every_key_is_in_the_configuration_reference():
    """docs/configuration.md names every key of conf/simzmq.toml (a new key
    without documentation fails here)."""
    import tomllib
    path = config.default_config_path()
    doc = (path.parent.parent / "docs" / "configuration.md").read_text()
    with open(path, "rb") as f:
        data = tomllib.load(f)

    def keys(table):
        for key, value in table.items():
            if isinstance(value, dict):
                yield from keys(value)
            else:
                yield key
    missing = sorted({k for k in keys(data) if f"`{k}`" not in doc})
    assert missing == []
