"""`ledger ui` page times at scale: the history, a revision and a diff page of a ledger of
100,000 revisions and 10,000 active edits (bench/history.py's synthetic ledger, built through
the storage code `ledger add` uses), against the same pages of a 1,000-revision ledger built
the same way in the same run, on SQLite and PostgreSQL.

A page's time is one GET through Starlette's test client, in process: routing, the library
calls and the rendering of the whole HTML page, not the network. Each page is asked for
`--repeats` times at random revisions; prints one JSON line per (engine, page) with the median
milliseconds at full size, the baseline's and their ratio. Goal: every page <= 200 ms median.

    .venv/bin/python bench/web.py [--revisions 100000] [--edits 10000] [--engines sqlite,postgresql]
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from history import at_both_sizes, scale_arguments  # noqa: E402  (bench/history.py)
from starlette.testclient import TestClient  # noqa: E402

from ledger import Ledger  # noqa: E402
from ledger.web import create_app  # noqa: E402

GOAL_MS = 200


def pages(n_revisions: int, rng: random.Random) -> dict[str, callable]:
    """Each page's URL maker: a random revision each time (a diff: two half the history apart)."""
    gap = n_revisions // 2
    return {
        "history_head": lambda: "/",
        "history_deep": lambda: f"/?rev=rev-{rng.randint(2, n_revisions)}",
        "revision": lambda: f"/rev/rev-{rng.randint(2, n_revisions)}",
        "revision_active_page_last": None,    # filled per ledger: the last page of HEAD's active edits
        "diff_half_history_apart": lambda: (lambda a: f"/diff?a=rev-{a}&b=rev-{a + gap}")(
            rng.randint(2, n_revisions - gap)),
        "edit": lambda: f"/edit/edit-{rng.randint(1, 10)}",
    }


def measure(url: str, n_revisions: int, repeats: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    lg = Ledger.open(url)
    client = TestClient(create_app(lg), base_url="http://127.0.0.1:8000")
    urls = pages(n_revisions, rng)
    n_active = lg.show("HEAD").n_active
    last = max(1, -(-n_active // 100))
    urls["revision_active_page_last"] = lambda: f"/rev/HEAD?page={last}"
    out = {}
    for name, make in urls.items():
        client.get(make())                   # first request: templates compiled, connections opened
        times = []
        for _ in range(repeats):
            u = make()
            t = time.perf_counter()
            r = client.get(u)
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, (u, r.status_code, r.text[-300:])
        out[name] = statistics.median(times)
    lg.close()
    return out


def main() -> None:
    args = scale_arguments(__doc__.splitlines()[0], repeats=20)
    torch.set_num_threads(1)
    for engine_name in args.engines.split(","):
        base, full_secs, full = at_both_sizes(engine_name, args, measure)
        print(json.dumps({"engine": engine_name, "op": "build", "revisions": args.revisions, "edits": args.edits,
                          "seconds": round(full_secs, 1)}), flush=True)
        for page, ms in full.items():
            print(json.dumps({"engine": engine_name, "page": page, "revisions": args.revisions,
                              "median_ms": round(ms, 1), "baseline_median_ms": round(base[page], 1),
                              "baseline_revisions": args.baseline_revisions,
                              "ratio": round(ms / base[page], 2) if base[page] else None,
                              "goal_ms": GOAL_MS, "meets_goal": ms <= GOAL_MS}), flush=True)


if __name__ == "__main__":
    main()
