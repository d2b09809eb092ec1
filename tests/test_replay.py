"""`ledger replay`: a ledger's active facts retrained on another base model into a new ledger,
on the tiny Llama and the tiny GPT-2 (two families), on SQLite and PostgreSQL."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import BaftConfig, Ledger, load_facts
from ledger.replay import default_target, mapped_layer
from support import FACT, FACT2, FACT3, FAST, counts


def _two_fact_ledger(url: str, model: Path, tmp_path: Path) -> Ledger:
    """A ledger with FACT (by alice) then FACT2 (by bob) active, and FACT3 added and reverted."""
    lg = Ledger.init(url, model=str(model), wordings=False, author="alice")
    path = tmp_path / "facts.jsonl"
    for fact, author in ((FACT, "alice"), (FACT3, "carol"), (FACT2, "bob")):
        path.write_text(json.dumps(fact))
        lg.handle.author = author
        lg.add(load_facts(path), BaftConfig(**FAST))
    lg.handle.author = "alice"
    lg.revert("edit-2")
    return lg


def test_replay_keeps_facts_order_and_provenance(db_url, tiny_llama, tiny_gpt2, tmp_path):
    src = _two_fact_ledger(db_url, tiny_llama, tmp_path)
    new_url = f"sqlite:///{tmp_path / 'new.db'}"
    src.handle.author = "dora"     # who replays: not the facts' authors
    res = src.replay(str(tiny_gpt2), new_url)
    old = src.active_edits()
    src.close()
    assert [f.source_edit for f in res.facts] == [e.id for e in old] == ["edit-1", "edit-3"]
    assert res.model == str(tiny_gpt2) and res.fingerprint != res.source_fingerprint
    assert res.source_revision == "rev-5" and res.database == new_url
    with Ledger.open(new_url) as new:
        assert new.settings()["base_model"] == str(tiny_gpt2)
        assert new.settings()["base_fingerprint"] == res.fingerprint
        edits = new.active_edits()
        # Same facts, same order, each its own revision, the source's author and config kept.
        assert [e.fact for e in edits] == [FACT, FACT2] == [f.fact for f in res.facts]
        assert [e.author for e in edits] == ["alice", "bob"]
        assert [e.trained_on for e in edits] == ["rev-1", "rev-2"]
        assert [e.config["rank"] for e in edits] == [FAST["rank"]] * 2
        assert [e.layer for e in edits] == [f.layer for f in res.facts] == [1, 1]
        log = new.log()
        assert [r.revision for r in log] == ["rev-3", "rev-2", "rev-1"]
        assert [r.author for r in log[:2]] == ["bob", "alice"]
        assert log[1].message.startswith(f"replay edit-1 of {res.source} rev-5: Alice lives in -> Rome")
        assert log[0].message.startswith(f"replay edit-3 of {res.source} rev-5: ")
        events = [a for a in new.audit(command="replay")]
        per_fact = sorted((a for a in events if a["edit"]), key=lambda a: a["edit"])
        assert [(a["edit"], a["details"]["source_edit"], a["details"]["author"]) for a in per_fact] == \
            [("edit-1", "edit-1", "alice"), ("edit-2", "edit-3", "bob")]
        assert {a["actor"] for a in events} == {"dora"}     # who replayed
        assert all(a["details"]["source_fingerprint"] == res.source_fingerprint and
                   a["details"]["source_chain_hash"] == res.source_chain_hash and
                   len(a["details"]["source_content_hash"]) == 64 for a in per_fact)
        assert new.verify() == []
    # The report: the stored metrics on the old base beside the new edit's.
    for f, e in zip(res.facts, old):
        assert f.source_metrics == e.metrics and f.metrics is not None
        assert set(f.delta) == set(f.metrics) & set(f.source_metrics)
    d = res.to_dict()
    assert d["replayed"] == 2 and d["skipped"] == 0 and set(d["means_new"]) >= {"reliability", "locality"}


def test_replay_refusals_write_nothing(ledger, fact_file, tiny_llama, tiny_llama_other, tmp_path):
    from ledger.errors import InputError, StateError
    ledger.add(load_facts(fact_file), BaftConfig(**FAST))
    with pytest.raises(InputError, match="already on"):
        ledger.replay(str(tiny_llama), f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(InputError, match="not a Hugging Face model directory"):
        ledger.replay(str(tmp_path / "nowhere"), f"sqlite:///{tmp_path / 'a.db'}")
    # A copy of the base model elsewhere: another path, the same fingerprint.
    import shutil
    shutil.copytree(tiny_llama, tmp_path / "copy")
    with pytest.raises(InputError, match="own base model"):
        ledger.replay(str(tmp_path / "copy"), f"sqlite:///{tmp_path / 'a.db'}")
    assert not (tmp_path / "a.db").exists()
    # An existing target, a ledger or not, is never overwritten.
    (tmp_path / "b.db").write_bytes(b"keep")
    with pytest.raises(StateError, match="refusing to overwrite"):
        ledger.replay(str(tiny_llama_other), f"sqlite:///{tmp_path / 'b.db'}")
    assert (tmp_path / "b.db").read_bytes() == b"keep"
    with pytest.raises(InputError, match="no directory"):
        ledger.replay(str(tiny_llama_other), f"sqlite:///{tmp_path / 'missing' / 'c.db'}")
    assert not (tmp_path / "missing").exists()
    assert [p.name for p in tmp_path.iterdir() if "replay" in p.name] == []


def test_replay_failure_leaves_no_ledger(ledger, fact_file, tiny_llama_other, tmp_path, monkeypatch):
    """A replay that fails half-way (here: the second fact's training) leaves no new ledger."""
    ledger.add(load_facts(fact_file), BaftConfig(**FAST))
    facts = tmp_path / "f2.json"
    facts.write_text(json.dumps(FACT2))
    ledger.add(load_facts(facts), BaftConfig(**FAST))
    from ledger import editing
    real, calls = editing.add, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(editing, "add", failing)
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / ".ledger" / "ledger.db"
    with pytest.raises(KeyboardInterrupt):
        ledger.replay(str(tiny_llama_other), f"sqlite:///{target}")
    assert len(calls) == 2 and list((tmp_path / "out").iterdir()) == []


def test_replay_postgresql_target_dropped_on_failure(ledger, fact_file, tiny_llama_other, monkeypatch):
    """Into a PostgreSQL database (the source is on each engine): built in place, its tables
    dropped again when the replay fails."""
    import uuid

    from sqlalchemy import create_engine, inspect, text

    from conftest import PG_ADMIN_URL, _pg_available
    reason = _pg_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required in CI and not reachable: {reason}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {reason}")
    admin_url = PG_ADMIN_URL
    name = f"ledger_test_{uuid.uuid4().hex[:12]}_new"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    target = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        ledger.add(load_facts(fact_file), BaftConfig(**FAST))
        from ledger import editing
        monkeypatch.setattr(editing, "add", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            ledger.replay(str(tiny_llama_other), target)
        eng = create_engine(target.replace("postgresql://", "postgresql+psycopg://"))
        assert inspect(eng).get_table_names() == []
        eng.dispose()
        monkeypatch.undo()
        res = ledger.replay(str(tiny_llama_other), target)
        assert [f.edit for f in res.facts] == ["edit-1"]
        with pytest.raises(Exception, match="already holds a ledger"):
            ledger.replay(str(tiny_llama_other), target)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_mapped_layer():
    assert mapped_layer(10, 30, 18) == 6          # SmolLM2's default to Gemma 3 270M's default
    assert mapped_layer(1, 3, 3) == 1
    assert mapped_layer(15, 30, 18) == 9          # the same relative depth
    assert mapped_layer(29, 30, 18) == 17


def test_cli_replay(tmp_path, tiny_llama, tiny_gpt2, monkeypatch):
    """The command: the default target ./NAME/.ledger/ledger.db, text and --json, one-line errors."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner()
    assert r.invoke(cli, ["init", "--model", str(tiny_llama), "--no-wordings"]).exit_code == 0
    (tmp_path / "fact.json").write_text(json.dumps(FACT))
    out = r.invoke(cli, ["add", "fact.json", "--layer", "1", "--steps", "6", "--rank", "2", "--prefixes", "1"])
    assert out.exit_code == 0, out.output
    before = counts("sqlite:///" + str(tmp_path / ".ledger" / "ledger.db"))
    out = r.invoke(cli, ["replay", "--onto-model", str(tiny_gpt2)])
    assert out.exit_code == 0, out.output
    new = tmp_path / tiny_gpt2.name / ".ledger" / "ledger.db"
    assert new.exists() and default_target(str(tiny_gpt2)) == "sqlite:///" + str(new)
    assert "edit-1 -> rev-2 edit-1  Alice lives in -> Rome" in out.output and "old base: reliability=" in out.output
    assert counts("sqlite:///" + str(tmp_path / ".ledger" / "ledger.db")) == before     # the source is untouched
    out = r.invoke(cli, ["replay", "--onto-model", str(tiny_gpt2)])
    assert out.exit_code == 1 and out.output.startswith("error: ") and "refusing to overwrite" in out.output
    assert len(out.output.strip().splitlines()) == 1
    out = r.invoke(cli, ["replay", "--onto-model", str(tiny_llama), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert out.exit_code == 2 and "already on" in out.output
    out = r.invoke(cli, ["replay", "--onto-model", "no-such-model"])
    assert out.exit_code == 2 and "no-such-model" in out.output and len(out.output.strip().splitlines()) == 1
    out = r.invoke(cli, ["replay", "--onto-model", str(tiny_gpt2), "--db", f"sqlite:///{tmp_path / 'j.db'}", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["replayed"] == 1 and d["facts"][0]["source_edit"] == "edit-1" and d["facts"][0]["edit"] == "edit-1"
    assert d["facts"][0]["source_metrics"]["reliability"] >= 0 and "delta" in d["facts"][0]
    # The new ledger is an ordinary ledger: commands run in its directory open it.
    monkeypatch.chdir(tmp_path / tiny_gpt2.name)
    out = r.invoke(cli, ["log"])
    assert out.exit_code == 0 and "replay edit-1 of" in out.output
