"""The `simzmq` command: run a region or one of its processes, manage users and
keys, chat, monitor and benchmark."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import click

from simzmq import config as config_mod
from simzmq import keys as keys_mod

log = logging.getLogger("simzmq.up")

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
# Exit status of a command refused for its configuration or flags.
EXIT_CONFIG = 2


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)


def refuse(problems: list[str]) -> None:
    """One line per problem on stderr, then exit: nothing was started."""
    for problem in problems:
        click.echo(f"simzmq: {problem}", err=True)
    sys.exit(EXIT_CONFIG)


def load_config(ctx: click.Context, overrides=None, flag_names=None) -> config_mod.Config:
    try:
        return config_mod.load(ctx.obj.get("config_path"), overrides=overrides, flag_names=flag_names)
    except config_mod.ConfigError as exc:
        refuse(exc.problems)


def bus_client(cfg: config_mod.Config, role: str, process: str):
    """``configure_socket`` for a process connecting to the brokers as ROLE,
    or None when [bus] curve is off."""
    from simzmq import bus as bus_mod
    if not cfg.bus.curve:
        bus_mod.curve_off_warning(process)
        return None
    try:
        return bus_mod.client_configurator(bus_mod.load_keys(cfg.data_dir, role))
    except keys_mod.KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


def data_option(f):
    return click.option("--data", "data", type=click.Path(file_okay=False), default=None,
                        help="Data directory (default: region.data from the config).")(f)


def data_override(data) -> dict:
    return {"region": {"data": str(Path(data).resolve()) if data else None}}


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), envvar="SIMZMQ_CONFIG",
              default=None, help="A TOML file overriding conf/simzmq.toml (env SIMZMQ_CONFIG).")
@click.pass_context
def main(ctx, config_path):
    """simzmq: an instant-messaging back end on a ZeroMQ message bus."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


# ---------------------------------------------------------------------------
# simzmq up / down: a whole local region (simzmq/supervise.py does the work).
# ---------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one, as servers do at start
    (each client connection is a descriptor; the default soft limit is often
    1024 below a far higher hard limit). Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # e.g. an unlimited hard limit the kernel caps lower: keep the soft one
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


UP_FLAGS = {"region.data": "--data", "gate.port": "--gate-port", "gate.http_port": "--http-port",
            "im.workers": "--workers", "gate.gates": "--gates", "gate.allow_register": "--open-registration",
            "region.port_base": "--port-base", "im.store": "--store", "region.name": "--region",
            "push.webhook": "--webhook", "push.secret": "--webhook-secret"}


def region_children(cfg: config_mod.Config, env: dict, run_dir: Path) -> list:
    from simzmq.supervise import Child
    base = [sys.executable, "-m", "simzmq"]
    children = [Child(f"broker-{role}", base + ["broker", "--role", role], env, run_dir)
                for role in ("primary", "backup")]
    for i in range(1, cfg.im.workers + 1):
        children.append(Child(f"im-{i}", base + ["im", "--name", f"im-{i}"], env, run_dir))
    if cfg.push.enabled:
        for i in range(1, cfg.push.instances + 1):
            children.append(Child(f"push-{i}", base + ["push", "--name", f"push-{i}"], env, run_dir))
    for i in range(1, cfg.gate.gates + 1):
        port, http_port = config_mod.gate_ports(cfg, i)
        children.append(Child(f"gate-{i}", base + ["gate", "--name", f"gate-{i}", "--port", str(port),
                                                  "--http-port", str(http_port)], env, run_dir))
    if cfg.region.peers:
        children.append(Child("federation", base + ["federate"], env, run_dir))
    return children


def readiness_probe(cfg: config_mod.Config):
    from simzmq.supervise import ReadinessProbe
    return ReadinessProbe(cfg, bus_client(cfg, "ops", "simzmq up") if cfg.bus.curve else None)


@main.command()
@data_option
@click.option("--port-base", type=int, default=None,
              help="Shift every port of the region so that the first gate listens here (region.port_base).")
@click.option("--gate-port", type=int, default=None, help="Client TCP port of the first gate.")
@click.option("--http-port", type=int, default=None, help="HTTP port of the first gate.")
@click.option("--workers", type=int, default=None, help="How many IM workers.")
@click.option("--gates", type=int, default=None, help="How many gates.")
@click.option("--store", default=None, help="The store: sqlite, sqlite:///PATH or postgresql://... (im.store).")
@click.option("--open-registration/--closed-registration", default=None,
              help="Whether clients may Register (default: gate.allow_register).")
@click.option("--region", "region_name", default=None, help="This region's name (region.name).")
@click.option("--webhook", default=None,
              help="Run the push service, calling this URL for messages to offline users (push.webhook).")
@click.option("--webhook-secret", default=None, help="The key the webhook calls are signed with (push.secret).")
@click.pass_context
def up(ctx, data, port_base, gate_port, http_port, workers, gates, store, open_registration, region_name,
       webhook, webhook_secret):
    """Start a whole region as supervised processes: brokers, IM workers, gates.

    Prints "region up" once a broker is active with every worker and every
    gate answers; a process that cannot start stops the region, with one line
    saying which and why (exit 1). SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop
    the region: gates, then workers, then brokers (exit 0; before the region
    was up, one line saying so and 128 + the signal's number, 130 for Ctrl-C)."""
    from simzmq import supervise
    setup_logging()
    overrides = {"region": {"data": str(Path(data).resolve()) if data else None, "port_base": port_base,
                            "name": region_name},
                 "gate": {"port": gate_port, "http_port": http_port, "gates": gates,
                          "allow_register": open_registration},
                 "im": {"workers": workers, "store": store},
                 "push": {"webhook": webhook, "secret": webhook_secret}}
    cfg = load_config(ctx, overrides, UP_FLAGS)
    problems = config_mod.local_problems(cfg)
    if problems:
        refuse(problems)
    data_dir = cfg.data_dir
    run_dir = data_dir / "run"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        refuse([f"cannot use the data directory {data_dir}: cannot make {exc.filename or run_dir}: "
                f"{exc.strerror or exc}"])
    for directory in (data_dir, run_dir):  # the store, keys, pid files
        why = cannot_write(directory)
        if why:
            refuse([f"cannot use the data directory {data_dir}: cannot make files in {directory}: {why}"])
    running = supervise.live_processes(run_dir)
    if running:
        listed = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
        refuse([f"a region is already running in {data_dir}: {listed}; stop it with "
                f"`{command_name()} down --data {data_dir}`"])
    env = dict(os.environ)
    env.update(config_mod.env_for(overrides))
    env["SIMZMQ_REGION_DATA"] = str(data_dir)
    if ctx.obj.get("config_path"):
        env["SIMZMQ_CONFIG"] = str(Path(ctx.obj["config_path"]).resolve())
    region = supervise.Supervisor(region_children(cfg, env, run_dir), lambda: readiness_probe(cfg))
    region.install_signals()
    # The key exists before any gate accepts a connection, so a client that
    # reads keys/gate.pub right after `up` printed it can pin it.
    try:
        _, gate_pk = keys_mod.ensure_gate_key(data_dir)
        # The bus keys too, so every child finds its role's key at start.
        keys_mod.ensure_bus_keys(data_dir)
    except keys_mod.KeyFileError as exc:
        refuse([str(exc)])
    except OSError as exc:
        refuse([f"cannot write the region's keys in {data_dir / 'keys'}: {exc.strerror or exc}"])
    if not cfg.bus.curve:
        from simzmq.bus import curve_off_warning
        curve_off_warning("region")
    fds = raise_fd_limit()
    up_pid_file = run_dir / "up.pid"
    supervise.write_pid_file(up_pid_file, os.getpid())
    log.info("region starting: data %s, config %s, fd limit %d", data_dir, cfg.describe(), fds)
    failure = None
    try:
        try:
            region.start()
        except supervise.StartFailed as exc:
            failure = exc
        else:
            announce(cfg, gate_pk)
            region.supervise()
    finally:
        log.info("region stopping")
        region.stop()
        up_pid_file.unlink(missing_ok=True)
        log.info("region stopped")
    if failure:
        log.error("region not started: %s", failure)
        hint = ""
        if "Address already in use" in str(failure):
            hint = (" (another program holds that port, `ss -ltnp` shows which; `--port-base` moves every port "
                    "of the region, docs/running.md)")
        try:
            click.echo(f"simzmq up: {failure}; region stopped{hint}", err=True)
        except OSError:
            # The terminal went away (it was closed: SIGHUP); the exit status
            # still tells. Exiting must not fail flushing the line again.
            sys.stderr = open(os.devnull, "w")
        sys.exit(failure.exit_code)


def cannot_write(directory: Path) -> str | None:
    """None if a file can be made in `directory`, else why not (tried, as
    os.access would say yes to root on a read-only file system)."""
    probe = directory / f".simzmq-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def command_name() -> str:
    """The command as this installation names it (bin/run users have no
    activated virtualenv, so a bare `simzmq` may not be on their PATH)."""
    me = Path(sys.executable).parent / "simzmq"
    return str(me) if me.exists() else "simzmq"


def announce(cfg: config_mod.Config, gate_pk: bytes) -> None:
    g, data_dir, cmd = cfg.gate, cfg.data_dir, command_name()
    gates = ", ".join(f"{g.host}:{config_mod.gate_ports(cfg, i)[0]}" for i in range(1, g.gates + 1))
    web = ", ".join(f"http{'s' if g.tls_cert else ''}://{g.http_host}:{config_mod.gate_ports(cfg, i)[1]}/"
                    for i in range(1, g.gates + 1))
    # chat and down find the region from DATA/run; monitor reads the brokers'
    # state endpoints from the configuration, which a --port-base moved.
    watch = f"{cmd} monitor --data {data_dir}"
    if cfg.region.port_base != config_mod.DEFAULT_PORT_BASE:
        watch += f" --endpoints {cfg.broker.role('primary').state},{cfg.broker.role('backup').state}"
    click.echo(
        f"\nsimzmq region up. Clients connect to {gates} and pin the gate key\n"
        f"  {gate_pk.hex()}   (in {data_dir / 'keys' / 'gate.pub'})\n"
        f"Web chat and HTTP API (/v1/health, /v1/history, /metrics): {web}\n"
        f"Talk:   {cmd} chat --data {data_dir} --user alice --register\n"
        f"        {cmd} chat --data {data_dir} --user bob --register   (in another terminal)\n"
        f"Watch:  {watch}\n"
        f"Stop:   Ctrl-C, or {cmd} down --data {data_dir}\n", err=True)


@main.command()
@data_option
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds to wait for the region to stop before killing what is left.")
@click.pass_context
def down(ctx, data, timeout):
    """Stop the region running in the data directory (from its pid files in DATA/run/)."""
    from simzmq import supervise
    cfg = load_config(ctx, data_override(data))
    run_dir = cfg.data_dir / "run"
    running = supervise.live_processes(run_dir) if run_dir.is_dir() else {}
    if not running:
        click.echo(f"no region is running in {cfg.data_dir}")
        return
    # `up` stops its children in order; processes left without an `up`
    # (it was killed) are stopped here in the same order.
    for group in supervise.stop_order(running):
        for name in group:
            try:
                os.kill(running[name], signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        left = group
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [n for n in left if supervise.is_simzmq_process(running[n])]
        for name in left:
            click.echo(f"{name} (pid {running[name]}) did not stop in {timeout:.0f} s; killing it", err=True)
            try:
                os.kill(running[name], signal.SIGKILL)
            except ProcessLookupError:
                pass
    supervise.live_processes(run_dir)  # removes the pid files of what stopped
    click.echo(f"stopped the region in {cfg.data_dir}: {', '.join(sorted(running))}")


# ---------------------------------------------------------------------------
# One process of a region.
# ---------------------------------------------------------------------------


def can_listen(listener: config_mod.Listener) -> str | None:
    """None if this machine lets us listen on it now, else why not."""
    host = "0.0.0.0" if listener.host == "*" else listener.host
    try:
        infos = socket.getaddrinfo(host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def serve(cfg: config_mod.Config, name: str, listeners: list[config_mod.Listener], run) -> None:
    """Run one process of a region. An address it cannot listen on, or any
    failure, ends it with one CRITICAL line naming the process, the address
    and the reason (the line `simzmq up` repeats)."""
    from simzmq.supervise import record_failure
    proclog = logging.getLogger("simzmq." + name.split("-")[0])

    def fail(reason: str) -> None:
        proclog.critical("%s %s", name, reason)
        record_failure(cfg.data_dir / "run", name, f"{name} {reason}")
        sys.exit(1)
    raise_fd_limit()
    for listener in listeners:
        why = can_listen(listener)
        if why:
            fail(f"cannot listen on {listener.what} {listener.address()}: {why}")
    try:
        run()
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        if isinstance(exc.code, str):
            fail(f"cannot run: {exc.code}")
        raise
    except click.ClickException as exc:
        fail(f"cannot run: {exc.format_message()}")
    except Exception as exc:
        proclog.exception("%s failed", name)
        fail(f"failed: {type(exc).__name__}: {exc}")


@main.command()
@click.option("--role", type=click.Choice(["primary", "backup"]), default="primary")
@click.pass_context
def broker(ctx, role):
    """Run one broker of the region's pair."""
    setup_logging()
    cfg = load_config(ctx)
    logging.getLogger("simzmq.broker").info("broker %s: config %s", role, cfg.describe())
    serve(cfg, f"broker-{role}", config_mod.broker_listeners(cfg, role), lambda: run_broker(cfg, role))


def run_broker(cfg: config_mod.Config, role: str) -> None:
    import zmq

    from simzmq import bus as bus_mod
    from simzmq.broker import Broker
    context = zmq.Context.instance()
    bus = None
    if cfg.bus.curve:
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
        Broker(cfg.broker, role, cfg.region.metrics_host, context=context,
               configure_socket=bus.configure_socket if bus else None,
               auth_counts=bus.zap.counts if bus else None).run()
    finally:
        if bus is not None:
            bus.zap.stop()


def process_index(name: str) -> int:
    """N of a process named "im-N" or "gate-N" (1 for any other name)."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() and int(tail) >= 1 else 1


@main.command()
@click.option("--name", default="im-1", help="Process name: im-N serves metrics on im.metrics_port + N - 1.")
@click.pass_context
def im(ctx, name):
    """Run one IM worker."""
    setup_logging()
    cfg = load_config(ctx)
    logging.getLogger("simzmq.im").info("im worker %s: config %s", name, cfg.describe())
    index = process_index(name)
    serve(cfg, name, config_mod.im_listeners(cfg, index), lambda: run_im(cfg, name, index))


def run_im(cfg: config_mod.Config, name: str, index: int) -> None:
    from simzmq import im as im_mod
    configure_socket = bus_client(cfg, "worker", f"im worker {name}")
    worker = im_mod.IMWorker(name, cfg, config_mod.im_metrics_port(cfg, index) or None, configure_socket)
    im_mod.run(worker)


@main.command()
@click.option("--name", default="gate-1")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Client TCP port (default gate.port).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=None,
              help="HTTP port (default gate.http_port).")
@click.pass_context
def gate(ctx, name, port, http_port):
    """Run one gate."""
    setup_logging()
    cfg = load_config(ctx)
    port, http_port = port or cfg.gate.port, http_port or cfg.gate.http_port
    serve(cfg, name, config_mod.gate_listeners(cfg, name, port, http_port), lambda: run_gate(cfg, name, port, http_port))


def run_gate(cfg: config_mod.Config, name: str, port: int, http_port: int) -> None:
    from simzmq import gate as gate_mod
    sk, pk = keys_mod.ensure_gate_key(cfg.data_dir)
    logging.getLogger("simzmq.gate").info("gate %s: config %s, key %s", name, cfg.describe(), pk.hex())
    gate_mod.run(name, cfg, sk, port, http_port, bus_client(cfg, "gate", f"gate {name}"))


# ---------------------------------------------------------------------------
# The push service (simzmq/push/) and a webhook receiver to try it with.
# ---------------------------------------------------------------------------


@main.group(invoke_without_command=True)
@click.option("--name", default="push-1", help="Process name: push-N serves metrics on push.metrics_port + N - 1.")
@click.pass_context
def push(ctx, name):
    """Run the push service (calls push.webhook for messages to offline
    users); `push dead` and `push retry` manage its dead letters."""
    if ctx.invoked_subcommand is not None:
        return
    setup_logging()
    cfg = load_config(ctx)
    if not cfg.push.enabled:
        refuse(["push.webhook is not set: nothing to call (`simzmq up --webhook URL --webhook-secret S`)"])
    index = process_index(name)
    serve(cfg, name, config_mod.push_listeners(cfg, index), lambda: run_push(cfg, name, index))


def run_push(cfg: config_mod.Config, name: str, index: int) -> None:
    from simzmq.push import service as push_mod
    links, configure_peer = peer_links(cfg)
    service = push_mod.PushService(name, cfg, config_mod.push_metrics_port(cfg, index) or None,
                                   bus_client(cfg, "worker", f"push service {name}"),
                                   peers=links, configure_peer=configure_peer)
    push_mod.run(service)


def peer_links(cfg: config_mod.Config):
    """The peer regions' brokers (region.peers; none: []) and how to connect
    to them (configure(sock, link); None with [bus] curve off)."""
    from simzmq import federation as fed
    if not cfg.region.peers:
        return [], None
    try:
        links = fed.parse_peers(cfg.region.peers)
        return links, fed.peer_configurator(cfg.data_dir, links) if cfg.bus.curve else None
    except (ValueError, keys_mod.KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None


@push.command("dead")
@data_option
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@click.pass_context
def push_dead(ctx, data, limit):
    """List the dead-lettered push jobs, oldest first."""
    from simzmq.store import open_store
    cfg = load_config(ctx, data_override(data))
    store = open_store(cfg.store_url())
    try:
        dead = store.dead_push_jobs(limit)
    finally:
        store.close()
    if not dead:
        click.echo("no dead push jobs")
    for d in dead:
        click.echo(f"msg_id {d.msg_id} user {d.user} seq {d.seq} attempts {d.attempts} "
                   f"died {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(d.died_ms / 1000))}: {d.last_error}")


@push.command("retry")
@data_option
@click.option("--all", "everything", is_flag=True, help="Queue every dead job again.")
@click.argument("msg_ids", nargs=-1, type=click.IntRange(min=1))
@click.pass_context
def push_retry(ctx, data, everything, msg_ids):
    """Queue dead push jobs again (MSG_ID..., or --all), due now."""
    from simzmq.store import open_store
    if bool(msg_ids) == everything:
        raise click.UsageError("name the msg_ids to retry, or give --all")
    cfg = load_config(ctx, data_override(data))
    store = open_store(cfg.store_url())
    try:
        with store.transaction():
            n = store.requeue_dead_push_jobs(None if everything else list(msg_ids), int(time.time() * 1000))
    finally:
        store.close()
    click.echo(f"queued {n} push job{'s' if n != 1 else ''} again")


@main.command("webhook-echo")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), required=True)
@click.option("--secret", required=True, help="The key calls must be signed with (push.secret).")
@click.option("--status", type=click.IntRange(200, 599), default=200, show_default=True,
              help="What to answer correctly signed calls.")
def webhook_echo(host, port, secret, status):
    """Receive webhook calls: check each signature and print the call as a JSON line."""
    from simzmq.push import echo
    setup_logging()
    echo.run(host, port, secret, status)


@main.command()
@click.pass_context
def federate(ctx):
    """Bring the peer regions' notifications (region.peers) to this region's gates."""
    setup_logging()
    cfg = load_config(ctx)
    logging.getLogger("simzmq.federation").info("federation: config %s", cfg.describe())
    serve(cfg, "federation", config_mod.federation_listeners(cfg), lambda: run_federation(cfg))


def run_federation(cfg: config_mod.Config) -> None:
    from simzmq import federation as fed
    links, configure_peer = peer_links(cfg)
    configure_local = bus_client(cfg, "worker", "federation")
    fed.run(fed.FederationProcess(cfg, links, configure_peer, configure_local))


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
    pw_hash = hash_password(password, cfg.im.pwhash_strength)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.store_url())
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
    if not cfg.bus.curve:
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
        eps = [cfg.broker.role(role).state for role in ("primary", "backup")]
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
        gate = find_gate(cfg, host, port, http_port, gate_key)
    except keys_mod.KeyFileError as exc:
        raise click.ClickException(str(exc) + no_region_hint(cfg)) from None
    # Before the password is asked for, which would be typed for nothing.
    try:
        socket.create_connection((gate.host, gate.port), timeout=10).close()
    except OSError as exc:
        raise click.ClickException(f"cannot reach the gate at {gate.host}:{gate.port}: {exc.strerror or exc}"
                                   + no_region_hint(cfg)) from None
    return cfg, gate


def no_region_hint(cfg: config_mod.Config) -> str:
    """What to add to a client's failure when no region runs from its data directory."""
    from simzmq.supervise import live_processes
    run_dir = cfg.data_dir / "run"
    if run_dir.is_dir() and live_processes(run_dir):
        return ""
    return f" (no region is running from {cfg.data_dir}: `{command_name()} up --data {cfg.data_dir}` starts one)"


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
    try:
        status = asyncio.run(run_chat(gate.host, gate.port, gate.gate_pk, user_id, password, device, register))
    except KeyboardInterrupt:
        # Ctrl-C is a way to leave, like /quit: the session was closed on the
        # way out; the status says it was interrupted.
        click.echo()
        status = 130
    sys.exit(status)


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
    from simzmq.wire.rules import is_valid_group_id, is_valid_user_id
    if not (is_valid_user_id(peer) or is_valid_group_id(peer)):
        raise click.ClickException("user ids are 1-64 characters of A-Z a-z 0-9 _ . -, group ids # and 1-63 of them")
    cfg, gate = client_gate(ctx, data, host, port, http_port, gate_key)
    password = client_password(user_id)
    try:
        asyncio.run(run_history(gate, user_id, password, peer, before=before, limit=limit, as_json=as_json,
                                cafile=cfg.gate.tls_cert or None))
    except HistoryError as exc:
        raise click.ClickException(str(exc)) from None


# ---------------------------------------------------------------------------
# Benchmark (the simzmq.bench package does the work).
# ---------------------------------------------------------------------------

@main.command()
@click.argument("scenario", type=click.Choice(["pairs", "connect", "fanin", "backlog", "groups", "logins"]))
@data_option
@click.option("--host", default=None, help="Gate host (default gate.host).")
@click.option("--port", type=int, default=None,
              help="Gate port (default: gate-1's port from DATA/run, else gate.port).")
@click.option("--gate-key", default=None, help="The gate's public key, 64 hex (default: DATA/keys/gate.pub).")
@click.option("--users", type=int, default=None,
              help="Users (default: pairs 200, fanin 50, backlog 2, connect min(connections, 200), logins 500); "
                   "groups: the group's members (256).")
@click.option("--messages", type=int, default=200, show_default=True,
              help="Messages per sender (pairs, fanin, groups).")
@click.option("--senders", type=int, default=1, show_default=True, help="Members sending to the group (groups).")
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
def bench(ctx, scenario, data, host, port, gate_key, users, messages, senders, window, rate, procs, connections,
          backlog, concurrency, settle, codec, as_json, progress):
    """Load-test a running region: pairs, connect, fanin, backlog, groups or logins."""
    from simzmq import bench as bench_mod
    cfg = load_config(ctx, {"region": {"data": str(Path(data).resolve()) if data else None}})
    try:
        code = bench_mod.main(cfg, scenario=scenario, host=host, port=port, gate_key=gate_key, users=users,
                              messages=messages, senders=senders, window=window, rate=rate, procs=procs,
                              connections=connections,
                              backlog=backlog, concurrency=concurrency, settle_s=settle, codec=codec,
                              as_json=as_json, progress=progress)
    except bench_mod.BenchError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


if __name__ == "__main__":
    main()
