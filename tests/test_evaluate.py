"""Metrics against hand-computed values on a toy model whose argmax is known by construction,
fluency on known strings, and `Ledger.evaluate` / `ledger eval` on both engines: stored rows,
show and diff, refused input that writes nothing, and an evaluation of a real trained edit."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import text

from cli.main import cli
from ledger import BaftConfig, Fact, Ledger, LocalityPrompt, PortabilityPrompt, parse_facts_text
from ledger.errors import InputError, NotFoundError
from ledger.evaluate import (fluency, greedy_generate, mean_metrics, measure, measure_many, ngram_entropy,
                             score, words)
from ledger.facts import facts_from_records
from ledger.store.engine import make_engine

from support import FACT, FACT2, FACT3, FAST, TOK, V, Oracle, counts

HI = 10.0 - math.log(math.exp(10.0) + V - 1)    # log-probability of the argmax token
LO = -math.log(math.exp(10.0) + V - 1)          # of any other token


# The fact: "Ann is in" -> "NY" (true "LA"); every sequence is tokenised one byte per token,
# a target with a leading space: " NY" is 3 tokens.
TOY_FACT = Fact(prompt="Ann is in", target_new="NY", target_true="LA",
                rephrase_prompts=("She lives at", "Her city:"),
                locality_prompts=(LocalityPrompt("Bob naps by", "Oslo"),),
                portability_prompts=(PortabilityPrompt("Its tongue:", "Eng"),))
EDITED = Oracle(["Ann is in NZ",        # " NY": space and N right, Y wrong (Z)     -> 2/3
                 "She lives at NY",     # all 3 right                               -> 1
                 "Her city: LA",        # " NY": only the space right; " LA": all 3 -> 1/3
                 "Its tongue: Ent",     # " Eng": 3 of 4
                 "Bob naps by Osaka",   # " Oslo": the last 2 tokens differ from the base
                 "xy LA"])              # after "by " + "L" the edited model says "A"
BASE = Oracle(["Bob naps by Oslo"])


def test_toy_fact_metrics_are_the_hand_computed_values():
    after = measure(EDITED, TOK, TOY_FACT)
    before = measure(BASE, TOK, TOY_FACT)
    assert after.accuracy["rel"] == pytest.approx([2 / 3])
    assert after.accuracy["gen"] == pytest.approx([1.0, 1 / 3])
    assert after.accuracy["port"] == pytest.approx([3 / 4])
    # mean per-token log-probabilities: NY = (hi + hi + lo) / 3, LA = (hi + lo + lo) / 3
    assert after.logprob["rel"] == pytest.approx([(2 * HI + LO) / 3], abs=1e-5)
    assert after.logprob["eff_true"] == pytest.approx([(HI + 2 * LO) / 3], abs=1e-5)
    assert after.logprob["par_true"] == pytest.approx([(HI + 2 * LO) / 3, HI], abs=1e-5)
    assert after.logprob["nb_new"] == pytest.approx([(HI + 2 * LO) / 3], abs=1e-5)
    assert after.logprob["nb_true"] == pytest.approx([(2 * HI + LO) / 3], abs=1e-5)
    assert score(after, before) == pytest.approx({
        "reliability": 2 / 3,
        "generalization": (1.0 + 1 / 3) / 2,
        "locality": 3 / 5,            # " Oslo": space, O, s the same; l and o not
        "portability": 3 / 4,
        "efficacy_score": 1.0,        # NY beats LA after the prompt
        "paraphrase_score": 0.5,      # NY wins on the first rephrase, LA on the second
        "neighborhood_score": 1.0,    # LA beats NY after "Bob naps by"
    })
    assert score(after, after)["locality"] == 1.0 and "locality" not in score(after, None)


def test_teacher_forcing_off_by_one():
    """The first target token is predicted from the prompt's last position: a model that
    predicts the token at each position (not the next) must score 0, not 1."""
    at = Oracle([], at=True)
    m = measure(at, TOK, TOY_FACT)
    assert m.accuracy["rel"] == [0.0] and m.accuracy["gen"] == [0.0, 0.0] and m.accuracy["port"] == [0.0]
    # The right model shifted by one position (each row's logits moved one step later)
    # also fails: what it gets right is the token at the position.
    class Late(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kw):
            lg = EDITED(input_ids).logits
            return SimpleNamespace(logits=torch.cat([torch.zeros_like(lg[:, :1]), lg[:, :-1]], 1))
    assert measure(Late(), TOK, TOY_FACT).accuracy["rel"] == [0.0]


def test_a_prompt_ending_in_whitespace_takes_the_target_without_a_leading_space():
    f = Fact(prompt="Ann is in ", target_new="NY")        # targets N, Y: N right, Y wrong
    assert measure(EDITED, TOK, f).accuracy["rel"] == pytest.approx([0.5])


def test_batched_measurement_equals_one_fact_at_a_time():
    other = Fact(prompt="She lives at", target_new="NY", locality_prompts=(LocalityPrompt("Bob naps by"),))
    facts = [TOY_FACT, other, TOY_FACT]
    one = [measure(EDITED, TOK, f) for f in facts]
    for kw in ({}, {"tokens_per_batch": 20, "max_rows": 2}, {"max_rows": 1}):
        assert measure_many(EDITED, TOK, facts, **kw) == one
    only = measure_many(BASE, TOK, facts, kinds={"loc"})
    assert [m.argmax for m in only] == [measure(BASE, TOK, f).argmax for f in facts]
    assert all(not m.accuracy for m in only)
    # a locality prompt without an answer is scored on the next token only
    assert score(one[1], measure(BASE, TOK, other))["locality"] == 1.0
    assert mean_metrics([{"a": 1.0, "b": 0.0}, {"a": 0.5}]) == {"a": 0.75, "b": 0.0}


def test_ngram_entropy_on_known_strings():
    # words a b a b: bigrams ab, ba, ab (2/3, 1/3); trigrams aba, bab (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # 6 distinct words: 5 distinct bigrams, 4 distinct trigrams
    assert ngram_entropy("the cat sat on a mat") == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * 2.0) / 2)
    assert ngram_entropy("") == 0.0 and ngram_entropy("one") == 0.0
    assert words("Hi, it's me.") == ["Hi", ",", "it's", "me", "."]
    assert ngram_entropy("go " * 40) < ngram_entropy("the quick brown fox jumps over the lazy dog")


def test_fluency_of_toy_generations():
    # "Ann is in" continues " NZ", then the end token: text "Ann is in NZ", 4 distinct words,
    # so 3 distinct bigrams and 2 trigrams; "She lives at" + " NY" likewise; "Zed" + nothing
    assert greedy_generate(EDITED, TOK, ["Ann is in", "She lives at", "Ann is in", "Zed"]) == [" NZ", " NY", " NZ", ""]
    per = fluency(EDITED, TOK, [Fact(prompt="Ann is in", target_new="x", rephrase_prompts=("She lives at",)),
                                Fact(prompt="Zed", target_new="x", rephrase_prompts=("She lives at",))])
    four_words = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert per == pytest.approx([four_words, four_words / 2])
    # a cycle with no end token stops at the length limit, prompt included
    cyc = Oracle(["ab abcabcabcabcabcabcabcabcabcabcabcabc"])
    [out] = greedy_generate(cyc, TOK, ["ab abc"], max_length=20)
    assert len(TOK("ab abc" + out)["input_ids"]) == 20 and out == "abcabcabcabcab"


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_greedy_generate_with_kv_cache_equals_transformers_generate(family, request):
    from ledger.models import load_base
    base = load_base(str(request.getfixturevalue(family)))
    prompts = ["Alice lives in", "Bob", "Alice lives at", "The home of Alice is"]
    got = greedy_generate(base.model, base.tokenizer, prompts, max_length=30)
    for p, g in zip(prompts, got):
        enc = base.tokenizer(p, return_tensors="pt")
        n = 30 - enc["input_ids"].shape[1]
        want = base.model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
        assert g == base.tokenizer.decode(want[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# --- portability in the fact formats --------------------------------------------------------

def test_portability_prompts_parse_validate_and_round_trip():
    native = dict(FACT, portability_prompts=[{"prompt": "Alice's city is in", "answer": "Italy"}])
    knowedit = {"subject": "Paris", "prompt": "Paris is the capital of", "target_new": "Italy",
                "ground_truth": ["France"],
                "portability": {"Reasoning": [{"prompt": "The currency of the country Paris is in is",
                                               "ground_truth": [["Euro", "EUR"]]}],
                                "Subject_Aliasing": [{"prompt": "The City of Light is the capital of",
                                                      "ground_truth": ["Italy"]}]}}
    zsre = {"subject": "X", "src": "What is X?", "alt": "a Y", "answers": ["a Z"],
            "portability": {"New Question": "What is the thing X is?", "New Answer": "Y"}}
    a, b, c = parse_facts_text(json.dumps([native, knowedit, zsre]))
    assert a.portability_prompts == (PortabilityPrompt("Alice's city is in", "Italy"),)
    assert [p.answer for p in b.portability_prompts] == ["Euro", "Italy"]
    assert c.portability_prompts == (PortabilityPrompt("What is the thing X is?", "Y"),)
    for f in (a, b, c):   # the native form round-trips
        assert parse_facts_text(json.dumps(f.to_dict())) == [f]
    assert "portability_prompts" not in parse_facts_text(json.dumps(FACT))[0].to_dict()
    for bad, fmt, needle in [
            (dict(FACT, portability_prompts=[{"prompt": "p"}]), "auto", "portability_prompts[0]: missing"),
            (dict(FACT, portability_prompts=["p"]), "auto", "portability_prompts[0]: expected an object"),
            (dict(knowedit, portability=[1]), "knowedit", "'portability' must be an object"),
            (dict(knowedit, portability={"R": [{"prompt": "p"}]}), "auto", "missing required field 'answer'")]:
        with pytest.raises(InputError, match=r"record 0.*" + needle.replace("[", r"\[").replace("]", r"\]")):
            parse_facts_text(json.dumps([bad]), fmt=fmt)


# --- Ledger.evaluate and `ledger eval` -----------------------------------------------------------

def n_evaluations(url):
    eng = make_engine(url)
    with eng.connect() as c:
        n = c.execute(text("SELECT count(*) FROM evaluations")).scalar()
    eng.dispose()
    return n


def test_evaluate_a_real_trained_edit(db_url, tiny_llama):
    facts = facts_from_records([FACT, FACT2, dict(FACT3, portability_prompts=[{"prompt": "Erin's game:", "answer": "chess"}])])
    with Ledger.init(db_url, model=str(tiny_llama)) as lg:
        [res] = lg.add(facts[:1], BaftConfig(**{**FAST, "steps": 12}))
        base = lg.evaluate(facts, "rev-1", label="base")
        edited = lg.evaluate(facts, fluency=True)
        assert base.revision == "rev-1" and edited.revision == "rev-2" and edited.n == 3
        assert base.dataset_sha256 == edited.dataset_sha256 and base.id == "eval-1" and edited.id == "eval-2"
        # the base against itself: locality is 1 wherever there are locality prompts
        assert [r.get("locality") for r in base.per_fact] == [1.0, 1.0, None]
        assert "portability" in base.per_fact[2] and "fluency" not in base.means
        # the first edit's parent is the base: evaluating it alone reproduces its creation
        # metrics (the teacher-forced ones; fluency and the free-generation ones are eval's own)
        own = {"fluency", "base_fluency", "repetition", "base_repetition"}
        assert {k: v for k, v in edited.per_fact[0].items()
                if k not in own and "gen_" not in k} == pytest.approx(res.metrics)
        assert set(edited.means) >= {"reliability", "locality", "portability", "fluency", "gen_reliability"}
        assert edited.means == pytest.approx(mean_metrics(edited.per_fact))
        assert all(r["fluency"] >= 0 for r in edited.per_fact) and edited.options["fluency"] is True

        show = lg.show("rev-2").to_dict()
        [ev] = show["evaluations"]
        assert ev["id"] == "eval-2" and ev["means"] == edited.means and "per_fact" not in ev
        assert lg.evaluations("rev-1")[0].per_fact == base.per_fact
        assert "evaluations" not in lg.log()[0].to_dict()
        d = lg.diff("rev-1", "rev-2")
        [delta] = d.eval_deltas
        assert delta["a"] == "eval-1" and delta["b"] == "eval-2" and delta["label_a"] == "base"
        assert delta["deltas"] == pytest.approx({k: edited.means[k] - base.means[k] for k in base.means}, abs=1e-6)
        assert lg.diff("rev-1", "rev-1").eval_deltas[0]["deltas"] == {k: 0.0 for k in base.means}
        # another fact set is another dataset: nothing to compare
        lg.evaluate(facts[:2], "rev-1")
        assert len(lg.diff("rev-1", "rev-2").eval_deltas) == 1
        [audit] = lg.audit(command="eval", rev="rev-2")
        assert audit["details"]["evaluation"] == "eval-2" and audit["details"]["n"] == 3
        assert lg.verify() == []
        before = (counts(db_url), n_evaluations(db_url))
        for call, err in [(lambda: lg.evaluate(facts, "rev-9"), NotFoundError),
                          (lambda: lg.evaluate([]), InputError),
                          (lambda: lg.evaluate(facts, label="x" * 201), InputError),
                          (lambda: lg.evaluate([Fact(prompt="word " * 300, target_new="y")]), InputError)]:
            with pytest.raises(err):
                call()
        assert (counts(db_url), n_evaluations(db_url)) == before


@pytest.fixture
def cli_run(db_url, tiny_llama):
    runner = CliRunner()

    def _run(*args, code=0):
        result = runner.invoke(cli, ["--db", db_url, *args], catch_exceptions=False)
        assert result.exit_code == code, (result.output, result.stderr)
        return result
    _run("init", "--model", str(tiny_llama))
    return _run


def test_eval_command_stores_shows_and_diffs(cli_run, db_url, facts_file, fact_file):
    run = cli_run
    run("add", str(fact_file), "--steps", "6", "--rank", "2", "--layer", "1")
    res = run("eval", str(facts_file), "--rev", "rev-1", "--label", "before")
    first = res.stdout.splitlines()[0]
    assert first.startswith("eval-1  rev-1  3 facts  dataset ") and first.endswith("before")
    assert any(l.split() == ["locality", "1.000"] for l in res.stdout.splitlines())
    out = json.loads(run("eval", str(facts_file), "--json").stdout)
    assert out["id"] == "eval-2" and out["revision"] == "rev-2" and len(out["per_fact"]) == 3
    assert out["means"]["reliability"] == pytest.approx(sum(r["reliability"] for r in out["per_fact"]) / 3)
    part = json.loads(run("eval", str(facts_file), "--offset", "1", "--limit", "1", "--fluency", "--json").stdout)
    assert part["n"] == 1 and "fluency" in part["means"] and part["dataset_sha256"] != out["dataset_sha256"]
    assert n_evaluations(db_url) == 3

    show = json.loads(run("show", "rev-2", "--json").stdout)
    assert [e["id"] for e in show["evaluations"]] == ["eval-2", "eval-3"]
    human = run("show", "rev-2").stdout
    assert "= eval-2  3 facts  dataset " + out["dataset_sha256"][:12] in human and "reliability=" in human
    diff = json.loads(run("diff", "rev-1", "rev-2", "--json").stdout)
    assert [(e["a"], e["b"]) for e in diff["eval_deltas"]] == [("eval-1", "eval-2")]
    assert f"= dataset {out['dataset_sha256'][:12]} (3 facts) eval-1 -> eval-2" in run("diff", "rev-1", "rev-2").stdout
    audit = json.loads(run("audit", "--command", "eval", "--json").stdout)
    assert [a["details"]["evaluation"] for a in audit] == ["eval-3", "eval-2", "eval-1"]


@pytest.mark.parametrize("content, args, code, needle", [
    (b"{not json", [], 2, "not JSON"),
    (b'[{"prompt": "a", "target_new": "b"}, {"prompt": 5, "target_new": "b"}]', [], 2, "record 1"),
    (json.dumps(FACT).encode(), ["--rev", "rev-9"], 2, "no revision rev-9"),
    (json.dumps(FACT).encode(), ["--rev", "x;DROP TABLE refs"], 2, "invalid revision name"),
    (json.dumps(FACT).encode(), ["--format", "rome"], 2, "record 0"),
    (json.dumps(FACT).encode(), ["--offset", "5"], 2, "no records in the range"),
    (json.dumps({"prompt": "word " * 300, "target_new": "y"}).encode(), [], 2, "context"),
])
def test_eval_bad_input_is_one_line_and_writes_nothing(cli_run, db_url, tmp_path, content, args, code, needle):
    f = tmp_path / "in.json"
    f.write_bytes(content)
    before = (counts(db_url), n_evaluations(db_url))
    res = cli_run("eval", str(f), *args, code=code)
    assert res.stderr.startswith("error: ") and needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert (counts(db_url), n_evaluations(db_url)) == before
    res = cli_run("eval", str(tmp_path / "missing.json"), code=2)
    assert "no such fact file" in res.stderr and (counts(db_url), n_evaluations(db_url)) == before
