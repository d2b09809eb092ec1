"""What the built-in wordings cost: seconds per `ledger add` on a new ledger as `ledger init`
makes it (the built-in relation wordings, the defaults), against a ledger made with
`ledger init --no-wordings` whose adds take `rewrites` 0 (each edit trained on its own prompt
only), on the same facts in
the same run, alternating fact by fact so machine noise hits both alike. Each fact is added
alone on rev-1 (a checkout between adds), through `Ledger.add`: precheck, training,
measurement and commit.

Prints one JSON line: {"op": "fresh_add", "median_s", "baseline_median_s", "ratio", ...};
the goal is a ratio of at most 2. Per-fact lines go to stderr.

    .venv/bin/python bench/fresh_add.py [-n 8] [--data bench/data/everyday-dev.json] [--threads 2]
        [--config JSON] [--baseline-config JSON]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ledger import BaftConfig, InputError, Ledger, load_facts  # noqa: E402


def fact_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that adds the facts of a file (this one and bench/base_rows.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default=str(ROOT / "bench" / "data" / "everyday-dev.json"),
                    help="a fact file (any format `ledger add` reads)")
    ap.add_argument("-n", type=int, default=8, help="facts to add (default 8)")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def facts_of(args: argparse.Namespace) -> list:
    """args.n facts of args.data from args.offset, with torch set to args.threads."""
    torch.set_num_threads(args.threads)
    return load_facts(args.data)[args.offset: args.offset + args.n]


def main() -> None:
    ap = fact_arguments(__doc__.splitlines()[0])
    ap.add_argument("--baseline-config", type=json.loads, default={}, metavar="JSON",
                    help="BaftConfig fields of the baseline adds (default: the same defaults but "
                         "rewrites 0)")
    ap.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                    help="BaftConfig fields of the adds on the ledger with the built-in wordings "
                         "(default: the defaults)")
    args = ap.parse_args()
    facts = facts_of(args)
    cfg, base_cfg = BaftConfig.from_dict(args.config), BaftConfig.from_dict({"rewrites": 0, **args.baseline_config})
    seconds: dict[str, list[float]] = {"builtin": [], "none": []}
    steps: dict[str, list[int]] = {"builtin": [], "none": []}
    wording_rows: list[int] = []
    with tempfile.TemporaryDirectory() as d:
        ledgers = {"builtin": Ledger.init(f"sqlite:///{d}/builtin.db"),
                   "none": Ledger.init(f"sqlite:///{d}/none.db", wordings=False)}
        for lg in ledgers.values():
            lg.model_at()
        for fact in facts:
            for name, lg in ledgers.items():
                lg.checkout("rev-1")
                t = time.perf_counter()
                try:
                    [res] = lg.add([fact], cfg if name == "builtin" else base_cfg)
                except InputError as e:     # the base model already answers it
                    print(json.dumps({"skipped": fact.prompt, "why": str(e)}), file=sys.stderr, flush=True)
                    break
                seconds[name].append(time.perf_counter() - t)
                steps[name].append(res.stats["steps"])
                if name == "builtin":
                    wording_rows.append(res.stats.get("n_wording_rows", 0))
                print(json.dumps({"prompt": fact.prompt, "ledger": name, "seconds": round(seconds[name][-1], 3),
                                  "steps": res.stats["steps"], "wording_rows": res.stats.get("n_wording_rows", 0)}),
                      file=sys.stderr, flush=True)
        for lg in ledgers.values():
            lg.close()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"op": "fresh_add", "n": len(seconds["builtin"]), "median_s": round(med["builtin"], 3),
                      "baseline": "ledger init --no-wordings, same facts, same run",
                      "config": args.config, "baseline_config": args.baseline_config, "baseline_median_s": round(med["none"], 3),
                      "ratio": round(med["builtin"] / med["none"], 3), "goal_ratio": 2.0,
                      "mean_steps": round(statistics.mean(steps["builtin"]), 1),
                      "baseline_mean_steps": round(statistics.mean(steps["none"]), 1),
                      "mean_wording_rows": round(statistics.mean(wording_rows), 1),
                      "data": Path(args.data).name, "threads": args.threads, "git_commit": commit,
                      "date": time.strftime("%Y-%m-%d")}), flush=True)


if __name__ == "__main__":
    main()
