"""Single editing on the real default model: each of the first N CounterFact facts of a split
is added alone on top of the base revision (checkout rev-1, then `Ledger.add`: the full
product path, database writes included), in one fresh SQLite ledger.

Prints one JSON line per fact and a summary line: the mean EasyEdit metrics after the edit,
the same metrics of the unedited base model on the same facts (the baseline measured in the
same run), and the median seconds per edit. By default the fact's own rephrase and locality
prompts are held out of training (they are the evaluation); --train-on-eval-prompts trains on
them as `ledger add` does for a user's fact.

    .venv/bin/python bench/single_edit.py [--data ../shared/data/counterfact/counterfact-edit-1k.json] [-n 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledger import BaftConfig, InputError, Ledger  # noqa: E402
from ledger.evaluate import mean_metrics, measure, score  # noqa: E402
from ledger.facts import facts_from_records  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit-1k.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--method", default="baft", choices=["baft", "reft"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-on-eval-prompts", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = json.loads(Path(args.data).read_text())[args.offset: args.offset + args.n]
    facts = facts_from_records(records)
    held_out = not args.train_on_eval_prompts
    cfg = BaftConfig(method=args.method, train_on_rephrases=not held_out, train_on_locality=not held_out)
    rows, base_rows, seconds, skipped = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        lg = Ledger.init(f"sqlite:///{d}/ledger.db")
        for i, fact in enumerate(facts):
            lg.checkout("rev-1")
            base = lg.model_at()
            pre = measure(base.model, base.tokenizer, fact)
            base_rows.append(score(pre, pre))
            t = time.perf_counter()
            try:
                [res] = lg.add([fact], cfg)
            except InputError as e:   # the model already gives target_new: `ledger add` refuses
                skipped.append(fact.case_id)
                base_rows.pop()
                print(json.dumps({"i": args.offset + i, "case_id": fact.case_id, "skipped": str(e)}), flush=True)
                continue
            seconds.append(time.perf_counter() - t)
            rows.append(res.metrics)
            print(json.dumps({"i": args.offset + i, "case_id": fact.case_id, "revision": res.revision,
                              "seconds": round(seconds[-1], 2), "steps": res.stats["steps"], **res.metrics}),
                  flush=True)
        lg.close()
    summary = {"summary": True, "model": "SmolLM2-135M-Instruct", "data": Path(args.data).name,
               "offset": args.offset, "n": len(facts), "n_edited": len(rows), "skipped_already_known": skipped, "method": args.method, "held_out_eval_prompts": held_out,
               "threads": args.threads,
               "after_edit": {k: round(v, 4) for k, v in mean_metrics(rows).items()},
               "baseline_unedited": {k: round(v, 4) for k, v in mean_metrics(base_rows).items()},
               "median_seconds_per_edit": round(statistics.median(seconds), 2),
               "mean_seconds_per_edit": round(statistics.mean(seconds), 2)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
