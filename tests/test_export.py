"""Export: a snapshot loads with plain transformers in a Python that cannot import ledger,
and gives the composed model's logits and greedy tokens; tampering is refused."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from ledger import BaftConfig, Ledger, load_snapshot, parse_facts_text
from ledger.errors import InputError, IntegrityError

from support import FACT, FACT2, FACT3, FAST, run_isolated

PROMPTS = ["Alice lives in", "Carol works at", "The weather is"]


def composed_outputs(lg, prompts, n_new=6):
    m = lg.model_at()
    logits, greedy = [], []
    with torch.no_grad():
        for p in prompts:
            enc = m.tokenizer(p, return_tensors="pt")
            logits.append(m.model(**enc).logits[0, -1])
            g = m.model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
            greedy.append(g[0, enc["input_ids"].shape[1]:].tolist())
    return torch.stack(logits), greedy


@pytest.fixture
def edited(db_url, tiny_llama):
    lg = Ledger.init(db_url, model=str(tiny_llama))
    lg.add(parse_facts_text(json.dumps([FACT, FACT2, FACT3])), BaftConfig(**{**FAST, "layer": None, "gate_floor": 0.3}))
    lg.add(parse_facts_text(json.dumps(dict(FACT3, subject="Ivy", prompt="Ivy plays"))), BaftConfig(**{**FAST, "layer": 2}))
    yield lg
    lg.close()


def test_snapshot_loads_without_ledger_and_matches(edited, tmp_path):
    out = tmp_path / "snap"
    manifest = edited.export("HEAD", out)
    assert manifest["revision"] == "rev-5" and len(manifest["edits"]) == 4
    assert set(manifest["edited_layers"]) == {"1", "2"}
    assert {"model.safetensors", "config.json", "modeling_ledger.py"} <= set(manifest["files"])
    expected_logits, expected_greedy = composed_outputs(edited, PROMPTS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    got = run_isolated(out, PROMPTS, root)
    assert got["class"] == "LedgerEditedForCausalLM"
    assert (torch.tensor(got["logits"]) - expected_logits).abs().max() <= 1e-5
    assert got["greedy"] == expected_greedy
    # the edit is really in there: the base model's logits differ
    base_logits = torch.stack([edited.model_at("rev-1").logits(p)[-1] for p in PROMPTS])
    assert (base_logits - expected_logits).abs().max() > 1e-4
    assert [e["command"] for e in edited.audit(command="export")] == ["export"]


def test_load_snapshot_verifies_every_file(edited, tmp_path):
    out = tmp_path / "snap"
    edited.export("rev-3", out)
    model, tok, manifest = load_snapshot(out)
    assert manifest["revision"] == "rev-3"
    for name in ("model.safetensors", "config.json", "modeling_ledger.py", "tokenizer.json"):
        f = out / name
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=name):
            load_snapshot(out)
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    load_snapshot(out)
    (out / "extra.py").write_text("print('x')")
    with pytest.raises(IntegrityError, match="not in its manifest"):
        load_snapshot(out)


def test_export_refuses_nonempty_dir_and_is_atomic(edited, tmp_path, db_url):
    out = tmp_path / "snap"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        edited.export("HEAD", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = CliRunner().invoke(cli, ["--db", db_url, "export", "HEAD", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr
    res = CliRunner().invoke(cli, ["--db", db_url, "export", "HEAD", str(out), "--force", "--json"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "ledger.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".snap")]   # no temporary left


def test_base_ref_snapshot_refers_to_the_base_and_checks_it(db_url, tiny_llama, tmp_path):
    import shutil
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_llama, model_dir)
    with Ledger.init(db_url, model=str(model_dir)) as lg:
        lg.add(parse_facts_text(json.dumps([FACT, FACT2])), BaftConfig(**FAST))
        out = tmp_path / "snap"
        manifest = lg.export("HEAD", out, base_ref=True)
        expected_logits, expected_greedy = composed_outputs(lg, PROMPTS)
    assert manifest["base_ref"]["path"] == str(model_dir.resolve())
    size = (out / "model.safetensors").stat().st_size
    assert size < (model_dir / "model.safetensors").stat().st_size / 5      # no base weights inside
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    got = run_isolated(out, PROMPTS, root)
    assert (torch.tensor(got["logits"]) - expected_logits).abs().max() <= 1e-5
    assert got["greedy"] == expected_greedy
    # a changed base is refused
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the snapshot's base"):
        load_snapshot(out)
