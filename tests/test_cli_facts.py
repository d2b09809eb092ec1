"""What a careful user meets around facts and the command line's output: unknown fields,
facts without a subject, facts the model already answers, revisions left behind by a
checkout, progress lines, and the wording of plain output."""
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import InputError, Ledger, load_facts, parse_facts_skipping_bad, parse_facts_text

from support import FACT, FACT2, counts

FAST_ARGS = ["--steps", "6", "--rank", "2", "--layer", "1"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(db_url):
    runner = CliRunner()

    def _run(*args, code=0):
        result = runner.invoke(cli, ["--db", db_url, *args], catch_exceptions=False)
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result
    return _run


@pytest.fixture
def initialised(run, tiny_llama):
    run("init", "--model", str(tiny_llama), "--no-wordings")
    return run


# --- 1. unknown fields of the native form --------------------------------------------------------

def test_an_unknown_native_field_is_refused_with_the_intended_name():
    with pytest.raises(InputError, match=r'record 0: unknown field "rephrase" \(did you mean "rephrase_prompts"\?\)'):
        parse_facts_text(json.dumps({**FACT, "rephrase": "The home of Alice is"}))
    with pytest.raises(InputError, match=r'record 1: unknown field "colour" \(the fields are prompt, target_new'):
        parse_facts_text(json.dumps([FACT, {**FACT2, "colour": "red"}]), fmt="native")
    read = parse_facts_skipping_bad(json.dumps([{**FACT, "subjct": "Alice"}, FACT2]))
    assert [f.prompt for f in read.facts] == [FACT2["prompt"]]
    assert read.problems == ['record 0: unknown field "subjct" (did you mean "subject"?)']


def test_other_forms_keep_ignoring_the_fields_they_define():
    counterfact = {"case_id": 1, "prompt": "Alice lives in", "subject": "Alice", "target_new": "Rome",
                   "ground_truth": "Oslo", "rephrase_prompt": "The home of Alice is",
                   "locality_prompt": "Bob lives in", "locality_ground_truth": "Oslo", "pararel_idx": 3}
    rome = {"case_id": 2, "pararel_idx": 5, "requested_rewrite": {
        "prompt": "{} lives in", "subject": "Alice", "relation_id": "P551",
        "target_new": {"str": "Rome", "id": "Q1"}, "target_true": {"str": "Oslo", "id": "Q2"}},
        "paraphrase_prompts": ["The home of Alice is"], "neighborhood_prompts": ["Bob lives in"],
        "generation_prompts": ["Alice is"], "attribute_prompts": ["Carol lives in"]}
    zsre = {"subject": "Alice", "src": "Where does Alice live?", "alt": "Rome", "answers": ["Oslo"],
            "rephrase": "Alice lives where?", "loc": "nq question: who", "loc_ans": "Bob", "cond": "x"}
    knowedit = {"subject": "Alice", "prompt": "Alice lives in", "target_new": "Rome", "ground_truth": "Oslo",
                "locality": {"Relation_Specificity": [{"prompt": "Bob lives in", "ground_truth": ["Oslo"]}]},
                "portability": {}, "extra": 1}
    facts = parse_facts_text(json.dumps([counterfact, rome, zsre, knowedit]))
    assert [f.target_new for f in facts] == ["Rome"] * 4


def test_the_projects_own_fact_files_load():
    assert len(load_facts(ROOT / "bench" / "data" / "everyday-dev.json")) == 40
    assert len(load_facts(ROOT / "bench" / "data" / "descriptions-dev.json")) == 8
    assert len(load_facts(ROOT / "bench" / "data" / "everyday-check.json")) == 32
    assert len(load_facts(ROOT / "examples" / "fact.json")) == 1


@pytest.mark.parametrize("name", ["everyday-dev.json", "descriptions-dev.json", "everyday-check.json"])
def test_the_development_sets_keep_their_own_rules(name):
    """bench/data/README.md: the subject once, verbatim, in the prompt and every rephrase; no
    locality answer equal to the new target; no locality prompt that is another fact's prompt
    or rephrase."""
    facts = load_facts(ROOT / "bench" / "data" / name)
    asked = {p for f in facts for p in [f.prompt, *f.rephrase_prompts]}
    for f in facts:
        assert all(p.count(f.subject) == 1 for p in [f.prompt, *f.rephrase_prompts]), f.subject
        assert len(f.rephrase_prompts) == 3 and len(f.locality_prompts) == 3, f.subject
        assert all(lp.answer != f.target_new and lp.prompt not in asked for lp in f.locality_prompts), f.subject


def test_add_refuses_an_unknown_field_and_skip_bad_skips_it(initialised, db_url, tmp_path):
    f = tmp_path / "typo.json"
    f.write_text(json.dumps([{**FACT, "rephrase": "The home of Alice is"}, FACT2]))
    before = counts(db_url)
    res = initialised("add", str(f), *FAST_ARGS, code=2)
    assert res.stderr.strip() == 'error: record 0: unknown field "rephrase" (did you mean "rephrase_prompts"?)'
    assert counts(db_url) == before
    res = initialised("add", str(f), *FAST_ARGS, "--skip-bad", "--json")
    assert 'skipped record 0: unknown field "rephrase"' in res.stderr
    assert [json.loads(line)["fact"]["prompt"] for line in res.stdout.splitlines()] == [FACT2["prompt"]]


# --- 2. a fact without a subject -----------------------------------------------------------------

def test_add_says_what_a_fact_without_a_subject_trains(initialised, tmp_path):
    f = tmp_path / "nosubject.json"
    f.write_text(json.dumps([{k: v for k, v in FACT.items() if k != "subject"}, FACT2]))
    res = initialised("add", str(f), *FAST_ARGS, "--json")
    notes = [line for line in res.stderr.splitlines() if "has no subject" in line]
    assert notes == ['note: edit-1 ("Alice lives in" -> "Rome") has no subject: it acts at every token of its '
                     'prompts instead of the subject\'s, trained on no relation wordings and supersedes no edit']
    assert len(res.stdout.splitlines()) == 2
    shown = " ".join(initialised("add", "--help").stdout.split())
    assert "A fact without one is added with a note on stderr: its edit acts at every token" in shown


# --- 3. a fact the model already answers ---------------------------------------------------------

@pytest.fixture
def known(monkeypatch):
    """Make the add's precheck find the model answering the facts at these indices (the tiny
    random model answers nothing one can write down)."""
    import ledger.editing as editing
    indices: set[int] = set()
    real = editing.measure_many

    def measure(model, tok, facts, kinds=None, **kw):
        out = real(model, tok, facts, kinds=kinds, **kw)
        if kinds == {"rel"}:      # the precheck's pass
            for i in indices:
                out[i].accuracy["rel"] = [1.0]
        return out
    monkeypatch.setattr(editing, "measure_many", measure)
    return indices


def test_add_skips_a_fact_the_model_already_answers(initialised, known, tmp_path):
    known.add(0)
    f = tmp_path / "facts.json"
    f.write_text(json.dumps([FACT, FACT2]))
    res = initialised("add", str(f), *FAST_ARGS)
    assert "skipped record 0: the model at rev-1 already answers 'Rome' to 'Alice lives in': nothing to edit" \
        in res.stderr.splitlines()
    assert [line.split()[:2] for line in res.stdout.splitlines()] == [["rev-2", "edit-1"]]
    assert "Carol works at -> a farm" in res.stdout

    res = initialised("add", str(f), *FAST_ARGS, "--json")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert rows[0] == {"skipped": True, "record": 0, "fact": {k: v for k, v in FACT.items()},
                       "reason": "the model at rev-2 already answers 'Rome' to 'Alice lives in': nothing to edit"}
    assert rows[1]["revision"] == "rev-3" and rows[1]["fact"]["prompt"] == FACT2["prompt"]


def test_add_strict_refuses_the_file_as_before(initialised, known, db_url, tmp_path):
    known.add(1)
    f = tmp_path / "facts.json"
    f.write_text(json.dumps([FACT, FACT2]))
    before = counts(db_url)
    res = initialised("add", str(f), *FAST_ARGS, "--strict", code=2)
    assert res.stderr.strip() == ("error: record 1: the model at rev-1 already answers 'a farm' to "
                                  "'Carol works at': nothing to edit")
    assert counts(db_url) == before


def test_a_file_of_known_facts_adds_nothing_and_says_so(initialised, known, db_url, tmp_path):
    known.update({0, 1})
    f = tmp_path / "facts.json"
    f.write_text(json.dumps([FACT, FACT2]))
    before = counts(db_url)
    res = initialised("add", str(f), *FAST_ARGS)
    assert res.stdout.strip() == "nothing to add: every fact is already answered"
    assert len([line for line in res.stderr.splitlines() if line.startswith("skipped record")]) == 2
    res = initialised("add", str(f), *FAST_ARGS, "--json")
    assert [json.loads(line)["skipped"] for line in res.stdout.splitlines()] == [True, True]
    assert "nothing to add: every fact is already answered" in res.stderr
    assert counts(db_url) == before


def test_library_add_skip_known_lists_what_it_left_out(ledger, known):
    known.add(1)
    from ledger import BaftConfig
    facts = parse_facts_text(json.dumps([FACT, FACT2, FACT]))
    with pytest.raises(InputError, match="record 1: the model at rev-1 already answers"):
        ledger.add(facts, BaftConfig(steps=2, min_steps=0, rank=2, layer=1))
    res = ledger.add(facts[:2], BaftConfig(steps=2, min_steps=0, rank=2, layer=1), skip_known=True)
    assert [r.edit for r in res] == ["edit-1"]
    assert [(k.record, k.fact["prompt"]) for k in res.skipped] == [(1, "Carol works at")]
    # The add times itself, so the CLI reports throughput from the result.
    assert res.seconds > 0 and res.threads >= 1
    assert res.edits_per_minute == pytest.approx(60 * len(res) / res.seconds)


# --- 4. a checkout that leaves revisions without a ref -------------------------------------------

def test_checkout_warns_about_revisions_it_leaves_without_a_ref(initialised, tmp_path):
    f = tmp_path / "facts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in (FACT, FACT2)))
    initialised("add", str(f), *FAST_ARGS, "--limit", "1")                # rev-2 on main
    initialised("checkout", "rev-1")
    initialised("add", str(f), *FAST_ARGS)                                # rev-3, rev-4 on no ref
    res = initialised("checkout", "main")
    warning = ("warning: leaving 2 revisions behind, on no branch or tag: rev-4, rev-3; "
               "to keep them, run: ledger branch NAME rev-4")
    assert res.stdout.strip() == "HEAD -> main at rev-2" and res.stderr.strip() == warning
    assert initialised("checkout", "rev-4").stderr == ""                  # from an attached HEAD: no warning
    out = json.loads(initialised("checkout", "rev-2", "--json").stdout)
    assert out["left_behind"] == ["rev-4", "rev-3"] and out["warning"] == warning

    initialised("checkout", "rev-4")
    initialised("branch", "keep", "rev-3")                                # rev-3 is kept; rev-4 is not
    res = initialised("checkout", "main")
    assert res.stderr.strip() == ("warning: leaving 1 revision behind, on no branch or tag: rev-4; "
                                  "to keep it, run: ledger branch NAME rev-4")
    initialised("checkout", "rev-3")
    assert initialised("checkout", "main").stderr == ""                   # a branch holds rev-3
    out = json.loads(initialised("checkout", "rev-1", "--json").stdout)
    assert out["left_behind"] == [] and "warning" not in out


def test_library_checkout_lists_what_it_leaves_behind(ledger):
    from support import add_edits
    add_edits(ledger, 1)                                    # rev-2 on main
    assert ledger.checkout("rev-1")["detached"] is True
    add_edits(ledger, 1)                                    # rev-3 on no ref
    assert ledger.checkout("main")["left_behind"] == ["rev-3"]
    assert ledger.checkout("rev-3")["left_behind"] == []    # HEAD was on a branch


# --- 5. progress ---------------------------------------------------------------------------------

def test_progress_off_a_terminal_says_what_each_line_is(initialised, tmp_path):
    f = tmp_path / "facts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in (FACT, FACT2)))
    res = initialised("add", str(f), *FAST_ARGS)
    lines = res.stderr.splitlines()
    assert [line for line in lines if "edit 1/2" in line or "edit 2/2" in line] == \
        ["training edit 1/2", "training edit 2/2"]
    res = initialised("eval", str(f), "--no-generation")
    assert "evaluating: base model" in res.stderr.splitlines()


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def _train(done, total=60):
    from ledger import ProgressEvent
    return ProgressEvent(phase="train", label="edit 1/1", done=done, total=total, fact=0, n_facts=1,
                         step=done, steps=total)


def test_an_interrupted_bar_is_left_as_it_was():
    from cli.main import _Bar
    term = _Terminal()
    with pytest.raises(KeyboardInterrupt):
        with _Bar(fill=True, file=term) as bar:
            bar(_train(1))
            bar(_train(13))
            raise KeyboardInterrupt
    assert "training edit 1/1" in term.text and "13/60" in term.text and "60/60" not in term.text

    term = _Terminal()
    with _Bar(fill=True, file=term) as bar:   # training that stops early fills the bar
        bar(_train(13))
    assert "60/60" in term.text


def test_training_progress_counts_facts_and_names_the_step_without_a_fake_total():
    from cli.main import _Bar
    from ledger import ProgressEvent

    def event(fact, step):
        return ProgressEvent(phase="train", label=f"edit {fact + 1}/3", done=fact * 60 + step, total=180,
                             fact=fact, n_facts=1, step=step, steps=60, facts_total=3)
    term = _Terminal()
    with pytest.raises(KeyboardInterrupt):
        with _Bar(fill=True, file=term) as bar:
            bar(event(0, 13))
            bar(event(1, 5))
            raise KeyboardInterrupt
    assert "training edit 2/3, step 5" in term.text and "1/3" in term.text
    assert "/60" not in term.text and "/180" not in term.text and "3/3" not in term.text
    term = _Terminal()
    with _Bar(fill=True, file=term) as bar:
        bar(event(2, 9))
    assert "3/3" in term.text


# --- 6. wording of plain output, help, the demo script -------------------------------------------

def test_head_is_worded_alike_and_status_json_gives_numbers(run, tiny_llama):
    init = run("init", "--model", str(tiny_llama), "--no-wordings").stdout.splitlines()
    assert "HEAD -> main at rev-1" in init
    assert "relation wordings: 0 for 0 relations (--no-wordings: edits train on their own prompts and rewrites of them)" in init
    assert run("status").stdout.splitlines()[0] == "HEAD -> main at rev-1"
    assert run("checkout", "main").stdout.strip() == "HEAD -> main at rev-1"
    out = json.loads(run("status", "--json").stdout)
    assert out["hidden_size"] == 64 and out["n_layers"] == 3


def test_counts_are_pluralised(initialised, fact_file, tmp_path):
    assert "active     0 edits\n" in initialised("show").stdout
    initialised("add", str(fact_file), *FAST_ARGS)
    assert "active     1 edit\n" in initialised("show").stdout
    w = tmp_path / "wordings.json"
    w.write_text(json.dumps({"relation": "{} lives in", "wordings": ["The home of {} is"]}))
    assert initialised("wordings", "import", str(w)).stdout.startswith("1 new wording (")
    assert "1 record of" in initialised("wordings", "import", str(w)).stdout
    assert initialised("wordings", "list").stderr.strip() == "1 wording of 1 relation"
    assert initialised("gc").stdout.strip() == "removed 0 blobs, 0 bytes"


def _commands(group, path=("ledger",)):
    import click
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_every_option_has_help_and_summaries_are_whole():
    import click
    missing = [f"{' '.join(path)} {opt.opts[0]}" for path, cmd in _commands(cli) for opt in cmd.params
               if isinstance(opt, click.Option) and not opt.help]
    assert missing == []
    runner = CliRunner()
    for args in ([], ["wordings"], ["db"]):
        shown = runner.invoke(cli, [*args, "--help"], terminal_width=80).stdout
        summaries = shown.split("Commands:")[1].splitlines()
        assert [line for line in summaries if line.rstrip().endswith("...")] == [], args
    show = " ".join(runner.invoke(cli, ["show", "--help"], terminal_width=80).stdout.split())
    assert "show [OPTIONS] [REV]" in show and "REV, default HEAD" in show


def test_the_demo_echoes_commands_a_shell_can_run_again(tmp_path):
    import shlex
    import subprocess
    [step] = [line for line in (ROOT / "scripts" / "demo.sh").read_text().splitlines() if line.startswith("step()")]
    args = ["generate", "The mother tongue of Danielle Darrieux is", "--max-new-tokens", "8", "it's"]
    out = subprocess.run(["bash", "-c", f'ledger=true; {step}; step "$@"', "demo", *args],
                         capture_output=True, text=True, check=True).stdout
    [line] = [x for x in out.splitlines() if x.startswith("$ ")]
    assert shlex.split(line[2:]) == ["ledger", *args]


def test_add_of_several_facts_reports_throughput_from_the_library(initialised, tmp_path):
    f = tmp_path / "facts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in (FACT, FACT2)))
    res = initialised("add", str(f), *FAST_ARGS)
    [line] = [x for x in res.stderr.splitlines() if x.startswith("added ")]
    assert re.fullmatch(r"added 2 edits in \d+\.\ds \(\d+\.\d edits/min, \d+ threads\)", line), line
