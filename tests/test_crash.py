"""Crash safety: `ledger add` SIGKILLed at 20 random points of its run (start-up, training,
blob and revision writes). Afterwards the ledger verifies, HEAD is a revision that was
committed whole, and no row is half-written or unreferenced."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from ledger import Ledger
from ledger.store.engine import make_engine
from ledger.store.schema import Blob, Edit, Revision, RevisionChange

from support import FACT, FACT2, FACT3


def _n_revisions(conn) -> int:
    return conn.execute(select(func.count()).select_from(Revision)).scalar_one()


def _consistent(db_url):
    eng = make_engine(db_url)
    with eng.connect() as c:
        blobs = {b for (b,) in c.execute(select(Blob.sha256))}
        edits = dict(c.execute(select(Edit.id, Edit.blob_sha256)).all())
        changed = {e for (e,) in c.execute(select(RevisionChange.edit_id))}
        n_rev = _n_revisions(c)
    eng.dispose()
    assert set(edits.values()) <= blobs          # no edit without its tensors
    assert set(edits) == changed                  # no edit outside a revision
    assert blobs <= set(edits.values())           # no orphan blob
    return n_rev


def _wait_for_commit(db_url, seen, proc, limit):
    """Until the database holds more than `seen` revisions (or the run ended, or `limit` s)."""
    eng = make_engine(db_url)
    end = time.monotonic() + limit
    try:
        while proc.poll() is None and time.monotonic() < end:
            try:
                with eng.connect() as c:
                    if _n_revisions(c) > seen:
                        return
            except OperationalError:      # the writer holds the lock for a moment
                pass
            time.sleep(0.05)
    finally:
        eng.dispose()


@pytest.mark.slow
def test_sigkill_at_random_points(db_url, tiny_llama, tmp_path):
    Ledger.init(db_url, model=str(tiny_llama)).close()
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(f) for f in (FACT, FACT2, FACT3)))
    root = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "cli.main", "--db", db_url, "add", str(facts), "--steps", "30", "--rank", "2",
           "--layer", "1"]
    env = {**os.environ, "LEDGER_THREADS": "1"}
    # One whole run first: it tells how long a run takes here, so the kills spread over it.
    t = time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    whole = time.perf_counter() - t
    revisions_seen = _consistent(db_url)
    assert revisions_seen == 4
    rng = random.Random(7)
    for i in range(20):
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 2:
            # Every other kill waits for the run's first commit, then falls within the next
            # fact's training and writes: kills timed on the whole run alone all landed before
            # any commit when the machine grew busier after `whole` was measured.
            _wait_for_commit(db_url, revisions_seen, proc, 10 * whole)
            time.sleep(rng.uniform(0.0, whole / 3))
        else:
            time.sleep(rng.uniform(0.1, whole))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n_rev = _consistent(db_url)
        assert n_rev >= revisions_seen
        revisions_seen = n_rev
        with Ledger.open(db_url) as lg:
            assert lg.verify() == []
            assert lg.head()["revision"] == f"rev-{n_rev}"    # HEAD is the newest whole revision
            assert lg.gc() == {"blobs_removed": 0, "bytes_removed": 0}
    assert revisions_seen > 4    # some killed runs got far enough to commit
