"""Progress events: add, rebase and evaluate report done/total over the whole command, so a
progress bar needs nothing but the events."""
import json

from ledger import BaftConfig, ProgressEvent, parse_facts_text

STEPS = 6
FAST = {"steps": STEPS, "min_steps": 0, "rank": 2, "layer": 1, "n_prefixes": 1}
FACTS = [{"subject": "Alice", "prompt": "Alice lives in", "target_new": "Rome"},
         {"subject": "Carol", "prompt": "Carol works at", "target_new": "a farm"},
         {"subject": "Erin", "prompt": "Erin plays", "target_new": "chess"}]


def test_add_reports_training_steps_over_all_facts(ledger):
    events: list[ProgressEvent] = []
    ledger.add(parse_facts_text(json.dumps(FACTS[:2])), BaftConfig(**FAST), progress=events.append)
    assert events and {e.phase for e in events} == {"train"}
    assert {e.total for e in events} == {2 * STEPS}
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert {(e.label, e.fact, e.n_facts) for e in events} == {("edit 1/2", 0, 1), ("edit 2/2", 1, 1)}
    for e in events:
        assert e.done == e.fact * STEPS + e.step and e.steps == STEPS and 1 <= e.step <= STEPS


def test_a_batch_counts_each_of_its_facts_per_step(ledger):
    events: list[ProgressEvent] = []
    ledger.add(parse_facts_text(json.dumps(FACTS[:2])), BaftConfig(**FAST), batch=2, progress=events.append)
    assert events and {(e.label, e.fact, e.n_facts, e.total) for e in events} == {("edits 1-2/2", 0, 2, 2 * STEPS)}
    assert all(e.done == 2 * e.step for e in events)


def test_rebase_sizes_its_total_from_the_stale_edits_own_steps(ledger):
    ledger.add(parse_facts_text(json.dumps(FACTS)), BaftConfig(**FAST))
    ledger.revert("edit-1")                     # edits 2 and 3 were trained with edit-1 on
    assert ledger.stale_edits() == ["edit-2", "edit-3"]
    events: list[ProgressEvent] = []
    results = ledger.rebase(progress=events.append)
    assert [r.superseded for r in results] == [["edit-2"], ["edit-3"]]
    assert {e.total for e in events} == {2 * STEPS}
    assert {e.label for e in events} == {"edit 1/2", "edit 2/2"}
    assert [e.done for e in events] == sorted(e.done for e in events)


def test_evaluate_reports_each_phase(ledger):
    facts = parse_facts_text(json.dumps(FACTS))
    ledger.add(facts[:1], BaftConfig(**FAST))
    events: list[ProgressEvent] = []
    ledger.evaluate(facts, progress=events.append)
    assert {e.phase for e in events} == {"base model generation", "measure", "generation"}
    assert {e.label for e in events if e.phase == "measure"} == {"rev-2"}
    assert len({e.total for e in events}) == 1 and events[-1].done == events[-1].total
