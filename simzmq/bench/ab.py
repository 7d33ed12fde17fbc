"""A/B: one scenario against regions started from two checkouts of simzmq.

The runs interleave, A B A B ..., each against a region started afresh (new
data directory, free ports) from its side's checkout, so that both sides meet
the same machine over the same stretch of time; a shared machine's noise then
falls on both. The load generator is always this checkout's `simzmq bench`,
so only the region differs. The result: the calibration line, every run's
figures, the medians per side and the ratios B/A.

A side is a directory holding a checkout (``simzmq/`` in it) or a git revision
of this checkout's repository, exported with ``git archive`` into the work
directory (no worktree to clean up). The region runs with this interpreter and
``PYTHONPATH`` at the side's checkout; the runner checks that the region's
Python does import simzmq from there.

    python -m simzmq.bench.ab --a bae3640 --b . --runs 3 pairs --rate 2000
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click

from simzmq.bench.calibrate import calibrate, format_calibration
from simzmq.bench.plan import SCENARIOS, BenchError

# This checkout: its bench drives every run.
HERE = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
# Bench options the runner sets itself.
RESERVED = ("--data", "--host", "--port", "--gate-key", "--json", "--progress", "--no-progress")
# Throughput runs send far faster than a person types: the region's per-user and
# per-connection rate limits are lifted, as docs/benchmarks.md does.
LIFTED_LIMITS = {"SIMZMQ_GATE_LIMITS_REQUESTS_PER_S": "1000000", "SIMZMQ_GATE_LIMITS_REQUESTS_BURST": "1000000",
                 "SIMZMQ_GATE_LIMITS_SENDS_PER_S": "1000000", "SIMZMQ_GATE_LIMITS_SENDS_BURST": "1000000"}
# And for the groups scenario the group budget (a revision from before it
# existed refuses the key: A/B groups only between revisions that have it).
LIFTED_GROUP_LIMITS = {"SIMZMQ_GATE_LIMITS_GROUP_WRITES_PER_S": "1000000",
                       "SIMZMQ_GATE_LIMITS_GROUP_WRITES_BURST": "1000000"}
# Region processes by role, from their pid-file names.
ROLES = (("gate", "gate-"), ("broker", "broker-"), ("worker", "im-"))


@dataclass
class Side:
    name: str  # "A" or "B"
    spec: str  # as given: a path or a revision
    root: Path  # the checkout the region runs from
    described: str  # what it is, for the report


def resolve_side(name: str, spec: str, work: Path, repo: Path = HERE) -> Side:
    """A directory with simzmq/ in it is used as it is; anything else must be
    a revision of ``repo``, exported once into ``work``."""
    path = Path(spec).expanduser()
    if (path / "simzmq" / "__init__.py").is_file():
        root = path.resolve()
        rev = _git(root, "rev-parse", "--short=12", "HEAD")
        dirty = rev and _git(root, "status", "--porcelain", "--untracked-files=no")
        return Side(name, spec, root, f"{root}" + (f" (at {rev}{', with local changes' if dirty else ''})"
                                                   if rev else ""))
    sha = _git(repo, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    if not sha:
        raise BenchError(f"--{name.lower()} {spec}: neither a checkout (no simzmq/ in it) nor a revision of {repo}")
    root = work / f"src-{sha[:12]}"
    if not (root / "simzmq" / "__init__.py").is_file():
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha], capture_output=True)
        if archive.returncode != 0:
            raise BenchError(f"git archive {sha} failed: {archive.stderr.decode(errors='replace').strip()}")
        tmp = root.with_name(root.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(root)
    return Side(name, spec, root, f"{spec} = {sha[:12]} (exported to {root})")


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def check_imports(side: Side) -> None:
    """The region's Python must take simzmq from the side's checkout (not,
    say, an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(side.root)}
    proc = subprocess.run([sys.executable, "-c", "import simzmq; print(simzmq.__file__)"], env=env,
                          cwd=str(side.root), capture_output=True, text=True)
    where = Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None
    if where is None or not where.is_relative_to(side.root):
        raise BenchError(f"side {side.name}: python imports simzmq from {where or proc.stderr.strip()}, "
                         f"not from {side.root}")


def _free_ports(n: int) -> list[int]:
    import socket
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Region:
    """`simzmq up` from one side's checkout, on free 127.0.0.1 ports, with
    its own data directory."""

    def __init__(self, side: Side, data_dir: Path, workers: int | None, lifted: dict[str, str]):
        self.side = side
        self.data_dir = data_dir
        ports = _free_ports(15)
        self.gate_port, self.http_port = ports[0], ports[1]
        env = {k: v for k, v in os.environ.items() if k != "SIMZMQ_CONFIG"}
        env["PYTHONPATH"] = str(side.root)
        for i, endpoint in enumerate(("FRONTEND", "BACKEND", "NOTIFY_IN", "NOTIFY_OUT", "STATE")):
            env[f"SIMZMQ_BROKER_PRIMARY_{endpoint}"] = f"tcp://127.0.0.1:{ports[2 + i]}"
            env[f"SIMZMQ_BROKER_BACKUP_{endpoint}"] = f"tcp://127.0.0.1:{ports[7 + i]}"
        env["SIMZMQ_BROKER_PRIMARY_METRICS_PORT"] = str(ports[12])
        env["SIMZMQ_BROKER_BACKUP_METRICS_PORT"] = str(ports[13])
        env["SIMZMQ_IM_METRICS_PORT"] = str(ports[14])
        env.update(lifted)
        self.env = env
        self.argv = [sys.executable, "-m", "simzmq", "up", "--data", str(data_dir), "--gate-port",
                     str(self.gate_port), "--http-port", str(self.http_port), "--gates", "1"]
        if workers:
            self.argv += ["--workers", str(workers)]
        self.log_path = data_dir.with_name(data_dir.name + ".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=str(self.side.root), stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"side {self.side.name}: simzmq up exited with {self.proc.returncode}; "
                                 f"see {self.log_path}")
            if self._healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise BenchError(f"side {self.side.name}: the region was not healthy after {START_TIMEOUT_S:g} s; "
                         f"see {self.log_path}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v1/health", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_bench(region: Region, scenario: str, bench_args: list[str], progress: bool) -> dict:
    """This checkout's `simzmq bench` against the region; its JSON report.
    Its progress bar and errors go to stderr as they come."""
    argv = [sys.executable, "-m", "simzmq", "bench", scenario, *bench_args, "--data", str(region.data_dir),
            "--json", "--progress" if progress else "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("SIMZMQ_CONFIG", "PYTHONPATH")}
    env.update({k: v for k, v in region.env.items() if k.startswith("SIMZMQ_")})
    proc = subprocess.run(argv, cwd=str(HERE), env=env, stdout=subprocess.PIPE, text=True)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise BenchError(f"side {region.side.name}: simzmq bench exited with {proc.returncode} "
                         f"without a report (its errors are above)") from None


# ---------------------------------------------------------------------------
# Figures from one report, and their summary over the runs (pure).
# ---------------------------------------------------------------------------

def role_cpu(report: dict) -> dict[str, float]:
    """CPU seconds of the measured window per role (gate, broker, worker),
    summed over the role's processes."""
    out = {role: 0.0 for role, _ in ROLES}
    for proc in report["server"]["processes"]:
        for role, prefix in ROLES:
            if proc["name"].startswith(prefix) and not proc.get("gone"):
                out[role] += proc["cpu_s"]
    return out


def figures(report: dict) -> dict[str, float | None]:
    """The figures an A/B compares, flat: name -> value (None if the run
    could not measure it)."""
    sc = report["scenario"]
    out: dict[str, float | None] = {}
    cpu = role_cpu(report)
    if not report["server"]["processes"]:
        cpu = {}
    if sc in ("pairs", "fanin", "groups"):
        items, unit = report["counts"]["delivered_pushes"], "member copy" if sc == "groups" else "msg"
        out["delivered member copies/s" if sc == "groups" else "delivered msgs/s"] = report["rates"]["delivered_per_s"]
        mode = f"at {report['params']['rate']:g}/s" if report["params"]["rate"] else "windowed"
        lat = report["latency_ms"]["send_to_last_member" if sc == "groups" else "send_to_push"]
        to = "last member" if sc == "groups" else "push"
        out[f"send→{to} p50 ms ({mode})"] = lat.get("p50")
        out[f"send→{to} p99 ms ({mode})"] = lat.get("p99")
    elif sc == "backlog":
        items, unit = report["counts"]["synced"], "msg"
        out["synced msgs/s"] = report["rates"]["synced_per_s"]
        out["reconnect to synced ms"] = report["timing_ms"]["total_s"]
    else:
        items, unit = report["counts"]["token_logins"], "token login"
        out["token logins/s"] = report["rates"]["token_logins_per_s"]
        out["token login p50 ms"] = report["latency_ms"]["token_login"].get("p50")
        out["token login p99 ms"] = report["latency_ms"]["token_login"].get("p99")
    for role, _ in ROLES:
        out[f"{role} CPU µs/{unit}"] = round(1e6 * cpu[role] / items, 1) if cpu and items else None
    out[f"region CPU µs/{unit}"] = round(1e6 * sum(cpu.values()) / items, 1) if cpu and items else None
    return out


def summarize(runs: list[tuple[str, dict[str, float | None]]]) -> list[dict]:
    """Per figure, in first-seen order: each side's values run by run, their
    medians, and B/A of the medians."""
    names: list[str] = []
    for _, figs in runs:
        names += [n for n in figs if n not in names]
    rows = []
    for name in names:
        values = {side: [figs.get(name) for s, figs in runs if s == side] for side in ("A", "B")}
        medians = {}
        for side, vs in values.items():
            present = [v for v in vs if v is not None]
            medians[side] = statistics.median(present) if present else None
        a, b = medians["A"], medians["B"]
        rows.append({"figure": name, "a": values["A"], "b": values["B"], "median_a": a, "median_b": b,
                     "ratio_b_a": round(b / a, 3) if a and b is not None else None})
    return rows


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def format_ab(result: dict) -> str:
    lines = [f"simzmq bench A/B: {result['scenario']} {' '.join(result['bench_args'])}".rstrip()
             + f"; {result['runs']} runs per side, interleaved ({' '.join(result['order'])})",
             f"  A = {result['sides']['A']}", f"  B = {result['sides']['B']}",
             "  " + format_calibration(result["calibration"])]
    for i, run in enumerate(result["per_run"], 1):
        lines.append(f"  run {i} ({run['side']}): {'OK' if run['ok'] else 'FAILED'}, "
                     + ", ".join(f"{k} {_num(v)}" for k, v in run["figures"].items()))
    rows = result["summary"]
    width = max([len(r["figure"]) for r in rows] + [6])
    lines.append(f"  {'figure':<{width}}  {'A runs':<24} {'B runs':<24} {'median A':>10} {'median B':>10} {'B/A':>7}")
    for r in rows:
        lines.append(f"  {r['figure']:<{width}}  {' '.join(map(_num, r['a'])):<24} {' '.join(map(_num, r['b'])):<24} "
                     f"{_num(r['median_a']):>10} {_num(r['median_b']):>10} "
                     f"{'-' if r['ratio_b_a'] is None else format(r['ratio_b_a'], '.3f'):>7}")
    if not all(run["ok"] for run in result["per_run"]):
        lines.append("  some runs FAILED their check: their figures are in the table but deserve no trust")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------

def run_ab(a: str, b: str, runs: int, scenario: str, bench_args: list[str], work: Path, workers: int | None = None,
           lift_limits: bool = True, progress: bool = True, say=None) -> dict:
    """Run the A/B; returns everything it measured."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    for arg in bench_args:
        if arg.split("=", 1)[0] in RESERVED:
            raise BenchError(f"{arg}: the A/B runner sets this itself")
    work.mkdir(parents=True, exist_ok=True)
    sides = {"A": resolve_side("A", a, work), "B": resolve_side("B", b, work)}
    for side in sides.values():
        check_imports(side)
    order = [name for _ in range(runs) for name in ("A", "B")]
    say(f"calibrating in {work} ...")
    result: dict = {"scenario": scenario, "bench_args": bench_args, "runs": runs, "order": order,
                    "sides": {name: s.described for name, s in sides.items()}, "calibration": calibrate(work),
                    "lifted_limits": lift_limits, "per_run": []}
    say(format_calibration(result["calibration"]))
    for i, name in enumerate(order, 1):
        data = work / f"run-{i}-{name}" / "data"
        lifted = {**LIFTED_LIMITS, **(LIFTED_GROUP_LIMITS if scenario == "groups" else {})} if lift_limits else {}
        region = Region(sides[name], data, workers, lifted)
        say(f"run {i}/{len(order)}: side {name}, region from {sides[name].root} ...")
        region.start()
        try:
            report = run_bench(region, scenario, bench_args, progress)
        finally:
            region.stop()
        result["per_run"].append({"side": name, "ok": report["ok"], "figures": figures(report), "report": report})
        if report["ok"]:
            shutil.rmtree(data, ignore_errors=True)  # the region's log stays beside it
    result["summary"] = summarize([(r["side"], r["figures"]) for r in result["per_run"]])
    return result


@click.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
@click.option("--a", "a", required=True, metavar="PATH_OR_REV", help="Side A: a checkout directory or a git revision.")
@click.option("--b", "b", required=True, metavar="PATH_OR_REV", help="Side B: a checkout directory or a git revision.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per side.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="IM workers of each region.")
@click.option("--keep-limits", is_flag=True,
              help="Leave the gate's rate limits at their defaults (they are lifted for throughput runs).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for exported revisions, data and logs (default: a new temporary one, removed "
                   "after a clean run).")
@click.option("--json", "as_json", is_flag=True, help="Print everything, every run's report too, as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Each run's progress on stderr.")
@click.argument("scenario", type=click.Choice(SCENARIOS))
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def main(a, b, runs, workers, keep_limits, work, as_json, progress, scenario, bench_args):
    """A/B: run `simzmq bench SCENARIO [BENCH_ARGS...]` against regions
    started from checkouts A and B alternately (A B A B ...), and print the
    per-run figures, their medians and the ratios B/A."""
    temporary = work is None
    work = Path(tempfile.mkdtemp(prefix="simzmq-ab-")) if temporary else work.resolve()
    try:
        result = run_ab(a, b, runs, scenario, list(bench_args), work, workers=workers,
                        lift_limits=not keep_limits, progress=progress)
    except BenchError as exc:
        if temporary and not any(work.glob("run-*")):
            shutil.rmtree(work, ignore_errors=True)  # refused before any run: nothing worth keeping
            raise click.ClickException(str(exc)) from None
        raise click.ClickException(f"{exc} (logs in {work})") from None
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(format_ab(result))
    clean = all(r["ok"] for r in result["per_run"])
    if temporary and clean:
        shutil.rmtree(work, ignore_errors=True)
    elif not clean:
        print(f"runs that failed left their data and logs in {work}", file=sys.stderr)
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
