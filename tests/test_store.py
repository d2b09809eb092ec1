"""The storage functions (ledger/store/*.py) called directly on one Connection, on both
engines: a migrated, empty database per test, no Ledger and no model."""
import hashlib
import json

import pytest
import torch
from sqlalchemy import update

from ledger.errors import InputError, NotFoundError, StateError
from ledger.store import audit, blobs, edits, evaluations, refs, revisions, settings, wordings
from ledger.store.edits import canonical
from ledger.store.engine import make_engine, upgrade, write_transaction
from ledger.store.schema import Revision


@pytest.fixture
def engine(db_url):
    """An engine on a fresh database (SQLite file or PostgreSQL) migrated to head."""
    eng = make_engine(db_url, create_dir=True)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def conn(engine):
    """One write transaction, rolled back at the end."""
    with write_transaction(engine) as c:
        yield c


def _blob(conn, seed=0) -> str:
    g = torch.Generator().manual_seed(seed)
    return blobs.put(conn, blobs.encode({"R": torch.randn(2, 4, generator=g), "b": torch.randn(2, generator=g)}))


def _edit(conn, *, subject="Alice", relation="{} lives in", layer=1, rank=2, blob=None, trained_on=None,
          metrics=None, norm=0.5, target="Rome"):
    return edits.write(conn, {
        "fact_json": json.dumps({"subject": subject, "prompt": f"{subject} lives in", "target_new": target}),
        "subject": subject, "relation": relation, "method": "baft", "layer": layer, "rank": rank,
        "config_json": json.dumps({"steps": 6, "rank": rank}), "blob_sha256": blob or _blob(conn),
        "metrics_json": json.dumps(metrics or {"reliability": 1.0}), "stats_json": json.dumps({"tensor_norm": norm}),
        "versions_json": json.dumps({"ledger": "test"}), "trained_on": trained_on, "author": "tester",
        "created_at": "2026-12-04T00:00:00.000000Z"})


def _chain(conn, *changes_per_rev):
    """A root revision, then one revision per change list, each on the previous; their rows."""
    out = [revisions.append(conn, parent_id=None, operation="init", author="tester", message="root", changes=[])]
    for changes in changes_per_rev:
        out.append(revisions.append(conn, parent_id=out[-1].id, operation="add", author="tester",
                                    message=f"change {len(out)}", changes=changes))
    return out


# --- settings ----------------------------------------------------------------------------------

def test_settings_round_trip(conn):
    assert settings.read(conn) == {}
    settings.write(conn, {"base_model": "/models/tiny", "hidden_size": "64", "n_layers": "3"})
    assert settings.read(conn) == {"base_model": "/models/tiny", "hidden_size": "64", "n_layers": "3"}


def test_settings_survive_commit(engine):
    with write_transaction(engine) as c:
        settings.write(c, {"base_fingerprint": "f" * 64})
    with engine.connect() as c:
        assert settings.read(c) == {"base_fingerprint": "f" * 64}


# --- edits -------------------------------------------------------------------------------------

def test_edit_is_written_with_its_content_hash_and_read_back(conn):
    address = _blob(conn)
    eid = _edit(conn, blob=address, layer=2, rank=3)
    assert eid == 1
    row = edits.get(conn, eid)
    assert (row.subject, row.relation, row.method, row.layer, row.rank, row.blob_sha256, row.author) == \
        ("Alice", "{} lives in", "baft", 2, 3, address, "tester")
    assert json.loads(row.fact_json)["target_new"] == "Rome"
    # The hash is sha256 over the canonical payload of every other column.
    payload = edits.edit_payload(row)
    assert "content_hash" not in payload and payload["id"] == 1 and payload["blob"] == address
    assert row.content_hash == hashlib.sha256(canonical(payload)).hexdigest() == edits.edit_hash(row)
    assert edits.content_hashes(conn, [eid]) == {eid: row.content_hash}
    assert edits.get(conn, 99) is None


def test_edits_read_by_id_sets(conn):
    root = _chain(conn)[0]
    a = _edit(conn, subject="Alice", layer=0, rank=2, metrics={"reliability": 0.5}, norm=1.5)
    b = _edit(conn, subject="Bob", layer=2, rank=4, trained_on=root.id, blob=_blob(conn, seed=1))
    c = _edit(conn, subject="Alice", layer=2, rank=1, target="Paris", blob=_blob(conn, seed=2))
    assert (a, b, c) == (1, 2, 3)
    assert [r.id for r in edits.rows(conn, [c, a])] == [a, c]
    assert edits.rows(conn, []) == [] and edits.facts_of(conn, []) == {} and edits.layer_totals(conn, []) == []
    assert edits.facts_of(conn, [b])[b]["subject"] == "Bob"
    assert edits.metrics_of(conn, [a, b]) == {a: {"reliability": 0.5}, b: {"reliability": 1.0}}
    fact, config, layer = edits.retrain_inputs(conn, [c])[c]
    assert fact["target_new"] == "Paris" and config == {"steps": 6, "rank": 1} and layer == 2
    assert sorted(edits.trained_on(conn, [a, b])) == [(a, None), (b, root.id)]
    addresses = {e: (layer, blob) for e, layer, blob in edits.block_addresses(conn, [a, b])}
    assert addresses[a][0] == 0 and addresses[b][0] == 2 and addresses[a][1] != addresses[b][1]
    assert sorted(edits.stating(conn, "Alice", "{} lives in")) == [a, c]
    assert edits.stating(conn, "Alice", "{} works at") == []
    layer_, rank_, fact_, _blob_address, norm_ = edits.summaries(conn, [a])[a]
    assert (layer_, rank_, fact_["subject"], norm_) == (0, 2, "Alice", 1.5)
    assert sorted(edits.layer_totals(conn, [a, b, c])) == [(0, 1, 2), (2, 2, 5)]


def test_edit_id_sets_larger_than_any_parameter_limit(conn):
    ids = [_edit(conn, subject=f"S{i}") for i in range(3)]
    many = ids + list(range(1000, 40000))     # one bound parameter on either engine
    assert [r.id for r in edits.rows(conn, many)] == ids
    assert set(edits.facts_of(conn, many)) == set(ids)


# --- revisions ---------------------------------------------------------------------------------

def test_root_revision_is_an_empty_checkpoint(conn):
    root = revisions.append(conn, parent_id=None, operation="init", author="tester", message="root", changes=[])
    assert (root.id, root.parent_id, root.depth, root.n_active, root.operation) == (1, None, 0, 0, "init")
    assert root.checkpoint is not None and revisions.unpack_ids(root.checkpoint) == set()
    assert revisions.active_set(conn, 1) == set()
    assert revisions.exists(conn, 1) and not revisions.exists(conn, 2)


def test_appended_revisions_give_the_active_set_and_the_chain(conn):
    e1, e2, e3 = (_edit(conn, subject=f"S{i}") for i in range(3))
    root, r2, r3, r4 = _chain(conn, [(e1, "add"), (e2, "add")], [(e3, "add")], [(e1, "remove")])
    assert [r.id for r in (root, r2, r3, r4)] == [1, 2, 3, 4]
    assert [r.depth for r in (root, r2, r3, r4)] == [0, 1, 2, 3]
    assert [r.n_active for r in (root, r2, r3, r4)] == [0, 2, 3, 2]
    assert r2.checkpoint is None                          # only every CHECKPOINT_EVERY-th depth
    assert revisions.active_set(conn, 2) == {e1, e2}
    assert revisions.active_set(conn, 3) == {e1, e2, e3}
    assert revisions.active_set(conn, 4) == {e2, e3}
    assert revisions.changes_of(conn, 2) == [(e1, "add"), (e2, "add")]
    assert revisions.changes_of(conn, 4) == [(e1, "remove")]
    assert revisions.parent_of(conn, 4) == 3 and revisions.parent_of(conn, 1) is None
    assert [r.id for r in revisions.ancestors(conn, 4, 10)] == [4, 3, 2, 1]
    assert [r.id for r in revisions.ancestors(conn, 4, 2)] == [4, 3]
    assert revisions.is_ancestor(conn, 1, 4) and revisions.is_ancestor(conn, 3, 3)
    assert not revisions.is_ancestor(conn, 4, 2) and not revisions.is_ancestor(conn, 1, 99)
    # The chain hash is recomputed from the stored content and the parent's hash.
    row = revisions.get(conn, 3)
    expect = revisions.revision_hash(
        {"id": 3, "parent_id": 2, "operation": "add", "author": "tester", "created_at": row.created_at,
         "message": row.message, "depth": 2, "n_active": 3},
        revisions.chain_hash(conn, 2), [(e3, "add", edits.content_hashes(conn, [e3])[e3])])
    assert row.chain_hash == expect
    assert revisions.next_revision_id(conn) == 5
    assert revisions.verify(conn) == []


def test_active_set_across_checkpoints(conn, monkeypatch):
    monkeypatch.setattr(revisions, "CHECKPOINT_EVERY", 3)
    ids = [_edit(conn, subject=f"S{i}") for i in range(6)]
    steps = [[(ids[0], "add")], [(ids[1], "add")], [(ids[2], "add"), (ids[0], "remove")], [(ids[3], "add")],
             [(ids[1], "remove")], [(ids[4], "add"), (ids[5], "add")], [(ids[2], "remove")]]
    rows = _chain(conn, *steps)
    expected, active = [set()], set()
    for changes in steps:
        for e, a in changes:
            (active.add if a == "add" else active.discard)(e)
        expected.append(set(active))
    assert [revisions.active_set(conn, r.id) for r in rows] == expected
    assert [r.checkpoint is not None for r in rows] == [d % 3 == 0 for d in range(len(rows))]
    assert revisions.unpack_ids(rows[6].checkpoint) == expected[6]
    assert revisions.verify(conn) == []


def test_appending_a_change_that_does_not_apply_is_refused(conn):
    e1 = _edit(conn)
    root, r2 = _chain(conn, [(e1, "add")])
    with pytest.raises(InputError, match="edit-1 is already active"):
        revisions.append(conn, parent_id=r2.id, operation="add", author="t", message="m", changes=[(e1, "add")])
    with pytest.raises(InputError, match="edit-1 is not active at rev-1"):
        revisions.append(conn, parent_id=root.id, operation="revert", author="t", message="m",
                         changes=[(e1, "remove")])
    with pytest.raises(NotFoundError, match="no revision rev-9"):
        revisions.active_set(conn, 9)


def test_rebase_replacements_map_old_edits_to_new(conn):
    e1, e2, e3 = (_edit(conn, subject=f"S{i}") for i in range(3))
    root, r2 = _chain(conn, [(e1, "add"), (e2, "add")])
    revisions.append(conn, parent_id=r2.id, operation="rebase", author="t", message="rebase",
                     changes=[(e1, "remove"), (e3, "add")])
    assert revisions.rebase_replacements(conn) == {e1: e3}


def test_verify_names_a_changed_revision(conn):
    e1 = _edit(conn)
    _chain(conn, [(e1, "add")], [])
    conn.execute(update(Revision).where(Revision.id == 2).values(message="rewritten"))
    assert revisions.verify(conn) == ["rev-2: its content does not match its chain hash"]


# --- refs and the reflog -----------------------------------------------------------------------

def test_head_branches_tags_and_the_reflog(conn):
    with pytest.raises(StateError, match="has no HEAD"):
        refs.head(conn)
    root, r2, r3 = _chain(conn, [], [])
    refs.set_ref(conn, "main", "branch", root.id, "alice", "init")
    refs.set_head(conn, branch="main", rev_id=root.id, actor="alice", reason="init")
    assert refs.head(conn) == refs.HeadState(root.id, "main")
    refs.advance_head(conn, r2.id, "bob", "add")                  # moves the branch, HEAD follows
    assert refs.head(conn) == refs.HeadState(r2.id, "main")
    refs.set_ref(conn, "v1", "tag", root.id, "bob", "tag v1")
    with pytest.raises(InputError, match="tags do not move"):
        refs.set_ref(conn, "v1", "tag", r2.id, "bob", "again")
    refs.set_head(conn, branch=None, rev_id=root.id, actor="carol", reason="checkout rev-1")
    assert refs.head(conn) == refs.HeadState(root.id, None)
    refs.advance_head(conn, r3.id, "carol", "add")               # detached: only HEAD moves
    assert refs.head(conn) == refs.HeadState(r3.id, None)
    assert [refs.kind_of(conn, n) for n in ("HEAD", "main", "v1", "nope")] == ["head", "branch", "tag", None]
    assert refs.named(conn) == [("main", "branch", r2.id), ("v1", "tag", root.id)]
    assert refs.by_revision(conn) == {r3.id: ["HEAD"], r2.id: ["main"], root.id: ["v1"]}

    moves = refs.reflog(conn, None, 50)                           # newest first
    assert [(m.ref, m.old_revision, m.new_revision, m.old_symbolic, m.new_symbolic, m.actor, m.reason)
            for m in moves] == [
        ("HEAD", root.id, r3.id, None, None, "carol", "add"),
        ("HEAD", None, root.id, "main", None, "carol", "checkout rev-1"),
        ("v1", None, root.id, None, None, "bob", "tag v1"),
        ("main", root.id, r2.id, None, None, "bob", "add"),
        ("HEAD", None, root.id, None, "main", "alice", "init"),
        ("main", None, root.id, None, None, "alice", "init"),
    ]
    assert [m.new_revision for m in refs.reflog(conn, "main", 50)] == [r2.id, root.id]
    assert len(refs.reflog(conn, None, 2)) == 2
    assert all(m.created_at.endswith("Z") and len(m.created_at) == 27 for m in moves)


def test_setting_a_ref_to_where_it_is_logs_nothing(conn):
    root = _chain(conn)[0]
    refs.set_ref(conn, "main", "branch", root.id, "a", "init")
    refs.set_head(conn, branch="main", rev_id=root.id, actor="a", reason="init")
    refs.set_ref(conn, "main", "branch", root.id, "a", "same")
    refs.set_head(conn, branch="main", rev_id=root.id, actor="a", reason="same")
    assert len(refs.reflog(conn, None, 50)) == 2


def test_resolve_names_to_revisions(conn):
    root, r2, r3 = _chain(conn, [], [])
    refs.set_ref(conn, "main", "branch", r3.id, "a", "init")
    refs.set_ref(conn, "v1", "tag", r2.id, "a", "tag")
    refs.set_head(conn, branch="main", rev_id=r3.id, actor="a", reason="init")
    assert [refs.resolve(conn, n) for n in ("rev-2", "HEAD", "HEAD~1", "HEAD~2", "main", "v1", "v1~1", "HEAD~0")] \
        == [2, 3, 2, 1, 3, 2, 1, 3]
    for name, error, message in [
            ("rev-4", NotFoundError, "no revision rev-4"),
            ("HEAD~3", NotFoundError, "goes past the first revision"),
            ("other", NotFoundError, "no revision, branch or tag named 'other'"),
            ("HEAD~x", InputError, "expected ~ followed by a number"),
            ("a..b", InputError, "invalid revision name"),
            ("x;y", InputError, "invalid revision name"),
            ("", InputError, "invalid revision name"),
            ("r" * 201, InputError, "invalid revision name")]:
        with pytest.raises(error, match=message):
            refs.resolve(conn, name)


# --- audit -------------------------------------------------------------------------------------

def test_audit_events_are_written_and_filtered(conn):
    _chain(conn, [])
    audit.record(conn, "alice", "init", 1, None, {"z": 1, "a": 2})
    audit.record(conn, "bob", "add", 2, 7, {"fact": "x"})
    audit.record(conn, "alice", "checkout", 1, None, {"target": "rev-1"})
    every = audit.events(conn)
    assert [(e.actor, e.command, e.revision_id, e.edit_id) for e in every] == \
        [("alice", "checkout", 1, None), ("bob", "add", 2, 7), ("alice", "init", 1, None)]
    assert every[2].details_json == '{"a": 2, "z": 1}'                # keys sorted
    assert [e.command for e in audit.events(conn, actor="alice")] == ["checkout", "init"]
    assert [e.command for e in audit.events(conn, revision=1)] == ["checkout", "init"]
    assert [e.command for e in audit.events(conn, edit=7)] == ["add"]
    assert [e.command for e in audit.events(conn, command="add")] == ["add"]
    assert [e.command for e in audit.events(conn, limit=1)] == ["checkout"]
    assert audit.events(conn, actor="nobody") == []
    middle = every[1].created_at
    assert [e.command for e in audit.events(conn, since=middle)] == ["checkout", "add"]
    assert [e.command for e in audit.events(conn, until=middle)] == ["add", "init"]
    assert [e.command for e in audit.events(conn, since=middle, until=middle)] == ["add"]


# --- evaluations and re-measurements ------------------------------------------------------------

def test_evaluations_and_remeasures(conn):
    e1 = _edit(conn)
    root, r2 = _chain(conn, [(e1, "add")])
    common = dict(created_at="2026-12-04T00:00:00.000000Z", author="tester", dataset_sha256="d" * 64, n=2,
                  options={"fluency": False})
    first = evaluations.write(conn, revision=r2.id, label="before", means={"reliability": 0.5},
                              per_fact=[{"reliability": 1.0}, {"reliability": 0.0}], **common)
    second = evaluations.write(conn, revision=r2.id, label=None, means={"reliability": 1.0},
                               per_fact=[{"reliability": 1.0}, {"reliability": 1.0}], **common)
    evaluations.write(conn, revision=root.id, label="base", means={"reliability": 0.0},
                      per_fact=[{"reliability": 0.0}] * 2, **common)
    full = evaluations.of_revision(conn, r2.id, per_fact=True)
    assert [r.id for r in full] == [first, second] and [r.label for r in full] == ["before", None]
    assert json.loads(full[0].results_json) == [{"reliability": 1.0}, {"reliability": 0.0}]
    assert json.loads(full[1].means_json) == {"reliability": 1.0}
    assert json.loads(full[0].options_json) == {"fluency": False}
    short = evaluations.of_revision(conn, r2.id, per_fact=False)
    assert "results_json" not in short[0]._fields and short[0].n == 2
    assert [(s.revision_id, s.label) for s in evaluations.summaries_at(conn, [root.id, r2.id])] == \
        [(r2.id, "before"), (r2.id, None), (root.id, "base")]
    assert evaluations.remeasures_of(conn, [e1]) == []
    evaluations.write_remeasures(conn, r2.id, {e1: {"reliability": 0.25}})
    evaluations.write_remeasures(conn, r2.id, {})
    [(edit, rev, metrics)] = evaluations.remeasures_of(conn, [e1])
    assert (edit, rev, json.loads(metrics)) == (e1, r2.id, {"reliability": 0.25})


# --- wordings ------------------------------------------------------------------------------------

def test_wordings_are_written_once_and_listed_in_import_order(conn):
    pairs = [("lives in", "{} lives in"), ("lives in", "{} resides in"), ("works at", "{} works at"),
             ("works at", "{} resides in")]
    assert wordings.write(conn, pairs, "a.json", "2026-12-04T00:00:00.000000Z") == 4
    # Pairs already held are skipped; a new one is added after them.
    assert wordings.write(conn, pairs[:2] + [("lives in", "the home of {} is")], "b.json",
                          "2026-12-04T00:00:01.000000Z") == 1
    assert wordings.of_relations(conn, ["lives in", "unknown"]) == {
        "lives in": ["{} lives in", "{} resides in", "the home of {} is"], "unknown": []}
    assert wordings.of_relations(conn, []) == {}
    assert wordings.all_pairs(conn) == pairs + [("lives in", "the home of {} is")]
    assert wordings.summary(conn) == [("lives in", 3), ("works at", 2)]
    assert wordings.sharing(conn, "lives in", ["{} lives in", "{} resides in"], 1) == ["works at"]
    assert wordings.sharing(conn, "lives in", ["{} lives in", "{} resides in"], 2) == []
