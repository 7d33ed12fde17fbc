import dataclasses
import tomllib
from pathlib import Path

import pytest

from simzmq import config


def problems_of(**kwargs) -> list[str]:
    kwargs.setdefault("env", {})
    with pytest.raises(config.ConfigError) as err:
        config.load(**kwargs)
    return err.value.problems


def toml_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return problems_of(path=path)


def test_defaults_come_from_the_commented_file_as_typed_frozen_sections():
    cfg = config.load(env={})
    assert cfg.gate.port == 7700 and cfg.gate.max_body == 65536 and cfg.gate.allow_register is True
    assert cfg.broker.primary.frontend == "tcp://127.0.0.1:7721" and cfg.broker.keyed_services == ("im",)
    assert cfg.gate.limits.trusted_addresses == ("127.0.0.1", "::1") and cfg.gate.limits.sends_per_s == 20.0
    assert cfg.im.sqlite_synchronous == "FULL" and cfg.region.port_base == 7700
    assert cfg.sources == (str(config.default_config_path()),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gate.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg["gate"]  # type: ignore[index] -- sections are attributes, not string keys


def test_environment_overrides_with_types():
    env = {"SIMZMQ_GATE_PORT": "9000", "SIMZMQ_GATE_ALLOW_REGISTER": "false",
           "SIMZMQ_BROKER_PRIMARY_FRONTEND": "tcp://10.0.0.1:1", "SIMZMQ_BROKER_KEYED_SERVICES": "im, echo",
           "SIMZMQ_GATE_LIMITS_SENDS_PER_S": "7", "SIMZMQ_IM_SQLITE_SYNCHRONOUS": "normal",
           "SIMZMQ_GATE_HANDSHAKE_TIMEOUT_S": "2.5", "SIMZMQ_GATE_IDLE_TIMEOUT_S": "2"}
    cfg = config.load(env=env)
    assert cfg.gate.port == 9000 and cfg.gate.allow_register is False
    assert cfg.broker.primary.frontend == "tcp://10.0.0.1:1"
    assert cfg.broker.keyed_services == ("im", "echo")
    assert cfg.gate.limits.sends_per_s == 7.0 and cfg.im.sqlite_synchronous == "NORMAL"
    assert cfg.gate.handshake_timeout_s == 2.5
    assert cfg.gate.idle_timeout_s == 2 and isinstance(cfg.gate.idle_timeout_s, int)  # goes on the wire
    assert "env" in cfg.describe()


# Every kind of bad value, as an operator would type it in the environment.
BAD_ENVIRONMENT = [
    ("SIMZMQ_GATE_PORT", "99999", "gate.port = 99999 (from SIMZMQ_GATE_PORT): must be a port 1-65535"),
    ("SIMZMQ_GATE_PORT", "0", "must be a port 1-65535"),
    ("SIMZMQ_GATE_PORT", "seven", "SIMZMQ_GATE_PORT='seven': gate.port must be a port 1-65535"),
    ("SIMZMQ_GATE_GATES", "-1", "gate.gates = -1 (from SIMZMQ_GATE_GATES): must be an integer 1-100"),
    ("SIMZMQ_IM_WORKERS", "0", "im.workers = 0 (from SIMZMQ_IM_WORKERS): must be an integer 1-100"),
    ("SIMZMQ_IM_WORKERS", "1.5", "im.workers must be an integer 1-100"),
    ("SIMZMQ_IM_STORE", "mysql", "im.store = 'mysql' (from SIMZMQ_IM_STORE): must be sqlite"),
    ("SIMZMQ_IM_STORE", "sqlite://host/x", "im.store"),
    ("SIMZMQ_IM_STORE", "postgresql://h:notaport/db", "the port is not a number"),
    ("SIMZMQ_IM_SQLITE_SYNCHRONOUS", "SOMETIMES", "must be one of OFF, NORMAL, FULL, EXTRA"),
    ("SIMZMQ_IM_PWHASH_STRENGTH", "strong", "must be one of interactive, moderate, sensitive"),
    ("SIMZMQ_IM_PWHASH_NICE", "20", "im.pwhash_nice = 20 (from SIMZMQ_IM_PWHASH_NICE): must be an integer 0-19"),
    ("SIMZMQ_IM_METRICS_PORT", "-1", "must be a port 1-65535 (0: off)"),
    ("SIMZMQ_IM_SQLITE_PATH", " ", "im.sqlite_path = ' ' (from SIMZMQ_IM_SQLITE_PATH): must be a non-empty string"),
    ("SIMZMQ_GATE_ALLOW_REGISTER", "maybe", "gate.allow_register must be true or false"),
    ("SIMZMQ_GATE_HANDSHAKE_TIMEOUT_S", "0", "gate.handshake_timeout_s = 0.0 (from SIMZMQ_GATE_HANDSHAKE_TIMEOUT_S): must be a number > 0"),
    ("SIMZMQ_GATE_HANDSHAKE_TIMEOUT_S", "nan", "must be a number > 0"),
    ("SIMZMQ_GATE_HANDSHAKE_TIMEOUT_S", "soon", "gate.handshake_timeout_s must be a number > 0"),
    ("SIMZMQ_GATE_IDLE_TIMEOUT_S", "2.5", "gate.idle_timeout_s must be an integer 1-4294967295"),
    ("SIMZMQ_GATE_HOST", "not a host", "gate.host = 'not a host' (from SIMZMQ_GATE_HOST): must be an IP address"),
    ("SIMZMQ_GATE_HOST", "300.1.1.1", "must be an IP address or host name"),
    ("SIMZMQ_BROKER_PRIMARY_FRONTEND", "tcp://127.0.0.1", "the port must be 1-65535"),
    ("SIMZMQ_BROKER_PRIMARY_FRONTEND", "tcp://127.0.0.1:70000", "the port must be 1-65535"),
    ("SIMZMQ_BROKER_PRIMARY_FRONTEND", "udp://127.0.0.1:7701", "must be tcp://HOST:PORT or ipc://PATH"),
    ("SIMZMQ_BROKER_PRIMARY_FRONTEND", "127.0.0.1:7701", "must be tcp://HOST:PORT or ipc://PATH"),
    ("SIMZMQ_BROKER_PRIMARY_FRONTEND", "tcp://bad host:7701", "is not an IP address or host name"),
    ("SIMZMQ_BROKER_PRIMARY_FRONTEND", "ipc://", "the ipc path is empty"),
    ("SIMZMQ_BROKER_LIVENESS", "0", "broker.liveness = 0 (from SIMZMQ_BROKER_LIVENESS): must be an integer >= 1"),
    ("SIMZMQ_BROKER_KEYED_SERVICES", "", None),  # an empty list is allowed: no keyed service
    ("SIMZMQ_GATE_LIMITS_SENDS_PER_S", "-1", "gate.limits.sends_per_s = -1.0 (from SIMZMQ_GATE_LIMITS_SENDS_PER_S): must be a number >= 0"),
    ("SIMZMQ_GATE_LIMITS_SENDS_BURST", "2.5", "gate.limits.sends_burst must be an integer >= 0"),
    ("SIMZMQ_GATE_LIMITS_TRUSTED_ADDRESSES", "10.0.0.0/33", "10.0.0.0/33"),
    ("SIMZMQ_REGION_PORT_BASE", "0", "region.port_base = 0 (from SIMZMQ_REGION_PORT_BASE): must be an integer 1-65535"),
    ("SIMZMQ_REGION_PORT_BASE", "65500", "region.port_base = 65500 (from SIMZMQ_REGION_PORT_BASE) moves "
     "gate.http_port from 7780 to 65580, and 4 more ports, outside 1-65535"),
]


@pytest.mark.parametrize("name,value,expected", BAD_ENVIRONMENT)
def test_every_kind_of_bad_environment_value_is_one_clear_line(name, value, expected):
    if expected is None:
        config.load(env={name: value})
        return
    problems = problems_of(env={name: value})
    assert any(expected in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_unknown_variables_are_errors_with_a_hint_and_other_tools_variables_are_not():
    problems = problems_of(env={"SIMZMQ_GATE_PROT": "7000", "SIMZMQ_IM_WORKER": "2", "SIMZMQ_NOTHING_LIKE_IT": "1"})
    assert "unknown environment variable SIMZMQ_GATE_PROT (did you mean SIMZMQ_GATE_PORT?)" in problems
    assert "unknown environment variable SIMZMQ_IM_WORKER (did you mean SIMZMQ_IM_WORKERS?)" in problems
    assert "unknown environment variable SIMZMQ_NOTHING_LIKE_IT" in problems
    # SIMZMQ_CONFIG names the file; the test tools' knobs are not configuration.
    config.load(env={"SIMZMQ_CONFIG": "x.toml", "SIMZMQ_TEST_PG_DSN": "postgresql://x/y", "PATH": "/bin"})


def test_every_problem_is_reported_at_once():
    problems = problems_of(env={"SIMZMQ_GATE_PORT": "99999", "SIMZMQ_IM_STORE": "mysql", "SIMZMQ_GATE_PROT": "1"},
                           overrides={"im": {"workers": 0}, "gate": {"gates": -1}},
                           flag_names={"im.workers": "--workers", "gate.gates": "--gates"})
    assert len(problems) == 5, problems
    assert "im.workers = 0 (from --workers): must be an integer 1-100" in problems
    assert "gate.gates = -1 (from --gates): must be an integer 1-100" in problems


@pytest.mark.parametrize("text,expected", [
    ("[gate]\nprot = 8000\n", "unknown key gate.prot (did you mean gate.port?)"),
    ("[gaet]\nport = 8000\n", "unknown key gaet (did you mean gate?)"),
    ("[gate.limits]\nsend_per_s = 1.0\n", "unknown key gate.limits.send_per_s (did you mean gate.limits.sends_per_s?)"),
    ("[broker.primery]\nfrontend = 'tcp://127.0.0.1:1'\n", "unknown key broker.primery (did you mean broker.primary?)"),
    ("gate = 1\n", "gate must be a table [gate]"),
    ("[gate.port]\nx = 1\n", "gate.port must be a value, not a table"),
    ("[gate]\nport = '8000'\n", "gate.port = '8000' (from {path}): must be a port 1-65535"),
    ("[gate]\nport = 8000.0\n", "must be a port 1-65535"),
    ("[gate]\nport = true\n", "must be a port 1-65535"),
    ("[gate]\nallow_register = 'yes'\n", "gate.allow_register = 'yes' (from {path}): must be true or false"),
    ("[gate]\nhost = 127\n", "must be an IP address or host name"),
    ("[broker]\nkeyed_services = 'im'\n", "broker.keyed_services = 'im' (from {path}): must be a list of strings"),
    ("[broker]\nkeyed_services = ['im', '']\n", "must be a list of non-empty strings"),
    ("[im]\nstore = 5\n", "im.store = 5"),
    ("[gate.limits]\nrequests_burst = -3\n", "gate.limits.requests_burst = -3 (from {path}): must be an integer >= 0"),
    ("[gate.limits]\ntrusted_addresses = 'x'\n", "must be a list of strings"),
    ("[gate.limits]\nabuse_ban_s = 100.0\nabuse_ban_max_s = 10.0\n", "abuse_ban_max_s must be at least abuse_ban_s"),
])
def test_bad_toml_values_and_keys(tmp_path, text, expected):
    problems = toml_problems(tmp_path, text)
    expected = expected.replace("{path}", str(tmp_path / "site.toml"))
    assert any(expected in p for p in problems), problems


def test_a_file_that_is_not_toml_is_one_line(tmp_path):
    problems = toml_problems(tmp_path, "[gate\n")
    assert len(problems) == 1 and problems[0].startswith(f"cannot read {tmp_path / 'site.toml'}")


def test_file_then_environment_then_flags(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text('[gate]\nport = 8000\n[im]\nworkers = 3\n')
    cfg = config.load(f, env={})
    assert cfg.gate.port == 8000 and cfg.im.workers == 3 and cfg.gate.http_port == 7780
    cfg = config.load(f, env={"SIMZMQ_GATE_PORT": "9000"}, overrides={"gate": {"port": 9100, "gates": None}})
    assert cfg.gate.port == 9100 and cfg.gate.gates == 1 and cfg.im.workers == 3


def test_flags_travel_to_children_as_environment():
    env = config.env_for({"gate": {"port": 9100, "allow_register": False}, "im": {"workers": None},
                          "broker": {"keyed_services": ["im", "x"]}})
    assert env == {"SIMZMQ_GATE_PORT": "9100", "SIMZMQ_GATE_ALLOW_REGISTER": "false",
                   "SIMZMQ_BROKER_KEYED_SERVICES": "im,x"}
    cfg = config.load(env=env)
    assert cfg.gate.allow_register is False and cfg.broker.keyed_services == ("im", "x")


def test_port_base_shifts_every_port_of_the_region_together():
    cfg = config.load(env={"SIMZMQ_IM_METRICS_PORT": "0",
                           "SIMZMQ_BROKER_BACKUP_NOTIFY_IN": "ipc:///tmp/simzmq-notify-in"},
                      overrides={"region": {"port_base": 9700}})
    assert (cfg.gate.port, cfg.gate.http_port) == (9700, 9780)
    assert cfg.broker.primary.frontend == "tcp://127.0.0.1:9721" and cfg.broker.primary.state == "tcp://127.0.0.1:9725"
    assert cfg.broker.backup.frontend == "tcp://127.0.0.1:9731" and cfg.broker.backup.state == "tcp://127.0.0.1:9735"
    assert (cfg.broker.primary.metrics_port, cfg.broker.backup.metrics_port) == (9741, 9742)
    assert cfg.broker.backup.notify_in == "ipc:///tmp/simzmq-notify-in"  # not a port
    assert cfg.im.metrics_port == 0  # off stays off
    default = {(lst.what, lst.process): lst.port for lst in config.region_listeners(config.load(env={}))}
    shifted = {(lst.what, lst.process): lst.port
               for lst in config.region_listeners(config.load(env={}, overrides={"region": {"port_base": 9700}}))}
    assert shifted == {k: v + 2000 for k, v in default.items()}
    ipv6 = config.load(env={"SIMZMQ_BROKER_PRIMARY_FRONTEND": "tcp://[::1]:7701", "SIMZMQ_REGION_PORT_BASE": "7800"})
    assert ipv6.broker.primary.frontend == "tcp://[::1]:7801"


@pytest.mark.parametrize("env,expected", [
    ({"SIMZMQ_GATE_MAX_BODY": "2000000"}, "gate.max_body (2000000) must not exceed gate.max_frame (1048576)"),
    ({"SIMZMQ_GATE_FAILOVER_AFTER_MS": "100"}, "gate.failover_after_ms (100) must be more than gate.probe_interval_ms"),
    ({"SIMZMQ_GATE_TLS_CERT": "/nonexistent/cert.pem"}, "gate.tls_cert and gate.tls_key go together"),
    ({"SIMZMQ_BROKER_REQUEST_TIMEOUT_MS": "5000"}, "broker.request_timeout_ms (5000) must be below gate.request_timeout_s"),
    ({"SIMZMQ_BROKER_BACKUP_FRONTEND": "tcp://127.0.0.1:7721"},
     "broker.backup.frontend = 'tcp://127.0.0.1:7721' is also broker.primary.frontend"),
])
def test_settings_that_contradict_each_other(env, expected):
    problems = problems_of(env=env)
    assert any(expected in p for p in problems), problems


def test_store_urls():
    for good in ("sqlite", "sqlite:////var/lib/simzmq/im.db", "postgresql://simzmq@10.0.0.41/simzmq",
                 "postgres://u:p@db:5432/x", "postgresql:///simzmq"):
        assert config.load(env={"SIMZMQ_IM_STORE": good}).im.store == good
    for bad in ("mysql", "sqlite:", "sqlite:///", "im.db", "postgresql:/x", "redis://x"):
        assert any("im.store" in p for p in problems_of(env={"SIMZMQ_IM_STORE": bad})), bad
    cfg = config.load(env={"SIMZMQ_REGION_DATA": "/srv/simzmq"})
    assert cfg.store_url() == "sqlite:////srv/simzmq/im.db"
    assert config.load(env={"SIMZMQ_IM_STORE": "postgresql://h/d"}).store_url() == "postgresql://h/d"


def test_endpoints_and_hosts_that_are_fine():
    env = {"SIMZMQ_BROKER_PRIMARY_FRONTEND": "tcp://*:7701", "SIMZMQ_BROKER_PRIMARY_BACKEND": "ipc:///run/simzmq/be",
           "SIMZMQ_BROKER_PRIMARY_NOTIFY_IN": "tcp://broker-1.example.net:7703",
           "SIMZMQ_GATE_HOST": "0.0.0.0", "SIMZMQ_REGION_METRICS_HOST": "::"}
    cfg = config.load(env=env)
    assert cfg.broker.primary.frontend == "tcp://*:7701" and cfg.gate.host == "0.0.0.0"


def test_the_default_layout_has_room_for_21_gates_and_20_workers_on_any_port_base():
    for base in (7700, 12000):
        for gates in range(1, 22):
            cfg = config.load(env={}, overrides={"region": {"port_base": base}, "gate": {"gates": gates},
                                                 "im": {"workers": 20}})
            assert config.local_problems(cfg) == [], (base, gates)


def test_ports_a_local_region_would_use_twice():
    many = config.load(env={}, overrides={"gate": {"gates": 22}})
    assert config.port_clashes(config.region_listeners(many)) == [
        "port 7721 is both broker-primary frontend and gate-22 client port",
        "port 7801 is both im-1 metrics and gate-22 http port"]
    assert config.port_clashes(config.region_listeners(config.load(env={}))) == []
    wildcard = config.load(env={"SIMZMQ_GATE_HOST": "0.0.0.0", "SIMZMQ_GATE_PORT": "7741"})
    assert config.port_clashes(config.region_listeners(wildcard)) == [
        "port 7741 is both broker-primary metrics and gate-1 client port"]
    # However many ports clash, `up` says so in one line.
    (line,) = config.local_problems(config.load(env={}, overrides={"gate": {"gates": 40}}))
    assert line.startswith("port 7721 is both broker-primary frontend and gate-22 client port, and 10 more ports "
                           "used twice (gate-N listens on gate.port + N - 1"), line


def test_a_local_region_needs_the_gate_tls_files_here(tmp_path):
    cert, key = tmp_path / "gate.crt", tmp_path / "gate.key"
    cert.write_text("x")
    cfg = config.load(env={"SIMZMQ_GATE_TLS_CERT": str(cert), "SIMZMQ_GATE_TLS_KEY": str(key)})
    assert config.local_problems(cfg) == [f"gate.tls_key = {str(key)!r}: no readable file there"]


def test_the_multi_machine_example_is_valid():
    example = config.default_config_path().parent / "multi-machine.example.toml"
    cfg = config.load(example, env={})
    assert cfg.broker.backup.frontend == "tcp://10.0.0.12:7721"
    assert cfg.im.store.startswith("postgresql://") and cfg.gate.allow_register is False


def test_the_file_declares_exactly_the_known_keys():
    with open(config.default_config_path(), "rb") as f:
        data = tomllib.load(f)

    def keys(table, prefix=""):
        for key, value in table.items():
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield prefix + key
    assert sorted(keys(data)) == sorted(config.SCHEMA)


def test_every_key_is_in_the_configuration_reference():
    """docs/configuration.md names every key of conf/simzmq.toml (a new key
    without documentation fails here)."""
    path = config.default_config_path()
    doc = (path.parent.parent / "docs" / "configuration.md").read_text()
    missing = sorted({k.rsplit(".", 1)[1] for k in config.SCHEMA if f"`{k.rsplit('.', 1)[1]}`" not in doc})
    assert missing == []


def test_the_push_section_is_checked_as_a_whole():
    cfg = config.load(env={})
    assert not cfg.push.enabled and cfg.push.job_delay_ms == cfg.push.delay_ms
    on = config.load(env={"SIMZMQ_PUSH_WEBHOOK": "https://app.example.com/hook", "SIMZMQ_PUSH_SECRET": "s",
                          "SIMZMQ_PUSH_COALESCE_MS": "500"})
    assert on.push.enabled and on.push.job_delay_ms == on.push.delay_ms + 500
    assert config.load(env={"SIMZMQ_PUSH_WEBHOOK": "http://127.0.0.1:9/h", "SIMZMQ_PUSH_SECRET": "s"}).push.enabled
    with pytest.raises(config.ConfigError) as exc:
        config.load(env={"SIMZMQ_PUSH_WEBHOOK": "http://app.example.com/hook"})
    assert exc.value.problems == [
        "push.webhook = 'http://app.example.com/hook' (from SIMZMQ_PUSH_WEBHOOK): must be https:// (plain http is "
        "allowed to a loopback address only)"]
    with pytest.raises(config.ConfigError) as exc:
        config.load(env={"SIMZMQ_PUSH_WEBHOOK": "https://app.example.com/hook", "SIMZMQ_PUSH_BACKOFF_MIN_MS": "9",
                         "SIMZMQ_PUSH_BACKOFF_MAX_MS": "8", "SIMZMQ_PUSH_LEASE_S": "20"})
    assert exc.value.problems == [
        "push.secret must be set when push.webhook is (the calls are signed with it): --webhook-secret S, "
        "or SIMZMQ_PUSH_SECRET",
        "push.backoff_min_ms (9) must not exceed push.backoff_max_ms (8)",
        "push.lease_s (20) must be more than twice push.timeout_s (10.0), so a claim outlives a call that times out",
    ]
