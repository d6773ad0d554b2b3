"""Every benchmark in one command, one table: what ``benchmarks/README.md`` shows.

    benchmarks/run-all [--size small|full] [--only proxy,k8s] [--skip v6node]
                       [--timeout 300] [--update-readme]

Runs each benchmark whose peers CI builds (``scripts/setup-peers``) as its own process,
one after another, with sizes that keep the whole run short (``small``, the default:
about 10 minutes on an idle 2-CPU machine) or the benchmarks' own defaults (``full``:
much longer; ``v6node_compare``'s bursts alone take most of an hour). ``v6node`` runs only
when its vantage6-node venv exists. Every statistic a benchmark prints through
``benchmarks/stats.py`` is collected (:data:`benchmarks.stats.RESULTS_ENV`), and the table
— date, machine, load average before and after, commit, then median, p95, max and ratio
per measure — is printed and, with ``--update-readme``, written between the ``run-all``
markers of ``benchmarks/README.md``. A benchmark that fails or times out is listed with
the reason and its log; the others still run.

The machine matters: fill the README from an idle machine only (``uptime``'s load average
is in the table for that reason).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.stats import RESULTS_ENV  # noqa: E402

V6NODE_VENV = Path(os.environ.get("V6NODE_VENV", Path.home() / ".cache/fednode/v6node-venv"))
BEGIN, END = "<!-- run-all: begin -->", "<!-- run-all: end -->"


@dataclass(frozen=True)
class Benchmark:
    key: str
    script: str
    small: tuple[str, ...]
    full: tuple[str, ...] = ()
    #: Why it cannot run here (checked before starting it); None: it can.
    missing: str | None = None


def benchmarks() -> list[Benchmark]:
    v6 = None if (V6NODE_VENV / "bin/python").exists() else f"no {V6NODE_VENV}"
    return [
        Benchmark("proxy", "proxy_throughput.py", ("--quick", "--rounds", "3"), ("--rounds", "3")),
        Benchmark("podman", "podman_latency.py", ("--runs", "15")),
        Benchmark("k8s", "k8s_executor.py", ("--runs", "200")),
        Benchmark("dispatch", "node_dispatch.py", ("--in-flight", "50", "--runs", "10")),
        Benchmark("latency", "node_latency.py", ("--runs", "15")),
        Benchmark("real-worker", "real_worker.py", ("--runs", "5")),
        Benchmark("v6node", "v6node_compare.py", ("--runs", "5", "--bursts", "20"), missing=v6),
    ]


@dataclass
class Outcome:
    benchmark: Benchmark
    status: str  # "ok", "failed (exit N)", "timed out", "skipped: why"
    seconds: float = 0.0
    log: Path | None = None
    rows: list[dict[str, object]] = field(default_factory=list)


def run(bench: Benchmark, args: argparse.Namespace, workdir: Path) -> Outcome:
    if bench.missing:
        return Outcome(bench, f"skipped: {bench.missing}")
    log = workdir / f"{bench.key}.log"
    results = workdir / f"{bench.key}.jsonl"
    argv = [
        sys.executable,
        str(REPO / "benchmarks" / bench.script),
        *(bench.small if args.size == "small" else bench.full),
    ]
    env = {**os.environ, RESULTS_ENV: str(results)}
    print(f"==> {bench.key}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = process.wait(timeout=args.timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the benchmark and the peers it started
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            status = f"timed out after {args.timeout:g} s"
    seconds = time.monotonic() - started
    rows = (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )
    if status != "ok":
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        status += ": " + " | ".join(line.strip()[:160] for line in tail)
    print(f"    {status.splitlines()[0]} in {seconds:.0f} s, {len(rows)} rows (log: {log})")
    return Outcome(bench, status, seconds, log, rows)


def number(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as info:  # noqa: PTH123
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{socket.gethostname()}, {os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB, "
        f"{platform.system()} {platform.release()}"
    )


def commit() -> str:
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def table(outcomes: list[Outcome], header: str) -> str:
    lines = [
        header,
        "",
        "| benchmark | measure | median | p95 | max | n | unit | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        name = outcome.benchmark.script.removesuffix(".py")
        if outcome.status != "ok":
            lines.append(f"| {name} | {outcome.status.replace('|', '/')} | | | | | | |")
        for row in outcome.rows:
            lines.append(
                f"| {name} | {row['name']} | {number(row['median'])} | {number(row['p95'])} "
                f"| {number(row['max'])} | {row['n']} | {row['unit']} | {row['ratio']} |"
            )
    return "\n".join(lines)


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content and END in content:
        head, _, rest = content.partition(BEGIN)
        _, _, tail = rest.partition(END)
        content = head + block + tail
    else:
        content = content.rstrip("\n") + f"\n\n### `benchmarks/run-all`\n\n{block}\n"
    readme.write_text(content)


def main() -> None:
    all_benchmarks = benchmarks()
    keys = [b.key for b in all_benchmarks]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--only", help=f"comma-separated, of: {','.join(keys)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per benchmark")
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--readme", type=Path, default=REPO / "benchmarks" / "README.md")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else set(keys)
    wanted -= set(args.skip.split(","))
    if unknown := wanted - set(keys):
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {keys}")

    workdir = Path(tempfile.mkdtemp(prefix="fednode-run-all-"))
    load_before = os.getloadavg()
    started = datetime.now(UTC)
    outcomes = [run(b, args, workdir) for b in all_benchmarks if b.key in wanted]
    load_after = os.getloadavg()
    minutes = (datetime.now(UTC) - started).total_seconds() / 60
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min, size `{args.size}`, commit "
        f"{commit()}; {machine()}; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.2f}' for x in load_after)}. Median, p95 and max as each benchmark "
        f"printed them; ratio: where the benchmark measured a real baseline in the same run."
    )
    text = table(outcomes, header)
    print("\n" + text)
    print(f"\nlogs: {workdir}")
    if args.update_readme:
        update_readme(args.readme, text)
        print(f"updated {args.readme}")
    if any(o.status != "ok" and not o.status.startswith("skipped") for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
