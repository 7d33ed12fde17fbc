"""`simzmq bench`: find the region, run the scenario, print the report."""

from __future__ import annotations

import json

from simzmq import keys as keys_mod
from simzmq.bench import logins
from simzmq.bench.calibrate import calibrate
from simzmq.bench.coordinator import run
from simzmq.bench.plan import BenchError, Options, validate
from simzmq.bench.procstats import gate_client_ports, gate_port_from_pid, listening_ports, machine_info, read_pid_files
from simzmq.bench.report import format_report


def main(cfg, *, scenario: str, host: str | None, port: int | None, gate_key: str | None, as_json: bool,
         progress: bool, **options) -> int:
    """The `simzmq bench` command: resolve where the region is, run, print.
    Returns the exit status: 0 if the run was clean, 1 if the check failed or
    requests went unanswered."""
    data_dir = cfg.data_dir
    if gate_key:
        try:
            pk = bytes.fromhex(gate_key)
        except ValueError:
            raise BenchError("--gate-key must be 64 hex characters") from None
    else:
        try:
            pk = keys_mod.load_gate_public(data_dir)
        except keys_mod.KeyFileError as exc:
            raise BenchError(str(exc)) from None
    g = cfg.gate
    if scenario == "groups" and port is None:
        # The members are spread over every gate of the region.
        options["gate_ports"] = tuple(sorted(gate_client_ports(data_dir).values()))
    port = port or gate_port_from_pid(data_dir) or g.port
    if scenario == "logins":
        return _logins(cfg, host or g.host, port, pk, options.get("users"), as_json)
    opts = Options(scenario=scenario, host=host or g.host, port=port, gate_pk=pk, data_dir=str(data_dir),
                   **options)
    validate(opts)  # bad arguments are refused before the calibration takes its seconds
    calibration = calibrate(data_dir)
    report = run(opts, progress=progress)
    report["machine"] = machine_info()
    report["calibration"] = calibration
    if as_json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def _logins(cfg, host: str, port: int, pk: bytes, users: int | None, as_json: bool) -> int:
    """The logins scenario: one process, no phases; see simzmq/bench/logins.py."""
    users = logins.DEFAULT_USERS if users is None else users
    if users < 1:
        raise BenchError("logins needs at least 1 user")
    worker_pids = [pid for name, pid in read_pid_files(cfg.data_dir).items() if name.startswith("im-")]
    workers = len(worker_pids) or 1
    im = cfg.im
    urls = [f"http://127.0.0.1:{port}/metrics" for pid in worker_pids for port in listening_ports(pid)]
    calibration = calibrate(cfg.data_dir)
    try:
        report = logins.run(host, port, pk, users, workers * im.pwhash_threads, im.pwhash_strength, urls)
    except OSError as exc:
        raise BenchError(f"cannot reach the gate at {host}:{port}: {exc.strerror or exc}") from None
    report["machine"] = machine_info()
    report["calibration"] = calibration
    print(json.dumps(report, indent=2) if as_json else logins.format_report(report))
    return 0 if report["ok"] else 1


def _json_default(obj):
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
