"""bench/quality.py's bookkeeping: the strict hold-out over a record range (--held-out-records)
is the union of its parts' and must cover the evaluated records; CounterFact rows split
generalisation by the kind of rephrase (a paraphrase, or a question about something else)."""
from __future__ import annotations

import argparse
import json

import pytest

import ledger.editing as editing
import quality
from ledger import Ledger
from ledger.facts import fact_from_record, parse_facts_text
from support import FACT, FAST, write_model

WORDINGS = [quality.DATA_DIR / name for name in quality.BUILTIN]


def test_record_range_parses_a_to_b_and_refuses_the_rest():
    assert quality.record_range("0:200") == (0, 200)
    for bad in ("5", "3:3", "4:2", "-1:5", "a:b", ":7"):
        with pytest.raises(argparse.ArgumentTypeError):
            quality.record_range(bad)


def test_the_hold_out_of_a_range_is_the_union_of_its_parts():
    facts = [fact for _, fact in quality.load_dataset(quality.ROOT / "bench" / "data", "everyday", 0, 40)]
    parts = quality.held_out_pairs(WORDINGS, facts[:20]) | quality.held_out_pairs(WORDINGS, facts[20:])
    whole = quality.held_out_pairs(WORDINGS, facts)
    assert whole == parts and quality.held_out_pairs(WORDINGS, facts[:20]) < whole


def test_a_record_range_that_misses_evaluated_records_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--datasets", "everyday", "--settings", "single", "--methods", "baft", "--n", "5",
                      "--offset", "10", "--held-out-records", "0:12"])
    assert e.value.code == 2
    assert "must cover the evaluated records 10:15" in capsys.readouterr().err


def test_a_rephrase_of_the_range_leaves_the_table():
    """A rephrase wording of one fact of the range is out of reach of every other edit: here
    the catalogue's key "{} was painted by", which the nearest relation would lend."""
    def fact(subject, rephrase):
        return fact_from_record({"prompt": f"The painter of {subject} is", "subject": subject, "target_new": "Monet",
                                 "rephrase_prompts": [rephrase.format(subject)]})
    facts = [fact("Guernica", "{} was painted by"), fact("The Night Watch", "Q: Who painted {}? A:")]
    assert "{} was painted by" in _reachable(quality.held_out_pairs(WORDINGS, facts), facts[1:])
    out = quality.held_out_pairs(WORDINGS, facts, CFG)
    assert any(r == "{} was painted by" for r, _ in out)
    assert not _reachable(out, facts) & {"{} was painted by", "Q: Who painted {}? A:"}


def test_a_rephrase_is_held_out_as_the_fact_writes_the_table_wording():
    """The Mona Lisa trains on "The painter of {} is" as "The painter of the Mona Lisa is"
    (wordings.SubjectForm), so a rephrase with that text holds the bare wording out too."""
    mona = fact_from_record({"prompt": "The Mona Lisa was painted by", "subject": "Mona Lisa", "target_new": "Monet",
                             "rephrase_prompts": ["It hangs in Paris. The painter of the Mona Lisa is"]})
    assert ("{} was painted by", "The painter of {} is") in quality.held_out_pairs(WORDINGS, [mona])
    out = quality.held_out_pairs(WORDINGS, [mona], CFG)
    assert "The painter of the {} is" not in _reachable(out, [mona])


def _fact(rephrase: str):
    return fact_from_record({"prompt": "Richard Wagner died in", "subject": "Richard Wagner", "target_new": "Paris",
                             "rephrase_prompts": [rephrase]})


def test_a_rephrase_asking_another_question_is_told_from_a_paraphrase():
    assert quality.rephrase_kind(_fact("Richard Wagner passed away in")) == "paraphrase"
    assert quality.rephrase_kind(_fact("Where Richard Wagner passed away, people speak the language of")) \
        == "another_question"


def test_a_counterfact_row_splits_generalisation_by_rephrase_kind():
    run = quality.Run("counterfact", "baft", "single", None)
    for rephrase, gen in (("Richard Wagner passed away in", 1.0), ("Richard Wagner's life ended in", 0.5),
                          ("Richard Wagner's surroundings include", 0.0)):
        run.record(_fact(rephrase), {"reliability": 1.0, "generalization": gen, "locality": 1.0}, {})
    row = run.row({}, {})
    assert row["generalization"] == 0.5
    assert row["by_rephrase_kind"] == {"paraphrase": {"n": 2, "generalization": 0.75},
                                       "another_question": {"n": 1, "generalization": 0.0}}
    assert "by_rephrase_kind" not in quality.Run("everyday", "baft", "single", None).row({}, {})


def test_a_long_sequential_row_splits_its_figures_by_the_order_edits_were_added_in():
    run = quality.Run("everyday", "baft", "sequential", 250)
    for i in range(250):
        run.record(_fact("Richard Wagner passed away in"),
                   {"reliability": 1.0 if i >= 100 else 0.5, "generalization": 1.0, "locality": 1.0}, {})
    row = run.row({}, {})
    assert row["by_order"] == {"1-100": {"n": 100, "reliability": 0.5, "generalization": 1.0, "locality": 1.0},
                               "101-200": {"n": 100, "reliability": 1.0, "generalization": 1.0, "locality": 1.0},
                               "201-250": {"n": 50, "reliability": 1.0, "generalization": 1.0, "locality": 1.0}}
    short = quality.Run("everyday", "baft", "sequential", 100)
    short.record(_fact("Richard Wagner passed away in"), {"reliability": 1.0, "generalization": 1.0, "locality": 1.0}, {})
    assert "by_order" not in short.row({}, {})


def _located(prompt: str, rephrase: str):
    subject = "The Eiffel Tower"
    return fact_from_record({"prompt": prompt.format(subject), "subject": subject, "target_new": "Rome",
                             "rephrase_prompts": [rephrase.format(subject)]})


def _reachable(held: set, facts) -> set[str]:
    """The templates the product would train these facts on, from the built-in table less held."""
    pairs = [p for path in WORDINGS for p in quality.read_pairs(path)[0] if p not in held]
    return quality.reachable_templates(pairs, facts, CFG)


CFG = quality.BaftConfig(train_on_rephrases=False, train_on_locality=False)


def test_a_relation_whose_key_is_evaluated_stays_unless_an_edit_would_be_lent_it():
    """strict leaves out every evaluated wording, and a relation whose key is one only where an
    edit of the run would be lent that key (wordings.nearest); strict-relations leaves out every
    such relation. Under both no edit can train on an evaluated wording."""
    # Its relation has 17 wordings: nothing is borrowed, so "{}, located in" keeps its wordings.
    alone = _located("{} is located in", "{}, located in")
    strict = quality.held_out_pairs(WORDINGS, [alone], CFG)
    whole = quality.held_out_pairs(WORDINGS, [alone], whole_relations=True)
    assert strict < whole
    assert any(r == "{}, located in" for r, _ in whole)
    assert not any(r == "{}, located in" for r, _ in strict)
    assert "{}, located in" not in _reachable(strict, [alone])
    # A fact of few wordings ("{} is a native speaker of") is lent the nearest relation's
    # wordings with its key, "The mother tongue of {} is": another fact's evaluated rephrase.
    evaluated = fact_from_record({"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy",
                                  "rephrase_prompts": ["The mother tongue of Paris is"]})
    borrows = _located("{} is a native speaker of", "Q: {}?")
    facts = [evaluated, borrows]
    without = quality.held_out_pairs(WORDINGS, facts)
    assert "The mother tongue of {} is" in _reachable(without, facts)
    strict = quality.held_out_pairs(WORDINGS, facts, CFG)
    assert any(r == "The mother tongue of {} is" for r, _ in strict - without)
    assert "The mother tongue of {} is" not in _reachable(strict, facts)


def test_an_add_the_loop_check_retrained_counts_both_runs_in_mean_steps_all_runs(tmp_path, monkeypatch):
    """mean_steps is the kept run's; mean_steps_all_runs adds the first run of a retrained edit."""
    def looping(model, tok, facts, wordings):      # the tiny random model: say three wordings loop
        return [[f.prompt, f"{f.subject} is in", f"{f.subject} was in"] for f in facts]
    monkeypatch.setattr(editing, "looping_wordings", looping)
    model = write_model(tmp_path / "tiny", "llama")
    run = quality.Run("everyday", "baft", "single", None)
    with Ledger.init(f"sqlite:///{tmp_path}/l.db", model=str(model), wordings=False) as lg:
        [fact] = parse_facts_text(json.dumps(FACT))
        cfg = quality.BaftConfig.from_dict({**FAST, "loop_check": 3})
        res = quality.add_one(lg, run, cfg, 1, [("f", fact)], "f", fact, set())
    assert res.stats["loop_retrained"] == 3
    assert run.steps == [res.stats["steps"]]
    assert run.all_steps == [res.stats["steps"] + res.stats["first_steps"]]
    row = run.row({}, {})
    assert row["mean_steps_all_runs"] == res.stats["steps"] + res.stats["first_steps"] > row["mean_steps"]
