"""Relation wordings: parsing, the table on both engines, the command line, and the add that
trains on them."""
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from cli.main import cli
from ledger import BaftConfig, parse_facts_text
from ledger.errors import InputError
from ledger.facts import Fact
from ledger.store.engine import make_engine
from ledger.store.schema import AuditEvent, Wording
from ledger.wordings import (REWRITES, SubjectForm, builtin_pairs, content_words, fill, nearest, pairs_of_records,
                             rewrites, template_of, training_prompts)

from support import FACT, FACT3, FAST

CF = [  # CounterFact's form: rephrases carry an unrelated sentence before the subject
    {"prompt": "Alice lives in", "subject": "Alice", "target_new": "Rome", "ground_truth": "Oslo",
     "rephrase_prompt": "The cat sat down. Alice has her home in", "locality_prompt": "Bob lives in",
     "locality_ground_truth": "Oslo"},
    {"prompt": "Bob lives in", "subject": "Bob", "target_new": "Lima", "ground_truth": "Oslo",
     "rephrase_prompt": "Where Bob resides is"},
    {"prompt": "Carol lives in", "subject": "Carol", "target_new": "Kyiv", "ground_truth": "Oslo",
     "rephrase_prompt": "Nobody knows it"},          # no subject in the rephrase: gives nothing
]


def test_templates_drop_the_context_sentence_and_need_one_subject():
    assert template_of("The cat sat down. Alice has her home in", "Alice") == "{} has her home in"
    assert template_of("Is it true? The home of Alice is", "Alice") == "The home of {} is"
    assert template_of("Alice met Alice", "Alice") is None
    assert template_of("Bob lives in", "Alice") is None
    assert fill("{} likes {x}", "Ann") == "Ann likes {x}"     # braces in a prompt are not format fields


def test_pairs_from_fact_records_and_wording_records():
    pairs, skipped = pairs_of_records(CF + [CF[0], {"relation": "{} lives in", "wordings": ["{} dwells in", "{} lives in"]}])
    assert pairs == [("{} lives in", "{} has her home in"), ("{} lives in", "Where {} resides is"),
                     ("{} lives in", "{} dwells in")]       # deduplicated, the relation itself left out
    assert skipped == ["record 2: no rephrase with the subject in it"]


@pytest.mark.parametrize("rec, needle", [
    ({"relation": "lives in", "wordings": ["{} dwells in"]}, "exactly one '{}'"),
    ({"relation": "{} lives in", "wordings": []}, "non-empty list"),
    ({"relation": "{} lives in", "wordings": ["{} in {}"]}, "exactly one '{}'"),
    ({"relation": "{} lives in", "wordings": [7]}, "non-empty string"),
    ({"relation": "{} lives in", "wordings": ["{} " + "x" * 600]}, "limit 500"),
])
def test_malformed_wording_records_are_refused(rec, needle):
    with pytest.raises(InputError, match=needle):
        pairs_of_records([rec])


def test_training_prompts_are_a_fixed_sample_without_the_facts_own_prompts():
    fact = Fact(prompt="Alice lives in", target_new="Rome", subject="Alice", rephrase_prompts=("Alice dwells in",))
    ws = ["{} dwells in", "{} has her home in", "Where {} resides is", "{} resides in", "{} is living in"]
    got = training_prompts(fact, ws, 3, seed=0)
    assert len(got) == 3 and "Alice dwells in" not in got and all("Alice" in p for p in got)
    assert got == training_prompts(fact, ws, 3, seed=0)
    assert training_prompts(fact, ws, 0, seed=0) == []
    assert sorted(training_prompts(fact, ws, 10, seed=0)) == sorted(fill(w, "Alice") for w in ws[1:])


def test_wordings_write_the_subject_as_the_prompt_does():
    mona = Fact(prompt="The Mona Lisa was painted by", target_new="Picasso", subject="Mona Lisa")
    form = SubjectForm.of(mona)
    assert form == SubjectForm("the", False)
    assert form.template("{} is a painting by") == "The {} is a painting by"          # starts the sentence
    assert form.template("The painter of {} is") == "The painter of the {} is"
    assert form.template("Q: Who painted {}? A:") == "Q: Who painted the {}? A:"
    assert form.template("Q: {} was painted by") == "Q: The {} was painted by"
    assert form.template("The painter of the {} is") == "The painter of the {} is"    # one there already
    assert form.template("The painting {} is the work of") == "The painting {} is the work of"  # apposition
    got = training_prompts(mona, ["{} was painted by", "{} is a painting by", "The painter of {} is"], 5, seed=0)
    # "{} was painted by" is the fact's own prompt once written with its determiner
    assert sorted(got) == ["The Mona Lisa is a painting by", "The painter of the Mona Lisa is"]

    books = Fact(prompt="The Harry Potter books were written by", target_new="Tolkien", subject="Harry Potter books")
    form = SubjectForm.of(books)
    assert form == SubjectForm("the", True)
    assert form.template("{} was penned by") == "The {} were penned by"
    assert form.template("In literature, {} is attributed to") == "In literature, the {} are attributed to"
    assert form.template("The author of {} is") == "The author of the {} is"          # the verb is not the subject's
    assert form.template("{}'s author is") == "The {}' author is"
    # the plural verb must follow the subject: here it is the inventors'
    assert SubjectForm.of(Fact(prompt="The inventors of the airplane were the", target_new="x",
                               subject="airplane")) == SubjectForm("the", False)
    thermo = Fact(prompt="A thermometer is used to measure the", target_new="speed", subject="thermometer")
    assert SubjectForm.of(thermo).template("The purpose of {} is to measure") == "The purpose of a {} is to measure"
    assert rewrites(thermo, 3)[1:] == ["Complete the sentence. A thermometer is used to measure the",
                                       "Here is what I know about a thermometer. A thermometer is used to measure the"]
    # a bare subject (all of CounterFact's) is filled as before
    bare = Fact(prompt="Alice lives in", target_new="Rome", subject="Alice")
    assert SubjectForm.of(bare) == SubjectForm() and SubjectForm().template("The home of {} is") == "The home of {} is"


def test_borrowed_wordings_only_fill_up_to_n_after_the_relations_own():
    fact = Fact(prompt="Alice lives in", target_new="Rome", subject="Alice")
    own, lent = ["{} dwells in", "Home of {}:"], ["{} resides in", "{} dwells in", "{} stays in", "{} is based in"]
    assert training_prompts(fact, own, 2, seed=0, borrowed=lent) == ["Alice dwells in", "Home of Alice:"]
    got = training_prompts(fact, own, 4, seed=0, borrowed=lent)
    assert got[:2] == ["Alice dwells in", "Home of Alice:"] and len(got) == 4 and len(set(got)) == 4
    assert set(got[2:]) <= {"Alice resides in", "Alice stays in", "Alice is based in"}
    assert got == training_prompts(fact, own, 4, seed=0, borrowed=lent)        # fixed per (fact, seed)
    assert training_prompts(fact, [], 3, seed=0, borrowed=lent[:1]) == ["Alice resides in"]
    # a rephrase behind a context sentence is held out as a wording too, own or borrowed
    held = Fact(prompt="Alice lives in", target_new="Rome", subject="Alice",
                rephrase_prompts=("It rained. Alice stays in",))
    assert "Alice stays in" not in training_prompts(held, own, 6, seed=0, borrowed=lent)
    assert len(training_prompts(held, own, 6, seed=0, borrowed=lent)) == 4


def n_wordings(url):
    eng = make_engine(url)
    with eng.connect() as c:
        n = c.execute(select(func.count()).select_from(Wording)).scalar_one()
    eng.dispose()
    return n


def test_import_is_idempotent_excludes_on_request_and_is_audited(ledger, db_url, tmp_path):
    f = tmp_path / "cf.json"
    f.write_text(json.dumps(CF))
    r = ledger.import_wordings(f, exclude=[("{} lives in", "Where {} resides is")])
    assert (r.records, r.pairs, r.added, r.excluded, r.skipped) == (3, 2, 1, 1, 1)
    assert ledger.import_wordings(f).added == 1            # only the pair left out the first time
    assert ledger.import_wordings(f).added == 0
    assert ledger.wordings("{} lives in")["wordings"] == ["{} has her home in", "Where {} resides is"]
    assert ledger.wordings()["by_relation"] == [{"relation": "{} lives in", "wordings": 2}]
    with ledger.engine.connect() as c:
        assert c.execute(select(func.count()).where(AuditEvent.command == "wordings")).scalar_one() == 3


@pytest.mark.parametrize("content, needle", [
    ("", "the wordings file is empty"),
    ("{nope", "not JSON or JSON Lines"),
    (json.dumps([{"prompt": "x", "target_new": "y"}]), "no wordings found"),
    (json.dumps(CF + [{"relation": "{} lives in", "wordings": ["no subject"]}]), "record 3 wordings"),
])
def test_a_bad_wordings_file_is_one_line_exit_2_and_writes_nothing(ledger, db_url, tmp_path, content, needle):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(CF))
    ledger.import_wordings(ok)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = CliRunner().invoke(cli, ["--db", db_url, "wordings", "import", str(bad)])
    assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert n_wordings(db_url) == 2
    res = CliRunner().invoke(cli, ["--db", db_url, "wordings", "import", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "no such wordings file" in res.stderr


def test_cli_import_and_list(ledger, db_url, tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text(json.dumps({"relation": "{} lives in", "wordings": ["{} dwells in", "Home of {}:"]}))
    res = CliRunner().invoke(cli, ["--db", db_url, "wordings", "import", str(f), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["added"] == 2
    res = CliRunner().invoke(cli, ["--db", db_url, "wordings", "list", "--json"])
    assert json.loads(res.stdout) == {"relations": 1, "wordings": 2,
                                      "by_relation": [{"relation": "{} lives in", "wordings": 2}]}
    res = CliRunner().invoke(cli, ["--db", db_url, "wordings", "list", "{} lives in"])
    assert res.stdout.splitlines() == ["{} dwells in", "Home of {}:"]


def test_add_trains_on_the_relations_wordings_and_records_them(ledger, tmp_path):
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"relation": "{} lives in", "wordings": ["{} dwells in", "Home of {}:"]}))
    ledger.import_wordings(f)
    [with_w] = ledger.add(parse_facts_text(json.dumps(FACT)), BaftConfig(**FAST))
    assert sorted(with_w.stats["wording_prompts"]) == ["Alice dwells in", "Home of Alice:"]
    assert with_w.stats["n_wording_rows"] == 2
    stored = ledger.edit(with_w.edit)
    assert sorted(stored.stats["wording_prompts"]) == ["Alice dwells in", "Home of Alice:"]
    assert stored.config["wordings"] == BaftConfig().wordings
    [without] = ledger.add(parse_facts_text(json.dumps(dict(FACT, target_new="Bern"))),
                           BaftConfig(**FAST, wordings=0))
    assert without.stats["wording_prompts"] == [] and without.stats["n_wording_rows"] == 0
    # One edit row per prompt: the wordings come on top of the prompt and its prefixes.
    assert with_w.stats["n_edit_rows"] == without.stats["n_edit_rows"] + 2


def test_rewrites_frame_the_prompt_and_name_the_subject_for_any_relation():
    fact = Fact(prompt="Alice lives in", target_new="Rome", subject="Alice",
                rephrase_prompts=("Complete the sentence. Alice lives in",))
    got = rewrites(fact, 3)
    # the rephrase is held out (or trained on already), so it is no rewrite
    assert got == ["Q: Alice lives in? A:", "Here is what I know about Alice. Alice lives in"]
    assert len(rewrites(fact, len(REWRITES))) == len(REWRITES) - 1
    assert all("Alice lives in" in p for p in rewrites(fact, len(REWRITES)))   # the prompt, whole
    question = Fact(prompt="Where does Alice live?", target_new="Rome", subject="Alice")
    assert rewrites(question, 1) == ["Q: Where does Alice live? A:"]          # no second question mark
    assert rewrites(Fact(prompt="Alice lives in", target_new="Rome"), 4) == []  # no subject: no wordings
    assert rewrites(fact, 0) == []
    with pytest.raises(InputError, match="--rewrites"):
        BaftConfig(rewrites=len(REWRITES) + 1)


def test_rewrites_stand_in_only_where_the_table_gives_nothing(ledger, tmp_path):
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"relation": "{} lives in", "wordings": ["{} dwells in", "Home of {}:"]}))
    ledger.import_wordings(f)
    # a relation the table lacks (and nothing near it): rewrites, up to their number
    fact = dict(FACT3, target_new="golf")
    [alone] = ledger.add(parse_facts_text(json.dumps(fact)), BaftConfig(**FAST, wordings_nearest=False, rewrites=2))
    assert alone.stats["wording_prompts"] == ["Q: Erin plays? A:", "Complete the sentence. Erin plays"]
    assert alone.stats["n_wording_rows"] == 2
    assert ledger.edit(alone.edit).config["rewrites"] == 2
    [capped] = ledger.add(parse_facts_text(json.dumps(dict(fact, target_new="darts"))),
                          BaftConfig(**FAST, wordings_nearest=False, rewrites=4, wordings=1))
    assert capped.stats["wording_prompts"] == ["Q: Erin plays? A:"]       # never more than --wordings
    [off] = ledger.add(parse_facts_text(json.dumps(dict(fact, target_new="polo"))),
                       BaftConfig(**FAST, wordings_nearest=False, rewrites=0))
    assert off.stats["wording_prompts"] == []
    # the table gives wordings, fewer than wanted: no rewrite beside them
    [some] = ledger.add(parse_facts_text(json.dumps(FACT)), BaftConfig(**FAST, wordings=6, rewrites=4))
    assert sorted(some.stats["wording_prompts"]) == ["Alice dwells in", "Home of Alice:"]


def test_related_relations_lend_wordings_where_the_own_are_too_few(ledger, tmp_path):
    f = tmp_path / "w.json"
    shared = ["{} dwells in", "{} has a home in", "{} resides in"]
    f.write_text(json.dumps([
        {"relation": "{} lives in", "wordings": shared + ["Home of {}:"]},
        # another template of the same relation: 3 wordings in common, so it lends its others
        {"relation": "{}, living in", "wordings": shared + ["{} is settled in", "{} lives in"]},
        # 2 in common: a different relation, it lends nothing
        {"relation": "{} works in", "wordings": shared[:2] + ["{} is employed in"]},
    ]))
    ledger.import_wordings(f)
    only_related = {**FAST, "wordings_nearest": False}
    [e] = ledger.add(parse_facts_text(json.dumps(FACT)), BaftConfig(**only_related, wordings=6))
    got = e.stats["wording_prompts"]
    assert sorted(got[:4]) == sorted(["Alice dwells in", "Alice has a home in", "Alice resides in", "Home of Alice:"])
    assert got[4:] == ["Alice is settled in"]    # not the fact's own prompt, nothing of "works in"
    assert ledger.edit(e.edit).config["wordings_related"] == 3
    [off] = ledger.add(parse_facts_text(json.dumps(dict(FACT, target_new="Bern"))),
                       BaftConfig(**only_related, wordings=6, wordings_related=0))
    assert sorted(off.stats["wording_prompts"]) == sorted(got[:4])
    [enough] = ledger.add(parse_facts_text(json.dumps(dict(FACT, target_new="Kyiv"))),
                          BaftConfig(**only_related, wordings=4))
    assert sorted(enough.stats["wording_prompts"]) == sorted(got[:4])   # own wordings suffice: none borrowed
    # then the nearest relation by content words ("{}, living in", which has "{} lives in"
    # among its wordings) lends its key too
    [near] = ledger.add(parse_facts_text(json.dumps(dict(FACT, target_new="Riga"))), BaftConfig(**FAST, wordings=6))
    assert near.stats["wording_prompts"][4:] == ["Alice is settled in", "Alice, living in"]


def test_stored_configs_without_newer_fields_retrain_as_they_were_trained():
    old = {"method": "baft", "rank": 4, "lr": 0.01}
    cfg = BaftConfig.from_dict(old, stored=True)
    assert (cfg.wordings, cfg.wordings_related, cfg.gate_floor, cfg.gate_lr_scale) == (0, 0, 0.0, 1.0)
    assert cfg.adam_beta1 == 0.9        # torch's default, which edits stored without the field used
    assert (cfg.other_relations, cfg.after_target_tokens, cfg.after_target_wordings) == (0, 0, 0)
    assert cfg.other_relations_before == 0
    assert cfg.subject_variants == 0 and cfg.rewrites == 0
    assert BaftConfig.from_dict(old) == BaftConfig(rank=4, lr=0.01)
    assert BaftConfig.from_dict({**old, "wordings": 3}, stored=True).wordings == 3
    with pytest.raises(InputError, match="--wordings"):
        BaftConfig(wordings=-1)


def test_cli_add_takes_wordings_from_the_table_unless_told_not_to(ledger, db_url, tmp_path, fact_file):
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"relation": "{} lives in", "wordings": ["{} dwells in"]}))
    assert CliRunner().invoke(cli, ["--db", db_url, "wordings", "import", str(f)]).exit_code == 0
    quick = ["--steps", "2", "--rank", "2", "--layer", "1", "--json"]
    res = CliRunner().invoke(cli, ["--db", db_url, "add", str(fact_file), *quick, "--wordings", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["stats"]["wording_prompts"] == []
    other = tmp_path / "other.json"          # another target: HEAD cannot already answer it
    other.write_text(json.dumps(dict(FACT, target_new="Bern")))
    res = CliRunner().invoke(cli, ["--db", db_url, "add", str(other), *quick])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["stats"]["wording_prompts"] == ["Alice dwells in"]
    res = CliRunner().invoke(cli, ["--db", db_url, "add", str(fact_file), "--wordings", "33"])
    assert res.exit_code == 2 and "--wordings" in res.stderr


def test_cli_add_says_when_an_edit_trained_on_rewrites(ledger, db_url, tmp_path):
    f = tmp_path / "erin.json"          # "{} plays": nothing in an empty table
    f.write_text(json.dumps(FACT3))
    quick = ["--steps", "2", "--rank", "2", "--layer", "1"]
    res = CliRunner().invoke(cli, ["--db", db_url, "add", str(f), *quick, "--rewrites", "2"])
    assert res.exit_code == 0, res.output
    assert "2 rewrites" in res.stdout
    assert "trained on 2 rewrites of its prompt: the wordings table has no relation like it" in res.stderr
    f.write_text(json.dumps(dict(FACT3, target_new="golf")))
    res = CliRunner().invoke(cli, ["--db", db_url, "add", str(f), *quick, "--rewrites", "0"])
    assert res.exit_code == 0, res.output
    assert "0 wordings" in res.stdout and "trained on its own prompts only" in res.stderr


# --- the built-in tables and the nearest relation ------------------------------------------------

def test_content_words_name_the_relation():
    assert content_words("The painter of {} is") == {"painter"}
    assert content_words("Q: Who painted {}? A:") == {"painted"}
    assert content_words("{}'s author is") == {"author"}
    assert content_words("{} is") == frozenset()


def test_nearest_finds_the_relation_sharing_most_content_words(ledger, tmp_path):
    f = tmp_path / "w.json"
    f.write_text(json.dumps([
        {"relation": "{} was painted by", "wordings": ["The painter of {} is", "{} is a painting by"]},
        {"relation": "{} was written by", "wordings": ["The author of {} is", "{} is a novel by"]},
        {"relation": "The capital of {} is", "wordings": ["{}'s capital is"]},
    ]))
    ledger.import_wordings(f)
    with ledger.engine.connect() as conn:
        # a hand-written prompt that is one of a relation's wordings, not its key
        assert nearest(conn, "The painter of {} is") == ["{} was painted by", "{} is a painting by"]
        assert nearest(conn, "Who was the author of {}? It was") == \
            ["{} was written by", "The author of {} is", "{} is a novel by"]
        assert nearest(conn, "{} was written by") == []          # a key: its own wordings are the caller's
        assert nearest(conn, "The currency of {} is") == []      # nothing shares a content word
        assert nearest(conn, "{} is") == []                      # no content word at all
        # "capital" is one of two content words: overlap 1/2, at the threshold, and not below it
        assert nearest(conn, "The capital city of {} is")[0] == "The capital of {} is"
        assert nearest(conn, "The capital city of {} is", min_overlap=0.6) == []


def test_builtin_tables_validate_and_are_disjoint_from_evaluation_splits():
    pairs = builtin_pairs()
    assert len(pairs) > 2000 and len(pairs) == len(set(pairs))
    templates = {t for p in pairs for t in p}
    assert all(t.count("{}") == 1 and t == t.strip() and "category:" not in t.lower() for t in templates)


def test_init_starts_with_the_builtin_tables_unless_told_not_to(db_url, tiny_llama, tmp_path):
    from ledger import Ledger
    with Ledger.init(db_url, model=str(tiny_llama)) as lg:
        table = lg.wordings()
        assert table["wordings"] == len(builtin_pairs())
        with lg.engine.connect() as c:
            [details] = c.execute(select(AuditEvent.details_json).where(AuditEvent.command == "wordings")).scalars()
        assert json.loads(details)["source"] == "builtin"
        # a fact of a catalogued relation whose prompt is not a key borrows the catalogue's wordings
        fact = {"subject": "Mona Lisa", "prompt": "The Mona Lisa was painted by", "target_new": "Claude Monet"}
        [e] = lg.add(parse_facts_text(json.dumps(fact)), BaftConfig(**FAST, wordings=4))
        got = e.stats["wording_prompts"]
        assert len(got) == 4 and all("Mona Lisa" in p for p in got)
        assert any("paint" in p.lower() for p in got)
    other = tmp_path / "none.db"
    res = CliRunner().invoke(cli, ["--db", f"sqlite:///{other}", "init", "--model", str(tiny_llama), "--no-wordings"])
    assert res.exit_code == 0, res.output
    assert "relation wordings: 0 for 0 relations" in res.stdout
    assert n_wordings(f"sqlite:///{other}") == 0


def test_other_relations_never_take_a_locality_prompt_of_the_fact():
    """The subject in other relations is training data; the fact's locality prompts are held
    out for evaluation (or trained on as such), so the sample never holds one of them."""
    from ledger.facts import LocalityPrompt
    from ledger.wordings import other_relations
    plain = Fact(prompt="The currency of Russia is the", target_new="lira", subject="Russia")
    everything = other_relations(plain, [], 16 * 4, seed=0)
    assert "The capital of Russia is" in everything
    held = Fact(prompt="The currency of Russia is the", target_new="lira", subject="Russia",
                locality_prompts=(LocalityPrompt("the capital of Russia is ", "Moscow"),))
    assert "The capital of Russia is" not in other_relations(held, [], 16 * 4, seed=0)
    assert len(other_relations(held, [], 16 * 4, seed=0)) == len(everything) - 1


def test_other_relations_before_take_relations_whose_words_come_first():
    """`before` draws first from the relations whose words come before the subject ("The
    capital of Russia is"), never one that names the subject first ("Russia is located in");
    with before 0 the sample is the one an edit stored without the field was trained on."""
    from ledger.wordings import catalogue, other_relations, words_before
    assert words_before("The capital of {} is") and words_before("Q: What is {}?")
    assert not words_before("{} is located in") and not words_before("The {} is") and not words_before("no slot")
    fact = Fact(prompt="The currency of Russia is the", target_new="lira", subject="Russia")
    every = other_relations(fact, [], 16 * 4, seed=0)
    firsts = other_relations(fact, [], 0, seed=0, before=16 * 4)
    assert firsts and set(firsts) < set(every)
    assert all(not p.startswith("Russia") for p in firsts)
    assert any(p.startswith("Russia") for p in every)        # the catalogue has both kinds
    two = other_relations(fact, [], 0, seed=0, before=2)
    assert len(two) == 2 and set(two) <= set(firsts) and two == other_relations(fact, [], 0, seed=0, before=2)
    both = other_relations(fact, [], 3, seed=0, before=2)
    assert both[:2] == two and len(both) >= 3 and len(set(both)) == len(both)
    assert both[2:] == [p for p in other_relations(fact, [], 3, seed=0) if p not in two]
    assert other_relations(fact, [], 0, seed=0) == [] and len(catalogue()) > 16


def test_other_relations_before_only_where_the_prompt_has_words_before_the_subject():
    """A fact whose prompt names the subject first ("Russia pays with") gets no `before` rows,
    and its `other_relations` sample is the one it gets without them."""
    from ledger.wordings import other_relations
    first = Fact(prompt="Russia pays with the", target_new="lira", subject="Russia")
    assert other_relations(first, [], 0, seed=0, before=4) == []
    assert other_relations(first, [], 3, seed=0, before=4) == other_relations(first, [], 3, seed=0)
    article = Fact(prompt="The Mona Lisa was painted by", target_new="Picasso", subject="Mona Lisa")
    assert other_relations(article, [], 0, seed=0, before=4) == []
    after = Fact(prompt="The painter of the Mona Lisa is", target_new="Picasso", subject="Mona Lisa")
    assert len(other_relations(after, [], 0, seed=0, before=4)) == 4


def test_other_relations_after_only_where_the_prompt_names_the_subject_first():
    """`after` rows name the subject first, as the fact's own prompt does, and a prompt with
    words before the subject gets none of them."""
    from ledger.wordings import other_relations, template_of, words_before
    first = Fact(prompt="Russia pays with the", target_new="lira", subject="Russia")
    rows = other_relations(first, [], 0, seed=0, after=3)
    assert len(rows) == 3 and all(r.startswith("Russia ") for r in rows)
    assert not any(words_before(template_of(r, "Russia")) for r in rows)
    assert rows == other_relations(first, [], 0, seed=0, after=3)
    worded = Fact(prompt="The currency of Russia is the", target_new="lira", subject="Russia")
    assert other_relations(worded, [], 0, seed=0, after=3) == []
    assert other_relations(worded, [], 0, seed=0, before=2, after=3) == other_relations(worded, [], 0, seed=0, before=2)


def test_relation_negatives_keep_the_bare_subject_only_for_a_fact_that_names_it_first():
    """A fact whose prompt has words before its subject draws only relations with words
    before it too: the bare subject's state is where its paraphrases that name the subject
    first ("Russia's currency is") open the gate. A fact that names the subject first draws
    from both kinds. Neither draws its own locality prompts nor a relation that shares a
    content word with what it trains on; the sample is fixed per seed."""
    from ledger.facts import LocalityPrompt
    from ledger.wordings import relation_negatives, template_of, words_before
    worded = Fact(prompt="The currency of Russia is the", target_new="lira", subject="Russia",
                  locality_prompts=[LocalityPrompt("The capital of Russia is", "Moscow")])
    drawn = relation_negatives(worded, ["Russia pays with the"], 32, seed=0)
    assert drawn and all(words_before(template_of(p, "Russia")) for p in drawn)
    assert "The capital of Russia is" not in drawn
    assert not any("currency" in p or "pays" in p for p in drawn)
    first = Fact(prompt="Russia pays with the", target_new="lira", subject="Russia")
    both = relation_negatives(first, [], 32, seed=0)
    kinds = {words_before(template_of(p, "Russia")) for p in both}
    assert kinds == {True, False} and len(both) > len(drawn)
    assert relation_negatives(first, [], 5, seed=0) == relation_negatives(first, [], 5, seed=0)
    assert len(relation_negatives(first, [], 5, seed=0)) == 5
    assert relation_negatives(first, [], 0, seed=0) == []
