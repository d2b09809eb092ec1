"""History at scale: a ledger of 100,000 revisions and 10,000 active edits, on SQLite and on
PostgreSQL, built through the same storage code as `ledger add` (blobs.put, the edits
table, revisions.append), with small synthetic tensors instead of trained ones.

Prints one JSON line per (engine, operation): the median milliseconds at full size, the
median on a small ledger (1,000 revisions) built the same way in the same run as the
baseline, and their ratio (1.0 = the cost does not grow with history). Goal: every read
<= 50 ms median at full size.

    .venv/bin/python bench/history.py [--revisions 100000] [--edits 10000] [--engines sqlite,postgresql]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledger import Ledger  # noqa: E402
from ledger.records import tensor_norm  # noqa: E402
from ledger.store import edits, refs, revisions as revs  # noqa: E402
from ledger.store import blobs  # noqa: E402
from ledger.store.engine import make_engine, upgrade, write_transaction  # noqa: E402
from ledger.store.schema import Edit  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def build(url: str, n_revisions: int, n_edits: int, seed: int = 0) -> float:
    """Write the synthetic history; return seconds taken."""
    rng = random.Random(seed)
    engine = make_engine(url, create_dir=True)
    upgrade(engine)
    started = time.perf_counter()
    d, r = 64, 2
    with write_transaction(engine) as conn:
        root = revs.append(conn, parent_id=None, operation="init", author="bench", message="base", changes=[])
        refs.set_ref(conn, "main", "branch", root.id, "bench", "init")
        refs.set_head(conn, branch="main", rev_id=root.id, actor="bench", reason="init")
    active: set[int] = set()
    inactive: list[int] = []
    parent = root.id
    n_edits_made = 0
    batch = 1000
    while parent < n_revisions:
        with write_transaction(engine) as conn:
            for _ in range(min(batch, n_revisions - parent)):
                # First the adds, then churn: retire a random edit or bring one back.
                if n_edits_made < n_edits and (len(active) < n_edits or not inactive):
                    g = torch.Generator().manual_seed(n_edits_made)
                    t = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in
                         (("R", (r, d)), ("W", (r, d)), ("b", (r,)), ("U", (r, d)), ("c", (r,)))}
                    address = blobs.put(conn, blobs.encode(t))
                    subj = f"Subject {n_edits_made}"
                    e = Edit(fact_json=json.dumps({"prompt": f"{subj} lives in", "target_new": "Rome",
                                                   "subject": subj}), subject=subj, relation="{} lives in",
                             method="baft", layer=n_edits_made % 4, rank=r, config_json="{}",
                             blob_sha256=address, metrics_json='{"reliability": 1.0}',
                             stats_json=json.dumps({"tensor_norm": tensor_norm(t)}),
                             versions_json="{}", trained_on=parent, author="bench", created_at=blobs.now(),
                             content_hash="")
                    eid = conn.execute(Edit.__table__.insert().values(
                        {c.name: getattr(e, c.name) for c in Edit.__table__.columns if c.name != "id"})
                    ).inserted_primary_key[0]
                    e.id = eid
                    conn.execute(Edit.__table__.update().where(Edit.id == eid).values(content_hash=edits.edit_hash(e)))
                    n_edits_made += 1
                    changes = [(eid, "add")]
                elif inactive and (rng.random() < 0.5 or len(active) <= n_edits // 2):
                    eid = inactive.pop(rng.randrange(len(inactive)))
                    changes = [(eid, "add")]
                else:
                    eid = rng.choice(tuple(active))
                    changes = [(eid, "remove")]
                rev = revs.append(conn, parent_id=parent, operation="add", author="bench",
                                  message=f"change {parent}", changes=changes, parent_active=active)
                for e_, a in changes:
                    if a == "add":
                        active.add(e_)
                    else:
                        active.discard(e_)
                        inactive.append(e_)
                parent = rev.id
            refs.set_ref(conn, "main", "branch", parent, "bench", "bench")
    engine.dispose()
    return time.perf_counter() - started


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure(url: str, n_revisions: int, repeats: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    lg = Ledger.open(url)
    gap = n_revisions // 2
    out = {
        "log_last_20": median_ms(lambda: lg.log("HEAD", 20), repeats),
        "show": median_ms(lambda: lg.show(f"rev-{rng.randint(2, n_revisions)}"), repeats),
        "diff_half_history_apart": median_ms(
            lambda: lg.diff(*(lambda a: (f"rev-{a}", f"rev-{a + gap}"))(rng.randint(2, n_revisions - gap))),
            repeats),
    }
    with lg.engine.connect() as conn:
        out["active_set_random_revision"] = median_ms(
            lambda: revs.active_set(conn, rng.randint(1, n_revisions)), repeats)
    t = time.perf_counter()
    problems = lg.verify()
    secs = time.perf_counter() - t
    assert not problems, problems[:3]
    out["verify_revisions_per_s"] = n_revisions / secs
    lg.close()
    return out


def with_database(engine_name: str, fn):
    if engine_name == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            return fn(f"sqlite:///{d}/ledger.db")
    name = f"ledger_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        return fn(PG_ADMIN.rsplit("/", 1)[0] + "/" + name)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def scale_arguments(description: str, repeats: int) -> argparse.Namespace:
    """The options of a benchmark at history scale (this one and bench/web.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--revisions", type=int, default=100_000)
    ap.add_argument("--edits", type=int, default=10_000)
    ap.add_argument("--baseline-revisions", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--engines", default="sqlite,postgresql")
    return ap.parse_args()


def at_both_sizes(engine_name: str, args: argparse.Namespace, measure_fn) -> tuple[dict, float, dict]:
    """measure_fn(url, n_revisions, repeats) on a ledger of args.baseline_revisions and on one
    of args.revisions, each built with edits in the same proportion: (the baseline's figures,
    seconds to build the full ledger, the full ledger's figures)."""
    def run(url, n_rev, n_edits):
        secs = build(url, n_rev, n_edits)
        return secs, measure_fn(url, n_rev, args.repeats)
    base_edits = max(1, args.edits * args.baseline_revisions // args.revisions)
    _, base = with_database(engine_name, lambda u: run(u, args.baseline_revisions, base_edits))
    full_secs, full = with_database(engine_name, lambda u: run(u, args.revisions, args.edits))
    return base, full_secs, full


def main() -> None:
    args = scale_arguments(__doc__.splitlines()[0], repeats=30)
    torch.set_num_threads(1)
    for engine_name in args.engines.split(","):
        base, full_secs, full = at_both_sizes(engine_name, args, measure)
        print(json.dumps({"engine": engine_name, "op": "build", "revisions": args.revisions, "edits": args.edits,
                          "seconds": round(full_secs, 1), "revisions_per_s": round(args.revisions / full_secs, 1)}),
              flush=True)
        for op, value in full.items():
            unit = "per_s" if op.endswith("per_s") else "median_ms"
            row = {"engine": engine_name, "op": op, "revisions": args.revisions, unit: round(value, 3),
                   f"baseline_{unit}": round(base[op], 3), "baseline_revisions": args.baseline_revisions,
                   "ratio": round(value / base[op], 3) if base[op] else None}
            if unit == "median_ms":
                row["goal_ms"] = 50
                row["meets_goal"] = value <= 50
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
