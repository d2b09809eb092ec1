"""Free-generation metrics (gen_reliability, gen_generalization, gen_locality, repetition and
their base_* values) against toy models whose greedy output is known by construction, and
through `Ledger.evaluate` and `ledger eval` on a tiny ledger."""
import json
import math

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import BaftConfig, Fact, Ledger, LocalityPrompt
from ledger.evaluate import (GEN_LOCALITY_TOKENS, GEN_NEW_TOKENS, Generations, fluency, generate_many,
                             generation_metrics, generation_scores, greedy_generate, greedy_token_ids,
                             mean_metrics, n_generations, repeats, starts_with_target)
from ledger.editing import looping_wordings
from ledger.facts import facts_from_records

from support import FACT, FACT2, FACT3, FAST, TOK, Oracle

GEN_KEYS = {"gen_reliability", "gen_generalization", "gen_locality", "repetition", "gen_entropy",
            "base_gen_reliability", "base_gen_generalization", "base_repetition", "base_gen_entropy"}

# Toy models (a next-token lookup from the last 3 byte tokens; an unknown context ends the
# text): the edited one and the base one. Each locality prompt's continuation is 9 tokens,
# " " + 8 letters; the edited model keeps " Oslo", changes "Kim dozed on" at the 7th generated
# token (after GEN_LOCALITY_TOKENS = 6: unchanged) and "Dee went to" at the 6th (changed).
EDITED = Oracle(["Ann is in NY", "She lives at NYC", "Her city: LA",
                 "Bob naps by Oslo", "Kim dozed on abcdeXgh", "Dee went to mnopXrst",
                 "Zoe says no, no, no, no, no, no, no, no",    # loops on "no" past any length
                 "Max hums ok sir", "Q: ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
BASE = Oracle(["Ann is in Paris", "She lives at Rome", "Her city: NY",
               "Bob naps by Oslo", "Kim dozed on abcdefgh", "Dee went to mnopqrst",
               "Zoe says hi", "Max hums ok sir"])
CITY = Fact(prompt="Ann is in", target_new="NY", rephrase_prompts=("She lives at", "Her city:"),
            locality_prompts=(LocalityPrompt("Bob naps by", "Oslo"), LocalityPrompt("Kim dozed on"),
                              LocalityPrompt("Dee went to")))
LOOP = Fact(prompt="Zoe says", target_new="no", rephrase_prompts=("Max hums",))
LONG = Fact(prompt="Q:", target_new="ABCDEFGHIJKLMNOPQRSTUVWXYZ")   # 27 tokens with its space


def test_the_toy_generations_are_the_constructed_ones():
    g_city, g_loop, g_long = generate_many(EDITED, TOK, [CITY, LOOP, LONG])
    # "Ann is in" shares the context " NY" with "She lives at NYC", so it goes on to "C"
    assert (g_city.prompt, g_city.rephrases) == (" NYC", [" NYC", " LA"])
    assert g_city.locality == [" Oslo", " abcdeXgh", " mnopXrst"]
    assert g_city.locality_ids == [greedy_token_ids(EDITED, TOK, [lp.prompt], max_new_tokens=GEN_NEW_TOKENS)[0]
                                   for lp in CITY.locality_prompts]
    # the loop runs to GEN_NEW_TOKENS new tokens: " no," is 4 tokens
    assert g_loop.prompt == " no, no, no, no, no," and len(TOK(g_loop.prompt)["input_ids"]) == GEN_NEW_TOKENS == 20
    assert g_loop.rephrases == [" ok sir"] and g_loop.locality == []
    # a target longer than GEN_NEW_TOKENS - 2 tokens gets its token count + 2
    assert g_long.prompt == " ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert n_generations([CITY, LOOP, LONG]) == 6 + 2 + 1


def test_generation_metrics_of_the_toy_models():
    edited = generate_many(EDITED, TOK, [CITY, LOOP, LONG])
    base = generate_many(BASE, TOK, [CITY, LOOP, LONG])
    assert [g.prompt for g in base] == [" Paris", " hi", ""]
    # n-gram entropy of the continuations: " NYC", " Oslo" and the like have fewer than two
    # words (0); " abcdeXgh" one word as well. The loop " no, no, no, no, no,": 9 bigrams
    # (5 "no ,", 4 ", no") and 8 trigrams (4 and 4); " ok sir": one bigram, no trigram.
    h2 = -(5 / 9 * math.log2(5 / 9) + 4 / 9 * math.log2(4 / 9))
    loop_entropy = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert generation_metrics(CITY, edited[0], base[0]) == pytest.approx({
        "gen_entropy": 0.0, "base_gen_entropy": 0.0,
        "gen_reliability": 1.0,          # " NYC" starts with NY
        "gen_generalization": 0.5,       # " NYC" yes, " LA" no
        "gen_locality": 2 / 3,           # Oslo same, Kim changed after 6 tokens, Dee within them
        "repetition": 0.0,
        "base_gen_reliability": 0.0,     # " Paris"
        "base_gen_generalization": 0.5,  # " Rome" no, " NY" yes
        "base_repetition": 0.0})
    assert generation_metrics(LOOP, edited[1], base[1]) == pytest.approx({
        "gen_reliability": 1.0, "gen_generalization": 0.0, "repetition": 0.5,   # the loop, not " ok sir"
        "gen_entropy": loop_entropy / 2,
        "base_gen_reliability": 0.0, "base_gen_generalization": 0.0, "base_repetition": 0.0,
        "base_gen_entropy": 0.0})
    # with the 20-token generations the target would be cut off after 19 letters: 0.0
    assert generation_metrics(LONG, edited[2], base[2])["gen_reliability"] == 1.0
    # a model against itself keeps every locality prompt
    assert generation_scores(CITY, base[0], base[0])["gen_locality"] == 1.0
    assert "gen_locality" not in generation_scores(CITY, edited[0], None)


def _gen(locality_ids):
    return Generations(prompt="", locality=["" for _ in locality_ids], locality_ids=locality_ids)


def test_gen_locality_compares_exactly_the_first_n_token_ids():
    n = GEN_LOCALITY_TOKENS
    assert n == 6
    ref = list(range(100, 120))
    fact = Fact(prompt="p", target_new="t", locality_prompts=(LocalityPrompt("a"),))

    def loc(ids):
        return generation_scores(fact, _gen([ids]), _gen([ref]))["gen_locality"]
    assert loc(list(ref)) == 1.0
    assert loc(ref[:n] + [0] * (20 - n)) == 1.0                  # changed only after N tokens
    assert loc(ref[:n - 1] + [0] + ref[n:]) == 0.0               # changed at the N-th token
    assert loc([0] + ref[1:]) == 0.0                             # changed at the first
    assert loc(ref[:n - 1]) == 0.0                               # ended (end token) within N
    assert generation_scores(fact, _gen([ref[:3]]), _gen([ref[:3]]))["gen_locality"] == 1.0   # both ended alike


def test_starts_with_target_and_repeats():
    assert starts_with_target(" NY and more", "NY") and starts_with_target("\n  NY", " NY ")
    assert not starts_with_target(" the NY", "NY") and not starts_with_target(" N", "NY")
    assert not starts_with_target("", "NY") and not starts_with_target(" ny", "NY")
    for text in ["painter painter painter", "Germany, Germany Germany", "Germany, Germany, Germany.",
                 "It is Painter painter PAINTER", "go go go go", "a b c c c"]:
        assert repeats(text), text
    for text in ["painter painter", "Germany, France, Germany, Germany", "a, b, a, b, a",
                 "...", "", "the cat sat on the mat", "!!! !!! !!!"]:
        assert not repeats(text), text


def test_greedy_generation_with_max_new_tokens():
    cyc = Oracle(["ab abcabcabcabcabcabcabcabcabcabcabcabc"])
    # one number for all, or one per prompt: prompts of equal length batch together and each
    # row is cut to its own limit, equal to its unbatched generation
    assert greedy_generate(cyc, TOK, ["ab abc", "ab abc"], max_new_tokens=[2, 7]) == ["ab", "abcabca"]
    assert greedy_generate(cyc, TOK, ["ab abc"], max_new_tokens=7) == ["abcabca"]
    assert greedy_generate(cyc, TOK, ["ab abc"], max_new_tokens=0) == [""]
    assert greedy_token_ids(cyc, TOK, ["ab abc"], max_new_tokens=3) == [TOK("abc")["input_ids"]]
    with pytest.raises(ValueError):
        greedy_generate(cyc, TOK, ["ab abc"], max_new_tokens=[1, 2])
    # max_length mode (prompt included) is unchanged: 20 tokens in all
    [out] = greedy_generate(cyc, TOK, ["ab abc"], max_length=20)
    assert out == "abcabcabcabcab"


def test_looping_wordings_are_those_whose_continuation_repeats_a_word():
    # EDITED loops after "Zoe says" (" no, no, no, ...") and not after "Max hums" (" ok sir")
    # or "Ann is in" (" NYC"); each fact's prompt is checked with its wordings.
    found = looping_wordings(EDITED, TOK, [LOOP, CITY], [["Max hums"], ["She lives at", "Zoe says"]])
    assert found == [["Zoe says"], ["Zoe says"]]
    assert looping_wordings(BASE, TOK, [LOOP, CITY], [["Max hums"], ["She lives at", "Zoe says"]]) == [[], []]


# --- Ledger.evaluate and `ledger eval` -----------------------------------------------------------

def test_evaluate_stores_generation_metrics_at_the_revision_and_the_base(db_url, tiny_llama):
    facts = facts_from_records([FACT, FACT2, FACT3])
    calls = []
    with Ledger.init(db_url, model=str(tiny_llama)) as lg:
        lg.add(facts[:1], BaftConfig(**FAST))
        rep = lg.evaluate(facts, "rev-2", fluency=True, progress=calls.append)
        assert rep.options["generation"] is True
        assert rep.options["generation_new_tokens"] == 20 and rep.options["generation_locality_tokens"] == 6
        assert GEN_KEYS <= set(rep.means) and {"fluency", "base_fluency"} <= set(rep.means)
        assert rep.means == pytest.approx(mean_metrics(rep.per_fact))
        assert [("gen_locality" in r) for r in rep.per_fact] == [True, True, False]   # FACT3 has no locality prompt
        # the same numbers as the library functions on the composed models, base first
        at_base = lg.model_at("rev-1")
        base_gens = generate_many(at_base.model, at_base.tokenizer, facts)
        base_flu = fluency(at_base.model, at_base.tokenizer, facts)
        at_rev = lg.model_at("rev-2")
        gens = generate_many(at_rev.model, at_rev.tokenizer, facts)
        for row, fact, g, b, bf in zip(rep.per_fact, facts, gens, base_gens, base_flu):
            assert {k: row[k] for k in row if k in GEN_KEYS} == pytest.approx(generation_metrics(fact, g, b))
            assert row["base_fluency"] == pytest.approx(bf)
        # progress counts every phase: base locality, base generation, base fluency, the
        # revision's sequences, its fluency and its generation
        n_ref, n_all = 2, 7 + 2 + 1      # locality answers; FACT's 7 sequences, FACT2's 2, FACT3's 1
        n_gen, n_flu = n_generations(facts), 2 + 1 + 1
        assert n_gen == 3 + 2 + 1
        total = n_ref + n_all + 2 * n_gen + 2 * n_flu   # generation and fluency at the base and at rev-2
        assert {c.total for c in calls} == {total} and calls[-1].done == total
        assert [c.done for c in calls] == sorted(c.done for c in calls)
        assert {c.phase for c in calls} >= {"base model generation", "base model fluency", "generation", "fluency"}
        [stored] = lg.evaluations("rev-2")
        assert stored.means == rep.means and stored.per_fact == rep.per_fact and stored.options == rep.options
        [audit] = lg.audit(command="eval")
        assert audit["details"]["generation"] is True

        # at a revision with no edits the base model is the revision
        at_base_rep = lg.evaluate(facts, "rev-1", fluency=True)
        for row in at_base_rep.per_fact:
            assert row.get("gen_locality", 1.0) == 1.0 and row["base_repetition"] == row["repetition"]
            assert row["base_gen_reliability"] == row["gen_reliability"] and row["base_fluency"] == row["fluency"]
        # both evaluations agree on the base model's values
        for a, b in zip(at_base_rep.per_fact, rep.per_fact):
            assert {k: v for k, v in a.items() if k.startswith("base_")} == pytest.approx(
                {k: v for k, v in b.items() if k.startswith("base_")})

        off = lg.evaluate(facts, "rev-2", generation=False)
        assert not (GEN_KEYS & set(off.means)) and off.options["generation"] is False
        assert "generation_new_tokens" not in off.options
        assert {k: v for k, v in rep.means.items() if k not in GEN_KEYS and "fluency" not in k} == pytest.approx(off.means)


def test_eval_command_generation_metrics_and_no_generation(db_url, tiny_llama, facts_file, fact_file):
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, ["--db", db_url, *args], catch_exceptions=False)
        assert result.exit_code == 0, (result.output, result.stderr)
        return result.stdout
    run("init", "--model", str(tiny_llama))
    run("add", str(fact_file), "--steps", "6", "--rank", "2", "--layer", "1")
    out = json.loads(run("eval", str(facts_file), "--json"))
    assert GEN_KEYS <= set(out["means"]) and out["options"]["generation"] is True
    assert all({"gen_reliability", "repetition", "base_repetition"} <= set(r) for r in out["per_fact"])
    assert out["means"]["gen_reliability"] == pytest.approx(sum(r["gen_reliability"] for r in out["per_fact"]) / 3)
    human = run("eval", str(facts_file)).splitlines()
    assert any(l.split()[:1] == ["base_gen_generalization"] and len(l.split()) == 2 for l in human)
    off = json.loads(run("eval", str(facts_file), "--no-generation", "--json"))
    assert not (GEN_KEYS & set(off["means"])) and not any(GEN_KEYS & set(r) for r in off["per_fact"])
    assert off["options"]["generation"] is False
    assert off["means"]["reliability"] == out["means"]["reliability"]
    human_off = run("eval", str(facts_file), "--no-generation")
    assert "gen_reliability" not in human_off and "reliability" in human_off
