"""The `simzmq` command: run a region or one of its processes, manage users and
keys, chat, monitor and benchmark."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from simzmq import config as config_mod
from simzmq import keys as keys_mod

log = logging.getLogger("simzmq.up")

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
# A child that dies is restarted after this delay, doubled on each quick
# death up to the maximum, so a crash loop does not spin the CPU.
RESTART_DELAY_S = 0.2
RESTART_DELAY_MAX_S = 5.0
# A child that ran this long before dying counts as healthy: its delay resets.
HEALTHY_RUN_S = 10.0
STOP_GRACE_S = 5.0


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)


def load_config(ctx: click.Context, overrides=None) -> config_mod.Config:
    try:
        return config_mod.load(ctx.obj.get("config_path"), overrides=overrides)
    except config_mod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def bus_client(cfg: config_mod.Config, role: str, process: str):
    """``configure_socket`` for a process connecting to the brokers as ROLE,
    or None when [bus] curve is off."""
    from simzmq import bus as bus_mod
    if not cfg["bus"]["curve"]:
        bus_mod.curve_off_warning(process)
        return None
    try:
        return bus_mod.client_configurator(bus_mod.load_keys(cfg.data_dir, role))
    except keys_mod.KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


def data_option(f):
    return click.option("--data", "data", type=click.Path(file_okay=False), default=None,
                        help="Data directory (default: region.data from the config).")(f)


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), envvar="SIMZMQ_CONFIG",
              default=None, help="A TOML file overriding conf/simzmq.toml (env SIMZMQ_CONFIG).")
@click.pass_context
def main(ctx, config_path):
    """simzmq: an instant-messaging back end on a ZeroMQ message bus."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


# ---------------------------------------------------------------------------
# simzmq up: the supervisor of a whole local region.
# ---------------------------------------------------------------------------

class Child:
    def __init__(self, name: str, argv: list[str], env: dict, run_dir: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.pid_file = run_dir / f"{name}.pid"
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.delay = RESTART_DELAY_S
        self.restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        self.restart_at = None
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{self.proc.pid}\n")
        os.replace(tmp, self.pid_file)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def check(self, now: float) -> None:
        """Notice a death and schedule or perform the restart."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            ran = now - self.started
            self.delay = RESTART_DELAY_S if ran > HEALTHY_RUN_S else min(self.delay * 2, RESTART_DELAY_MAX_S)
            log.warning("%s (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                        self.name, self.proc.pid, code, ran, self.delay)
            self.proc = None
            self.restart_at = now + self.delay
        if self.proc is None and self.restart_at is not None and now >= self.restart_at:
            self.start()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", self.name)
            self.proc.kill()
            self.proc.wait()
        self.pid_file.unlink(missing_ok=True)


def live_pid_files(run_dir: Path) -> list[str]:
    """Names whose pid file points at a live process (stale files are removed)."""
    live = []
    for path in sorted(run_dir.glob("*.pid")):
        try:
            os.kill(int(path.read_text().strip()), 0)
        except (ValueError, ProcessLookupError):
            path.unlink(missing_ok=True)
            continue
        except PermissionError:
            pass
        live.append(path.stem)
    return live


def raise_fd_limit() -> int:
    """Many connections need many descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@main.command()
@data_option
@click.option("--gate-port", type=int, default=None, help="Client TCP port of the first gate.")
@click.option("--http-port", type=int, default=None, help="HTTP port of the first gate.")
@click.option("--workers", type=int, default=None, help="How many IM workers.")
@click.option("--gates", type=int, default=None, help="How many gates.")
@click.option("--open-registration/--closed-registration", default=None,
              help="Whether clients may Register (default: gate.allow_register).")
@click.pass_context
def up(ctx, data, gate_port, http_port, workers, gates, open_registration):
    """Start a whole region as supervised processes: broker, IM workers, gates."""
    setup_logging()
    overrides = {"region": {"data": str(Path(data).resolve()) if data else None},
                 "gate": {"port": gate_port, "http_port": http_port, "gates": gates,
                          "allow_register": open_registration},
                 "im": {"workers": workers}}
    cfg = load_config(ctx, overrides)
    data_dir = cfg.data_dir
    run_dir = data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    running = live_pid_files(run_dir)
    if running:
        raise click.ClickException(f"a region is already running on {data_dir}: {', '.join(running)}")
    # The key exists before any gate accepts a connection, so a client that
    # reads keys/gate.pub right after `up` printed it can pin it.
    _, gate_pk = keys_mod.ensure_gate_key(data_dir)
    # The bus keys too, so every child finds its role's key at start.
    try:
        keys_mod.ensure_bus_keys(data_dir)
    except keys_mod.KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    if not cfg["bus"]["curve"]:
        from simzmq.bus import curve_off_warning
        curve_off_warning("region")
    fds = raise_fd_limit()
    env = dict(os.environ)
    env.update(config_mod.env_for(overrides))
    env["SIMZMQ_REGION_DATA"] = str(data_dir)
    if ctx.obj.get("config_path"):
        env["SIMZMQ_CONFIG"] = str(Path(ctx.obj["config_path"]).resolve())
    base = [sys.executable, "-m", "simzmq"]
    children = [Child(f"broker-{role}", base + ["broker", "--role", role], env, run_dir)
                for role in ("primary", "backup")]
    for i in range(1, cfg["im"]["workers"] + 1):
        children.append(Child(f"im-{i}", base + ["im", "--name", f"im-{i}"], env, run_dir))
    g = cfg["gate"]
    for i in range(1, g["gates"] + 1):
        children.append(Child(f"gate-{i}", base + ["gate", "--name", f"gate-{i}", "--port", str(g["port"] + i - 1),
                                                  "--http-port", str(g["http_port"] + i - 1)], env, run_dir))
    log.info("region starting: data %s, config %s, fd limit %d", data_dir, cfg.describe(), fds)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    for child in children:
        child.start()
    # The command as this installation names it (bin/run users have no
    # activated virtualenv, so a bare `simzmq` may not be on their PATH).
    me = Path(sys.executable).parent / "simzmq"
    cmd = str(me) if me.exists() else "simzmq"
    click.echo(
        f"\nsimzmq region up. Clients connect to {g['host']}:{g['port']} and pin the gate key\n"
        f"  {gate_pk.hex()}   (in {data_dir / 'keys' / 'gate.pub'})\n"
        f"HTTP (health, history, metrics): http://{g['http_host']}:{g['http_port']}/v1/health\n"
        f"Talk:   {cmd} chat --data {data_dir} --user alice --register\n"
        f"        {cmd} chat --data {data_dir} --user bob --register   (in another terminal)\n"
        f"Watch:  {cmd} monitor --data {data_dir}\n"
        f"Stop:   Ctrl-C\n", err=True)
    try:
        while not stopping:
            now = time.monotonic()
            for child in children:
                child.check(now)
            time.sleep(0.1)
    finally:
        log.info("region stopping")
        # Gates first (clients get Kick{shutdown}), then workers, then brokers.
        for group in (("gate-",), ("im-",), ("broker-",)):
            members = [c for c in children if c.name.startswith(group)]
            for c in members:
                c.restart_at = None
                c.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for c in members:
                c.wait(deadline)
        log.info("region stopped")


# ---------------------------------------------------------------------------
# One process of a region.
# ---------------------------------------------------------------------------

@main.command()
@click.option("--role", type=click.Choice(["primary", "backup"]), default="primary")
@click.pass_context
def broker(ctx, role):
    """Run one broker of the region's pair."""
    setup_logging()
    cfg = load_config(ctx)
    from simzmq.broker import Broker
    b = cfg["broker"]
    mine = b[role]
    peer = b["backup" if role == "primary" else "primary"]
    logging.getLogger("simzmq.broker").info("broker %s: config %s", role, cfg.describe())
    import zmq
    from simzmq import bus as bus_mod
    context = zmq.Context.instance()
    bus = None
    if cfg["bus"]["curve"]:
        # The ZAP handler must answer before the first socket binds, or
        # libzmq would let CURVE clients in without asking.
        try:
            bus = bus_mod.start_broker_bus(context, cfg.data_dir)
        except keys_mod.KeyFileError as exc:
            raise click.ClickException(str(exc)) from None
        # SIGHUP re-reads the allow-lists (DATA/keys/bus/allow/ROLE/*.key).
        signal.signal(signal.SIGHUP, lambda *_: bus_mod.reload_policy(bus.zap, cfg.data_dir))
    else:
        bus_mod.curve_off_warning(f"broker {role}")
    try:
        Broker(frontend=mine["frontend"], backend=mine["backend"], notify_in=mine["notify_in"],
               notify_out=mine["notify_out"], state_pub=mine["state"], peer_state=peer["state"],
               role=role, heartbeat_interval=b["heartbeat_ms"] / 1000,
               peer_heartbeat=b["peer_heartbeat_ms"] / 1000,
               liveness=b["liveness"], request_timeout=b["request_timeout_ms"] / 1000,
               keyed_services=set(b["keyed_services"]),
               metrics_port=mine["metrics_port"], metrics_addr=cfg["region"]["metrics_host"],
               context=context, configure_socket=bus.configure_socket if bus else None,
               auth_counts=bus.zap.counts if bus else None).run()
    finally:
        if bus is not None:
            bus.zap.stop()


def store_url(cfg) -> str:
    store = cfg["im"]["store"]
    if store == "sqlite":
        return "sqlite:///" + str(cfg.data_dir / cfg["im"]["sqlite_path"])
    return store


@main.command()
@click.option("--name", default="im-1", help="Process name: im-N serves metrics on im.metrics_port + N - 1.")
@click.pass_context
def im(ctx, name):
    """Run one IM worker."""
    setup_logging()
    cfg = load_config(ctx)
    from simzmq import im as im_mod
    b = cfg["broker"]
    index = int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else 1
    logging.getLogger("simzmq.im").info("im worker %s: config %s", name, cfg.describe())
    configure_socket = bus_client(cfg, "worker", f"im worker {name}")
    worker = im_mod.IMWorker(
        name=name, store_url=store_url(cfg), im_cfg=cfg["im"], max_frame=cfg["gate"]["max_frame"],
        backends=[b["primary"]["backend"], b["backup"]["backend"]],
        notify_ins=[b["primary"]["notify_in"], b["backup"]["notify_in"]],
        heartbeat_ms=b["heartbeat_ms"], liveness=b["liveness"],
        metrics_port=cfg["im"]["metrics_port"] + index - 1 if cfg["im"]["metrics_port"] else None,
        metrics_host=cfg["region"]["metrics_host"],
        sqlite_synchronous=cfg["im"]["sqlite_synchronous"], configure_socket=configure_socket)
    im_mod.run(worker)


@main.command()
@click.option("--name", default="gate-1")
@click.option("--port", type=int, default=None, help="Client TCP port (default gate.port).")
@click.option("--http-port", type=int, default=None, help="HTTP port (default gate.http_port).")
@click.pass_context
def gate(ctx, name, port, http_port):
    """Run one gate."""
    setup_logging()
    cfg = load_config(ctx)
    from simzmq import gate as gate_mod
    g = cfg["gate"]
    b = cfg["broker"]
    sk, pk = keys_mod.ensure_gate_key(cfg.data_dir)
    logging.getLogger("simzmq.gate").info("gate %s: config %s, key %s", name, cfg.describe(), pk.hex())
    from simzmq.gatelink import BrokerEndpoints
    brokers = [BrokerEndpoints(role, b[role]["frontend"], b[role]["notify_out"]) for role in ("primary", "backup")]
    configure_socket = bus_client(cfg, "gate", f"gate {name}")
    gate_mod.run(name, g, sk, brokers, g["host"], port or g["port"], g["http_host"], http_port or g["http_port"],
                 configure_socket=configure_socket)


# ---------------------------------------------------------------------------
# Users and keys.
# ---------------------------------------------------------------------------

@main.group()
def user():
    """Manage users."""


@user.command("add")
@click.argument("name")
@data_option
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.pass_context
def user_add(ctx, name, data, password_stdin):
    """Create user NAME (password from a prompt, or stdin with --password-stdin)."""
    from simzmq.im import hash_password
    from simzmq.store import open_store
    from simzmq.wire.rules import is_valid_user_id
    cfg = load_config(ctx, {"region": {"data": str(Path(data).resolve()) if data else None}})
    if not is_valid_user_id(name):
        raise click.ClickException("user ids are 1-64 characters of A-Z a-z 0-9 _ . -")
    if password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not 1 <= len(password.encode()) <= 256:
        raise click.ClickException("passwords are 1-256 bytes")
    pw_hash = hash_password(password, cfg["im"]["pwhash_strength"])
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(store_url(cfg))
    try:
        with store.transaction():
            created = store.create_user(name, pw_hash, int(time.time() * 1000))
    finally:
        store.close()
    if not created:
        raise click.ClickException(f"user {name} exists")
    click.echo(f"created user {name}")


@main.command()
@data_option
@click.pass_context
def keys(ctx, data):
    """Make the region's keys if missing, and show the public ones.

    keys/gate.key, gate.pub: the gates' X25519 key that clients pin.
    keys/bus/ROLE.key(_secret): the CURVE key pair of each bus role (broker,
    gate, worker, ops); keys/bus/allow/ROLE/*.key: more public keys the
    brokers accept for ROLE (docs/operations.md).
    """
    cfg = load_config(ctx, {"region": {"data": str(Path(data).resolve()) if data else None}})
    _, pk = keys_mod.ensure_gate_key(cfg.data_dir)
    click.echo(f"gate  {pk.hex()}  ({cfg.data_dir / 'keys' / 'gate.pub'})")
    try:
        keys_mod.ensure_bus_keys(cfg.data_dir)
        allowed = keys_mod.allowed_bus_keys(cfg.data_dir)
    except keys_mod.KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("bus keys (CURVE, z85 public keys; the secrets are in the .key_secret files beside them):")
    for role in keys_mod.BUS_ROLES:
        for key, where in allowed[role].items():
            click.echo(f"  {role:<7} {key.decode()}  ({where})")
    if not cfg["bus"]["curve"]:
        click.echo("bus CURVE is off in the configuration ([bus] curve = false): these keys are not used")


@main.command()
@data_option
@click.option("--endpoints", default=None,
              help="Comma-separated state endpoints of the brokers (default: broker.primary.state and "
                   "broker.backup.state from the config).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per update, one per line.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many updates.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between updates.")
@click.pass_context
def monitor(ctx, data, endpoints, as_json, count, interval):
    """Watch the broker pair live: Binary Star state, peer heartbeat, workers,
    gates, requests/s, failovers, refused bus connections."""
    from simzmq import monitor as monitor_mod
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    cfg = load_config(ctx, {"region": {"data": str(Path(data).resolve()) if data else None}})
    if endpoints:
        eps = [e.strip() for e in endpoints.split(",") if e.strip()]
    else:
        eps = [cfg["broker"][role]["state"] for role in ("primary", "backup")]
    configure_socket = bus_client(cfg, "ops", "monitor")
    try:
        monitor_mod.run(eps, configure_socket, interval=interval, count=count, as_json=as_json)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------
# Clients.
# ---------------------------------------------------------------------------

def client_gate(ctx, data, host, port, http_port, gate_key):
    """The configuration and where its gate is, for a person's command."""
    from simzmq.chat import find_gate
    cfg = load_config(ctx, {"region": {"data": str(Path(data).resolve()) if data else None}})
    try:
        return cfg, find_gate(cfg, host, port, http_port, gate_key)
    except keys_mod.KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


def client_password(user_id: str, confirm: bool = False) -> str:
    from simzmq.chat import PasswordError, read_password
    try:
        return read_password(user_id, confirm)
    except PasswordError as exc:
        raise click.ClickException(str(exc)) from None
    except (EOFError, KeyboardInterrupt):
        raise click.ClickException("no password given") from None


def gate_options(f):
    for option in reversed([
        data_option,
        click.option("--host", default=None, help="Gate host (default gate.host, gate.http_host for HTTP)."),
        click.option("--port", type=int, default=None,
                     help="Gate port (default: gate-1's port from DATA/run, else gate.port)."),
        click.option("--gate-key", default=None,
                     help="The gate's public key, 64 hex (default: DATA/keys/gate.pub)."),
        click.option("--user", "user_id", required=True),
    ]):
        f = option(f)
    return f


@main.command()
@gate_options
@click.option("--device", default="terminal")
@click.option("--register", is_flag=True, help="Create the account first.")
@click.pass_context
def chat(ctx, data, host, port, gate_key, user_id, device, register):
    """Chat in the terminal: /to PEER, then type; /convs; /read; /quit.

    The password comes from a prompt, or from the first line of standard
    input when that is not a terminal."""
    from simzmq.chat import run_chat
    _, gate = client_gate(ctx, data, host, port, None, gate_key)
    password = client_password(user_id, confirm=register)
    sys.exit(asyncio.run(run_chat(gate.host, gate.port, gate.gate_pk, user_id, password, device, register)))


@main.command()
@gate_options
@click.option("--http-port", type=int, default=None,
              help="The gate's HTTP port (default: gate-1's from DATA/run, else gate.http_port).")
@click.option("--before", type=click.IntRange(min=0), default=0,
              help="Only messages older than this msg_id (0: the newest).")
@click.option("--limit", type=click.IntRange(1, 100), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The API's JSON answer as is (bodies in base64).")
@click.argument("peer")
@click.pass_context
def history(ctx, data, host, port, gate_key, user_id, http_port, before, limit, as_json, peer):
    """Show the conversation with PEER from the gate's HTTP history API.

    Logs in like `chat` (password from a prompt, or the first line of
    standard input), uses the session's token once, and logs out."""
    from simzmq.history import HistoryError, run_history
    from simzmq.wire.rules import is_valid_user_id
    if not is_valid_user_id(peer):
        raise click.ClickException("user ids are 1-64 characters of A-Z a-z 0-9 _ . -")
    cfg, gate = client_gate(ctx, data, host, port, http_port, gate_key)
    password = client_password(user_id)
    try:
        asyncio.run(run_history(gate, user_id, password, peer, before=before, limit=limit, as_json=as_json,
                                cafile=cfg["gate"]["tls_cert"] or None))
    except HistoryError as exc:
        raise click.ClickException(str(exc)) from None


# ---------------------------------------------------------------------------
# Benchmark (the simzmq.bench package does the work).
# ---------------------------------------------------------------------------

@main.command()
@click.argument("scenario", type=click.Choice(["pairs", "connect", "fanin", "backlog"]))
@data_option
@click.option("--host", default=None, help="Gate host (default gate.host).")
@click.option("--port", type=int, default=None,
              help="Gate port (default: gate-1's port from DATA/run, else gate.port).")
@click.option("--gate-key", default=None, help="The gate's public key, 64 hex (default: DATA/keys/gate.pub).")
@click.option("--users", type=int, default=None,
              help="Users (default: pairs 200, fanin 50, backlog 2, connect min(connections, 200)).")
@click.option("--messages", type=int, default=200, show_default=True, help="Messages per sender (pairs, fanin).")
@click.option("--window", type=int, default=16, show_default=True,
              help="Unacknowledged Sends per sender (without --rate; also the backlog fill).")
@click.option("--rate", type=float, default=None, help="Offered msgs/s in total, open loop (pairs, fanin).")
@click.option("--procs", type=int, default=1, show_default=True, help="Generator processes.")
@click.option("--connections", type=int, default=1000, show_default=True, help="Connections (connect).")
@click.option("--backlog", type=int, default=10000, show_default=True, help="Messages waiting (backlog).")
@click.option("--concurrency", type=int, default=64, show_default=True,
              help="Connections opening at once per process (connect).")
@click.option("--settle", type=float, default=2.0, show_default=True,
              help="Seconds the connections idle before memory is measured (connect).")
@click.option("--codec", type=click.Choice(["bin", "msgpack"]), default="bin", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.pass_context
def bench(ctx, scenario, data, host, port, gate_key, users, messages, window, rate, procs, connections, backlog,
          concurrency, settle, codec, as_json, progress):
    """Load-test a running region: pairs, connect, fanin or backlog."""
    from simzmq import bench as bench_mod
    cfg = load_config(ctx, {"region": {"data": str(Path(data).resolve()) if data else None}})
    try:
        code = bench_mod.main(cfg, scenario=scenario, host=host, port=port, gate_key=gate_key, users=users,
                              messages=messages, window=window, rate=rate, procs=procs, connections=connections,
                              backlog=backlog, concurrency=concurrency, settle_s=settle, codec=codec,
                              as_json=as_json, progress=progress)
    except bench_mod.BenchError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


if __name__ == "__main__":
    main()
