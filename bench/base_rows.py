"""What reusing the base model's rows saves (ledger/baft/baserows.py): the same facts added one
after another to two new ledgers as `ledger init` makes them, in one process, alternating
fact by fact so machine noise hits both alike. One ledger reuses the base's continuations and
references wherever no active gate opens (the default); the other computes every row anew.
The edits must come out the same: every stored blob's sha256 is compared.

Prints one JSON line: {"op": "base_rows", "median_s", "baseline_median_s", "ratio",
"same_blobs", ...}; per-fact lines go to stderr.

    .venv/bin/python bench/base_rows.py [-n 8] [--data bench/data/everyday-dev.json] [--threads 2]
"""
from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ledger import InputError, Ledger  # noqa: E402
from fresh_add import fact_arguments, facts_of  # noqa: E402  (bench/fresh_add.py)


def blob_digest(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(save({k: v.contiguous() for k, v in sorted(tensors.items())})).hexdigest()


def main() -> None:
    args = fact_arguments(__doc__.splitlines()[0]).parse_args()
    facts = facts_of(args)
    seconds: dict[str, list[float]] = {"reuse": [], "anew": []}
    steps: dict[str, list[int]] = {"reuse": [], "anew": []}
    same = 0
    with tempfile.TemporaryDirectory() as d:
        ledgers = {"reuse": Ledger.init(f"sqlite:///{d}/reuse.db"), "anew": Ledger.init(f"sqlite:///{d}/anew.db")}
        ledgers["anew"].model_at().base_rows = None
        for fact in facts:
            digests = {}
            for name, lg in ledgers.items():
                t = time.perf_counter()
                try:
                    [res] = lg.add([fact])
                except InputError as e:     # the model already answers it
                    print(json.dumps({"skipped": fact.prompt, "why": str(e)}), file=sys.stderr, flush=True)
                    break
                seconds[name].append(time.perf_counter() - t)
                steps[name].append(res.stats["steps"])
                edit_id = int(res.edit.split("-")[1])
                digests[name] = blob_digest(lg.handle.blocks[edit_id].tensors)
                print(json.dumps({"ledger": name, "fact": fact.prompt, "seconds": round(seconds[name][-1], 3),
                                  "steps": res.stats["steps"]}), file=sys.stderr, flush=True)
            if len(digests) == 2:
                same += digests["reuse"] == digests["anew"]
        hits = ledgers["reuse"].model_at().base_rows.hits
        for lg in ledgers.values():
            lg.close()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"op": "base_rows", "n": len(seconds["anew"]), "median_s": round(med["reuse"], 3),
                      "baseline": "the same adds computing every row anew, same run",
                      "baseline_median_s": round(med["anew"], 3), "ratio": round(med["reuse"] / med["anew"], 3),
                      "total_s": round(sum(seconds["reuse"]), 1), "baseline_total_s": round(sum(seconds["anew"]), 1),
                      "same_blobs": same, "mean_steps": round(statistics.mean(steps["reuse"]), 1),
                      "hits": hits, "threads": args.threads, "data": Path(args.data).name,
                      "date": time.strftime("%Y-%m-%d"), "git_commit": commit,
                      "cmd": f"base_rows.py -n {args.n} --offset {args.offset} --threads {args.threads}"}), flush=True)


if __name__ == "__main__":
    main()
