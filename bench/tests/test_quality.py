"""bench/quality.py's bookkeeping: the strict hold-out over a record range (--held-out-records)
is the union of its parts' and must cover the evaluated records; CounterFact rows split
generalisation by the kind of rephrase (a paraphrase, or a question about something else)."""
from __future__ import annotations

import argparse

import pytest

import quality
from ledger.facts import fact_from_record

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
    rec = {"prompt": "The painter of {} is", "subject": "Guernica", "target_new": "Monet",
           "rephrase_prompts": ["{} was painted by"]}
    fact = fact_from_record({**rec, "prompt": rec["prompt"].format(rec["subject"]),
                             "rephrase_prompts": [p.format(rec["subject"]) for p in rec["rephrase_prompts"]]})
    out = quality.held_out_pairs(WORDINGS, [fact])
    assert out and all("{} was painted by" in pair for pair in out)


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
