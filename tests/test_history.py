"""History on both engines: revert, rebase, diff, branches, tags, reflog and audit."""
import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from ledger import BaftConfig, Ledger, parse_facts_text
from ledger.compose import fuse
from ledger.errors import InputError

from support import FACT, FACT2, FACT3, FAST, PROMPTS, logits_of

FACT4 = {"subject": "Gina", "prompt": "Gina speaks", "target_new": "Welsh"}
FACT5 = {"subject": "Hugo", "prompt": "Hugo drives a", "target_new": "tram"}


@pytest.fixture
def five(db_url, tiny_llama):
    lg = Ledger.init(db_url, model=str(tiny_llama))
    lg.add(parse_facts_text(json.dumps([FACT, FACT2, FACT3, FACT4, FACT5])), BaftConfig(**FAST))
    yield lg
    lg.close()


def test_reverting_every_edit_gives_the_base_model(five):
    base = logits_of(five, "rev-1")
    for k in range(1, 6):
        five.revert(f"edit-{k}")
    assert five.head()["revision"] == "rev-11"
    assert five.active_edits() == []
    assert (logits_of(five) - base).abs().max() <= 1e-6


def test_revert_of_edit_k_equals_the_composition_without_k(five):
    res = five.revert("edit-3")
    assert res.removed == ["edit-3"] and res.revision == "rev-7"
    # edits 4 and 5 were trained with edit-3 active: they are re-measured
    assert [r.edit for r in res.remeasured] == ["edit-4", "edit-5"]
    assert "reliability" in res.remeasured[0].after
    got = logits_of(five)
    composed = five.model_at("rev-7")
    blocks = [b for b in five._blocks_of({1, 2, 4, 5})]
    sites = fuse(blocks, five.base.hidden_size)
    composed.clear()
    from ledger.baft.hooks import attach_sites, detach_sites
    attach_sites(five.base.layers, sites)
    try:
        tok = five.base.tokenizer
        expected = torch.stack([five.base.model(**tok(p, return_tensors="pt")).logits[0, -1] for p in PROMPTS])
    finally:
        detach_sites(sites)
    assert (got - expected).abs().max() <= 1e-6
    assert five.verify() == []


def test_revert_a_revision_and_revert_the_revert(five):
    five.revert("rev-4")                       # rev-4 added edit-3
    assert "edit-3" not in [e.id for e in five.active_edits()]
    res = five.revert("rev-7")                 # restores edit-3
    assert res.restored == ["edit-3"]
    assert torch.equal(logits_of(five), logits_of(five, "rev-6"))
    with pytest.raises(InputError, match="nothing to revert"):
        five.revert("rev-1")


def test_rebase_retrains_the_dependents(five):
    five.revert("edit-2")
    assert five.stale_edits() == ["edit-3", "edit-4", "edit-5"]
    results = five.rebase()
    assert [r.superseded for r in results] == [["edit-3"], ["edit-4"], ["edit-5"]]
    assert five.stale_edits() == []
    active = five.active_edits()
    assert [e.fact["prompt"] for e in active] == [FACT["prompt"], FACT3["prompt"], FACT4["prompt"], FACT5["prompt"]]
    assert five.log(limit=1)[0].operation == "rebase"


def test_diff_is_antisymmetric(five):
    five.revert("edit-2")
    ab, ba = five.diff("rev-3", "rev-7"), five.diff("rev-7", "rev-3")
    assert [e["edit"] for e in ab.added] == ["edit-3", "edit-4", "edit-5"]
    assert [e["edit"] for e in ab.removed] == ["edit-2"]
    assert ab.added == ba.removed and ab.removed == ba.added
    for layer, st in ab.layers.items():
        assert st["a"] == ba.layers[layer]["b"] and st["b"] == ba.layers[layer]["a"]
        assert st["norm_added"] == ba.layers[layer]["norm_removed"] > 0
    # edit-1 was re-measured at rev-7? no: it was trained before edit-2 existed
    for e, d in ab.metric_deltas.items():
        assert ba.metric_deltas[e] == {k: -v for k, v in d.items()}
    same = five.diff("rev-6", "rev-6")
    assert same.added == same.removed == [] and same.metric_deltas == {}


def test_metric_deltas_follow_remeasurement(five):
    res = five.revert("edit-3")
    assert [r.edit for r in res.remeasured] == ["edit-4", "edit-5"]
    d = five.diff("rev-6", res.revision)
    # The diff lists exactly the remeasured edits whose metrics moved, each with the metrics
    # that moved, rounded; the edits trained before edit-3 were not remeasured and do not appear.
    moved = {r.edit: {k: round(v, 6) for k, v in r.delta.items() if v != 0} for r in res.remeasured}
    assert d.metric_deltas == {e: delta for e, delta in moved.items() if delta}


def test_branch_from_old_revision_does_not_see_later_edits(five):
    five.branch("experiment", "rev-3")
    five.checkout("experiment")
    [res] = five.add(parse_facts_text(json.dumps(dict(FACT4, target_new="Basque"))), BaftConfig(**FAST))
    assert five.resolve("experiment") == int(res.revision.split("-")[1])
    assert [e.id for e in five.active_edits("experiment")] == ["edit-1", "edit-2", "edit-6"]
    assert five.resolve("main") == 6
    assert {"edit-3", "edit-4", "edit-5"}.isdisjoint(e.id for e in five.active_edits("experiment"))


def test_tags_do_not_move_and_names_are_checked(five):
    five.tag("v1", "rev-3")
    with pytest.raises(InputError, match="tags do not move"):
        five.tag("v1", "rev-4")
    with pytest.raises(InputError, match="already exists"):
        five.branch("v1")
    assert five.resolve("v1") == 3
    for bad in ("rev-9", "a..b", "x;y", "HEAD", "'q'", "/abs", ""):
        with pytest.raises(InputError):
            five.branch(bad)


def test_reflog_records_every_move(five):
    five.checkout("rev-2")
    five.checkout("main")
    five.branch("b1", "rev-4")
    moves = five.reflog()
    assert moves[0]["ref"] == "b1" and moves[0]["new"] == "rev-4"
    assert moves[1]["ref"] == "HEAD" and moves[1]["new_branch"] == "main" and moves[1]["old"] == "rev-2"
    assert moves[2]["ref"] == "HEAD" and moves[2]["new"] == "rev-2" and moves[2]["old_branch"] == "main"
    main_moves = five.reflog("main")
    assert [m["new"] for m in reversed(main_moves)] == [f"rev-{i}" for i in range(1, 7)]
    assert all(m["actor"] == "tester" for m in moves)


def test_audit_filters(five):
    five.checkout("rev-2")
    five.revert("edit-1")
    assert {e["command"] for e in five.audit()} >= {"init", "add", "checkout", "revert"}
    assert [e["command"] for e in five.audit(edit="edit-1")] == ["revert", "add"]
    assert [e["command"] for e in five.audit(command="checkout")] == ["checkout"]
    assert five.audit(actor="nobody") == []
    first = five.audit()[-1]["time"]
    assert len(five.audit(until=first)) == 1
    assert all(e["revision"] == "rev-2" for e in five.audit(rev="rev-2"))


def test_history_cli(five, db_url):
    runner = CliRunner()

    def run(*args, code=0):
        res = runner.invoke(cli, ["--db", db_url, *args])
        assert res.exit_code == code, res.output
        return res.stdout
    out = json.loads(run("revert", "edit-2", "--json"))
    assert out["removed"] == ["edit-2"] and len(out["remeasured"]) == 3
    assert "delta" in out["remeasured"][0]
    d = json.loads(run("diff", "rev-6", "rev-7", "--json"))
    assert [e["edit"] for e in d["removed"]] == ["edit-2"]
    assert "- edit-2" in run("diff", "rev-6", "rev-7")
    run("tag", "v1", "rev-7")
    run("tag", "v1", "rev-6", code=2)
    run("branch", "side", "rev-2")
    assert {r["name"] for r in json.loads(run("refs", "--json"))} == {"HEAD", "main", "side", "v1"}
    assert json.loads(run("reflog", "side", "--json"))[0]["new"] == "rev-2"
    assert json.loads(run("audit", "--command", "tag", "--json"))[0]["details"] == {"name": "v1"}
    rebased = json.loads(run("rebase", "--json"))
    assert len(rebased) == 3
    assert "nothing to rebase" in run("rebase")
