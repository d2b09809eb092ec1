"""Checkout at 1,000 edits: `Ledger.checkout(rev)` plus the first generation, against the base
model's own load plus first generation, both from the converted SmolLM2 cache, each repeat in
a fresh process (so no model, block or import cache is shared between repeats), base and
ledger interleaved.

A SQLite ledger is built on SmolLM2-135M-Instruct with N synthetic edits (random tensors of
the real shapes, rank 4, spread over layers like `ledger add` spreads them), written through
the storage code one revision each (see synthetic.py).

Prints JSON lines: `base` (load_base of the converted SmolLM2 cache + the first generation)
and `ledger_checkout` (Ledger.open + checkout(rev) + the first generation, which composes the
revision: base load with the fingerprint check, active set, blob load, fuse, attach), each with
the median seconds from before the model load to the end of the first 32-token greedy
generation, the base model's median from the same run, and their ratio (goal: <= 1.2 at
1,000 edits); `phases_median_s` holds the median seconds of each phase (a profile of where
the time goes; nested phases are named parent.child).

    .venv/bin/python bench/checkout.py [--edits 1000] [--repeats 7] [--threads 1]
    .venv/bin/python bench/checkout.py --ledger URL [--rev REV]    # a ledger of trained edits
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "The capital of France is"
NEW_TOKENS = 32

# Functions timed in the child (module, class or None, attribute, label); a name missing
# from the code is skipped. Nested phases are named parent.child.
PHASES = [
    ("ledger.models", None, "load_base", "model_load"),
    ("ledger.models", None, "fingerprint", "model_load.fingerprint"),
    ("ledger.api", "Ledger", "checkout", "checkout_db"),
    ("ledger.store.revisions", None, "active_set", "active_set"),
    ("ledger.handle", "Handle", "load_blocks", "load_blocks"),
    ("ledger.store.blobs", None, "decode", "load_blocks.blob_decode"),
    ("ledger.compose", None, "fuse", "fuse"),
    ("ledger.compose", None, "attach_sites", "attach"),
]


def _instrument(phases: dict[str, float]) -> None:
    import importlib
    for mod_name, cls, attr, label in PHASES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        owner = getattr(mod, cls) if cls else mod
        fn = getattr(owner, attr, None)
        if fn is None:
            continue

        def timed(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                phases[_label] = phases.get(_label, 0.0) + time.perf_counter() - t
        functools.update_wrapper(timed, fn)
        setattr(owner, attr, timed)
        if cls is None:   # modules that imported the function by name hold their own reference
            for m in list(sys.modules.values()):
                if getattr(m, "__name__", "").startswith("ledger") and m is not mod \
                        and getattr(m, attr, None) is fn:
                    setattr(m, attr, timed)


def _generate(model, tok) -> float:
    import torch
    t = time.perf_counter()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] - enc["input_ids"].shape[1] == NEW_TOKENS
    return time.perf_counter() - t


def child(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    # Both sides import the same modules before the clock starts.
    import ledger.api  # noqa: F401
    import ledger.models
    phases: dict[str, float] = {}
    _instrument(phases)
    t0 = time.perf_counter()
    if args.child == "base":
        base = ledger.models.load_base(args.model) if args.model else ledger.models.load_base()
        phases["generate"] = _generate(base.model, base.tokenizer)
    else:
        from ledger import Ledger
        t = time.perf_counter()
        lg = Ledger.open(args.db)
        phases["open"] = time.perf_counter() - t
        lg.checkout(args.rev)
        composed = lg.model_at()                 # what `generate` composes first
        assert composed.revision == lg.resolve(args.rev)
        phases["generate"] = _generate(composed.model, composed.tokenizer)
        lg.close()
    total = time.perf_counter() - t0
    print(json.dumps({"total_s": total, "phases": phases}))


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    if kind == "ledger":
        cmd += ["--db", args.db, "--rev", args.rev]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", choices=["base", "ledger"])
    ap.add_argument("--db")
    ap.add_argument("--rev")
    ap.add_argument("--model", help=argparse.SUPPRESS)    # the base model of the children (--ledger's)
    ap.add_argument("--ledger", metavar="URL", default=None,
                    help="check out --rev (default HEAD) of this ledger of trained edits instead of building "
                         "one of synthetic edits")
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch
    torch.set_num_threads(args.threads)
    from ledger import Ledger
    from ledger import names
    from ledger.store import revisions as revs
    from ledger.models import cache_dir
    from synthetic import write_edits

    tmp = Path(tempfile.mkdtemp(prefix="bench-checkout-"))
    try:
        if args.ledger:
            args.db = args.ledger
            with Ledger.open(args.db) as lg:
                last = lg.resolve(args.rev or "HEAD")
                args.model = lg.handle.settings()["base_model"]
                with lg.engine.connect() as conn:
                    args.edits = len(revs.active_set(conn, last))
            args.rev = names.rev_name(last)
            print(json.dumps({"op": "trained", "edits": args.edits, "revision": args.rev}), flush=True)
        else:
            args.db = f"sqlite:///{tmp / 'ledger.db'}"
            t = time.perf_counter()
            lg = Ledger.init(args.db, author="bench")
            d, n_layers = lg.base.hidden_size, len(lg.base.layers)
            last = write_edits(lg.engine, args.edits, d, n_layers)
            with lg.engine.connect() as conn:
                assert len(revs.active_set(conn, last)) == args.edits
            lg.close()
            args.rev = names.rev_name(last)
            print(json.dumps({"op": "build", "edits": args.edits, "revision": args.rev,
                              "seconds": round(time.perf_counter() - t, 1)}), flush=True)
        run_child("ledger", args)                # warm-up: the OS page cache of model and database
        modes = ["ledger_checkout"]
        results: dict[str, list[dict]] = {m: [] for m in ["base"] + modes}
        for _ in range(args.repeats):
            results["base"].append(run_child("base", args))
            for m in modes:
                results[m].append(run_child("ledger", args))
        base_s = statistics.median(r["total_s"] for r in results["base"])
        for m in ["base"] + modes:
            total = statistics.median(r["total_s"] for r in results[m])
            phases = sorted({k for r in results[m] for k in r["phases"]})
            print(json.dumps({
                "n_edits": 0 if m == "base" else args.edits, "edits": "trained" if args.ledger else "synthetic",
                "mode": m, "seconds": round(total, 3),
                "baseline_seconds": round(base_s, 3), "ratio": round(total / base_s, 3),
                "goal_ratio": 1.2, "repeats": args.repeats, "threads": args.threads,
                "phases_median_s": {k: round(statistics.median(r["phases"].get(k, 0.0) for r in results[m]), 4)
                                    for k in phases}}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
