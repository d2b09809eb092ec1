"""Edit speed: seconds per `ledger add` of one CounterFact fact inside an open ledger (the
product path: precheck, training, measurement, database commit), with `ledger add`'s default
settings, against the plain training path measured in the same run on the same facts
(plain.PlainLogits: the whole model forward and backward at every step, the output head at
every position, float32). The fast path in the other training precision (the `train_dtype`
field of BaftConfig) is measured alongside. Each fact is added alone on the base revision; the paths alternate fact
by fact so machine noise hits them alike.

The fast path with each row run whole (no recorded prefix before the rows) is
measured alongside too, as `whole_rows_median_s`. Then the cost of one step against its
number of tokens (`step_cost`): the blocks above the edited one, forward and backward, on M
tokens of one sequence, for several M, with the least-squares line through them (the
intercept is what a step costs whatever its tokens). Then batch throughput: N facts added in one call, one revision per fact (--batch 1) and K
facts trained together per revision (--batch K), as edits per minute.

Prints JSON lines: {"op", "median_s", "baseline_median_s", "ratio", ...}.

    .venv/bin/python bench/edit_speed.py [-n 10] [--batch-n 100] [--batch-k 10] [--threads 2] [--step-cost]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledger import BaftConfig, InputError, Ledger  # noqa: E402
from ledger.baft import default_layer, fast as fast_path, trainer  # noqa: E402
from ledger.baft.plain import PlainLogits  # noqa: E402
from ledger.facts import facts_from_records  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit-1k.json"


def timed_add(lg: Ledger, facts, cfg: BaftConfig, batch: int = 1):
    t = time.perf_counter()
    results = lg.add(facts, cfg, batch=batch)
    return time.perf_counter() - t, results


@contextmanager
def whole_rows():
    """The trainer as it was before the recorded prefix: every row run from its first token."""
    found = fast_path.prefix_split_works
    fast_path.prefix_split_works = lambda model: False
    try:
        yield
    finally:
        fast_path.prefix_split_works = found


@contextmanager
def plain_path():
    """The trainer on its plain path: the whole model forward and backward at every step."""
    found = trainer.FastLogits
    trainer.FastLogits = PlainLogits
    try:
        yield
    finally:
        trainer.FastLogits = found


def step_cost(model, layer: int, sizes=(20, 40, 60, 80, 120, 160, 240), repeats: int = 5) -> dict:
    """Median seconds of forward + backward through the decoder blocks above `layer` on M
    tokens (one causal sequence, random states; only the input needs a gradient, as in
    training), per M, and the least-squares line through them."""
    base = model.base_model
    blocks = list(base.layers)[layer + 1:]
    d = model.config.hidden_size
    out = {}
    for m in sizes:
        times = []
        for _ in range(repeats):
            h = torch.randn(1, m, d, requires_grad=True)
            pos = torch.arange(m)[None]
            emb = base.rotary_emb(h, pos)
            mask = torch.ones(m, m, dtype=torch.bool).tril()[None, None]
            t = time.perf_counter()
            x = h
            for blk in blocks:
                x = blk(x, attention_mask=mask, position_embeddings=emb, position_ids=pos)
            x.sum().backward()
            times.append(time.perf_counter() - t)
        out[m] = statistics.median(times)
    xs, ys = list(out), list(out.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"seconds_by_tokens": {str(k): round(v, 4) for k, v in out.items()},
            "fixed_s": round(my - slope * mx, 4), "per_token_ms": round(1000 * slope, 3),
            "blocks": len(blocks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("-n", type=int, default=10, help="facts for the single-add timing")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--batch-n", type=int, default=100, help="facts for the throughput run (0: skip)")
    ap.add_argument("--batch-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-cost", action="store_true", help="also time one step against its tokens")
    ap.add_argument("--wordings", default=str(DEFAULT_DATA.parent / "counterfact-train.json"), metavar="PATH|none",
                    help="relation wordings imported into each ledger, as a user's ledger would hold them "
                         "(default: counterfact-train.json beside the data; none: no wordings)")
    args = ap.parse_args()
    wordings = None if args.wordings == "none" else Path(args.wordings)
    torch.set_num_threads(args.threads)
    records = json.loads(Path(args.data).read_text())
    facts = facts_from_records(records[args.offset: args.offset + args.n])
    fast, plain = BaftConfig(), BaftConfig(train_dtype="float32")
    # The other precision of the fast path, measured alongside (BaftConfig.train_dtype).
    other_dtype = "bfloat16" if fast.train_dtype == "float32" else "float32"
    paths = {"fast": fast, f"fast_{other_dtype}": BaftConfig(train_dtype=other_dtype), "plain": plain,
             "fast_whole_rows": fast}
    common = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "data": Path(args.data).name,
              "wordings": wordings.name if wordings else None,
              "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as d:
        lg = Ledger.init(f"sqlite:///{d}/ledger.db")
        if wordings:
            lg.import_wordings(wordings)
        lg.model_at()
        # warm-up (allocator, kernels), not counted
        timed_add(lg, facts_from_records(records[-1:]), fast)
        lg.checkout("rev-1")
        rows = {k: [] for k in paths}
        steps = {k: [] for k in paths}
        train_s = {k: [] for k in paths}
        wrows: list[int] = []
        for fact in facts:
            for name, cfg in paths.items():
                lg.checkout("rev-1")
                try:
                    with whole_rows() if name == "fast_whole_rows" else plain_path() if name == "plain" \
                            else nullcontext():
                        s, [r] = timed_add(lg, [fact], cfg)
                except InputError:
                    break      # the model already says target_new: nothing to edit
                rows[name].append(s)
                steps[name].append(r.stats["steps"])
                train_s[name].append(r.stats["seconds"])
                if name == "fast":
                    wrows.append(r.stats.get("n_wording_rows", 0))
                print(json.dumps({"case_id": fact.case_id, "path": name, "seconds": round(s, 3),
                                  "train_seconds": r.stats["seconds"], "steps": r.stats["steps"]}),
                      file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in rows.items()}
        per_step = {k: statistics.median([t / max(1, n) for t, n in zip(train_s[k], steps[k])]) for k in rows}
        print(json.dumps({"op": "add_one_fact", "n": len(rows["fast"]), "median_s": round(med["fast"], 3),
                          "baseline": "plain training path, same facts, same run",
                          "baseline_median_s": round(med["plain"], 3), "ratio": round(med["fast"] / med["plain"], 3),
                          "median_s_per_step": round(per_step["fast"], 3),
                          "baseline_median_s_per_step": round(per_step["plain"], 3),
                          "mean_steps": round(statistics.mean(steps["fast"]), 1),
                          "median_train_s": round(statistics.median(train_s["fast"]), 3),
                          "mean_wording_rows": round(statistics.mean(wrows), 1) if wrows else 0,
                          "train_dtype": fast.train_dtype,
                          f"{other_dtype}_median_s": round(med[f"fast_{other_dtype}"], 3),
                          f"{other_dtype}_median_s_per_step": round(per_step[f"fast_{other_dtype}"], 3),
                          f"{other_dtype}_mean_steps": round(statistics.mean(steps[f"fast_{other_dtype}"]), 1),
                          "whole_rows_median_s": round(med["fast_whole_rows"], 3),
                          "whole_rows_ratio": round(med["fast"] / med["fast_whole_rows"], 3),
                          "goal_s": 1.5, **common}), flush=True)
        if args.step_cost:
            model = lg.model_at().model
            layer = fast.layer if fast.layer is not None else default_layer(len(model.base_model.layers))
            print(json.dumps({"op": "step_cost", "layer": layer, **step_cost(model, layer), **common}), flush=True)
        lg.close()

    if args.batch_n:
        batch_facts = facts_from_records(records[args.offset: args.offset + args.batch_n])
        out = {}
        for k in (1, args.batch_k):
            with tempfile.TemporaryDirectory() as d:
                lg = Ledger.init(f"sqlite:///{d}/ledger.db")
                if wordings:
                    lg.import_wordings(wordings)
                lg.model_at()
                # facts the base already answers are refused as a whole file: leave them out
                keep = []
                for f in batch_facts:
                    try:
                        lg._precheck([f])
                        keep.append(f)
                    except InputError:
                        pass
                s, results = timed_add(lg, keep, fast, batch=k)
                out[k] = (len(results), s)
                lg.close()
        n1, s1 = out[1]
        nk, sk = out[args.batch_k]
        print(json.dumps({"op": "add_file", "n_facts": n1, "edits_per_minute_batch_1": round(60 * n1 / s1, 2),
                          f"edits_per_minute_batch_{args.batch_k}": round(60 * nk / sk, 2),
                          "ratio": round((nk / sk) / (n1 / s1), 3), **common}), flush=True)


if __name__ == "__main__":
    main()
