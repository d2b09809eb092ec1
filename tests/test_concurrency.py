"""Concurrent writers on both engines: 4 processes each add 25 edits to the same branch at
once. Every edit lands as its own revision, none lost or duplicated, the chain verifies, and
each edit was trained on the revision it was committed on (a writer whose parent moved
retrains on the new head)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from ledger import Ledger
from ledger.store.engine import make_engine
from ledger.store.schema import Edit, Revision

WRITER = r"""
import json, sys, torch
torch.set_num_threads(1)
from ledger import BaftConfig, Ledger, parse_facts_text
db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
facts = [{"subject": f"{who} person {i}", "prompt": f"{who} person {i} lives in", "target_new": "Rome"}
         for i in range(n)]
with Ledger.open(db, author=who) as lg:
    for f in parse_facts_text(json.dumps(facts)):
        lg.add([f], BaftConfig(steps=3, min_steps=0, rank=1, layer=1, n_prefixes=0))
"""


@pytest.mark.slow
def test_four_writers_25_edits_each(db_url, tiny_llama, tmp_path):
    Ledger.init(db_url, model=str(tiny_llama)).close()
    root = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, f"w{k}", "25"], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    with Ledger.open(db_url) as lg:
        assert lg.verify() == []
        log = lg.log(limit=1000)
        assert len(log) == 101 and lg.head()["revision"] == "rev-101"
        edits = lg.active_edits()
        prompts = [e.fact["prompt"] for e in edits]
        assert len(prompts) == 100 == len(set(prompts))
        assert {e.author for e in edits} == {"w0", "w1", "w2", "w3"}
    eng = make_engine(db_url)
    with eng.connect() as c:
        parent = dict(c.execute(select(Revision.id, Revision.parent_id)).all())
        from ledger.store.schema import RevisionChange
        added_at = dict(c.execute(select(RevisionChange.edit_id, RevisionChange.revision_id)).all())
        for eid, trained_on in c.execute(select(Edit.id, Edit.trained_on)):
            assert parent[added_at[eid]] == trained_on, eid
        assert c.execute(select(Edit.id)).all().__len__() == 100
    eng.dispose()
