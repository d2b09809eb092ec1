"""Start-up time of the command line: `ledger --help`, `ledger log` and `ledger show` on a
1,000-revision SQLite ledger (bench/history.py's synthetic history), each a fresh process,
against `python -c pass` in the same run. Repeats are interleaved (one of each command per
round), so load on the machine hits every command alike; medians over the rounds.
`--engines sqlite,postgresql` measures the same on a PostgreSQL ledger too (the server of
bench/history.py).

    .venv/bin/python bench/startup.py [--revisions 1000] [--repeats 7] [--engines sqlite,postgresql]

The commands run as a user's do: the `ledger` console script of this interpreter's
environment (`python -m cli.main` where there is none), with bytecode caching on, after one
untimed run of each that writes the bytecode of the ledger's own modules.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from history import build, with_database  # noqa: E402  (bench/history.py: the synthetic history)

GOAL_S = 0.3


def ledger_command() -> list[str]:
    script = Path(sys.executable).parent / "ledger"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def wall_s(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=HERE.parent)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.decode()[-2000:]}")
    return secs


def measure(url: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, list[float]]:
    """Seconds of each command per round, on a ledger built at `url`."""
    build(url, args.revisions, args.edits)
    ledger = [*ledger_command(), "--db", url]
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "ledger --help": [*ledger, "--help"],
                "ledger log": [*ledger, "log"],
                "ledger show": [*ledger, "show"]}
    for argv in commands.values():   # untimed: writes bytecode, warms the file cache
        wall_s(argv, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, argv in commands.items():
            times[name].append(wall_s(argv, env))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revisions", type=int, default=1_000)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--engines", default="sqlite", help="comma-separated: sqlite, postgresql")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "LEDGER_DB")}
    for engine in args.engines.split(","):
        times = with_database(engine, lambda url: measure(url, args, env))
        base = statistics.median(times["python -c pass"])
        for name, ts in times.items():
            if name == "python -c pass":
                continue
            median = statistics.median(ts)
            print(json.dumps({"op": name, "engine": engine, "revisions": args.revisions, "repeats": args.repeats,
                              "median_s": round(median, 3), "min_s": round(min(ts), 3),
                              "baseline": "python -c pass", "baseline_median_s": round(base, 3),
                              "ratio": round(median / base, 2), "minus_baseline_s": round(median - base, 3),
                              "goal_s": GOAL_S, "meets_goal": median <= GOAL_S}), flush=True)


if __name__ == "__main__":
    main()
