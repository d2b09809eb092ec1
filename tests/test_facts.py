"""The fact parser: accepted forms, refused records, and a fuzzer that it never crashes."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from ledger.errors import InputError
from ledger.facts import load_facts, parse_facts_skipping_bad, parse_facts_text

from support import FACT


def test_native_object_list_and_jsonl():
    one = parse_facts_text(json.dumps(FACT))
    assert len(one) == 1 and one[0].target_new == "Rome" and one[0].target_true == "Oslo"
    assert one[0].locality_prompts[0].answer == "Oslo"
    assert len(parse_facts_text(json.dumps([FACT, FACT]))) == 2
    assert len(parse_facts_text(json.dumps(FACT) + "\n\n" + json.dumps(FACT) + "\n")) == 2


def test_counterfact_easyedit_form():
    rec = {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
           "subject": "Danielle Darrieux", "ground_truth": "French",
           "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
           "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
    [f] = parse_facts_text(json.dumps(rec))
    assert f.target_true == "French" and f.case_id == "7"
    assert f.rephrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert f.locality_prompts[0].prompt.startswith("Michel") and f.locality_prompts[0].answer == "French"
    assert f.relation == "The mother tongue of {} is"


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("not json", "not JSON"),
    ("[]", "no facts"),
    ('{"target_new": "x"}', "missing required field 'prompt'"),
    ('{"prompt": "p"}', "missing required field 'target_new'"),
    ('{"prompt": "p", "target_new": "   "}', "'target_new' is empty"),
    ('{"prompt": "", "target_new": "x"}', "'prompt' is empty"),
    ('{"prompt": 3, "target_new": "x"}', "must be a string"),
    ('{"prompt": "p", "target_new": ["x"]}', "must be a string"),
    ('{"prompt": "p", "target_new": "x", "target_true": "x"}', "equals the true target"),
    ('{"prompt": "p is", "target_new": "x", "subject": "q"}', "does not occur"),
    ('{"prompt": "p", "target_new": "x", "rephrase_prompts": 5}', "must be a list"),
    ('{"prompt": "p", "target_new": "x", "locality_prompts": [3]}', "locality_prompts[0]"),
    ("[1, 2]", "record 0: expected a JSON object"),
    ('{"prompt": "p", "target_new": "x"}\n{"prompt": "p"', "line 2"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_refused_with_a_reason(text, needle):
    with pytest.raises(InputError, match=None) as e:
        parse_facts_text(text)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_one_bad_record_among_good_names_its_index():
    with pytest.raises(InputError, match="record 2"):
        parse_facts_text(json.dumps([FACT, FACT, {"prompt": "x"}, FACT]))


def test_huge_prompt_is_refused():
    with pytest.raises(InputError, match="characters"):
        parse_facts_text(json.dumps({"prompt": "a" * 1_000_000, "target_new": "x"}))


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"prompt": "\xff\xfe", "target_new": "x"}')
    with pytest.raises(InputError, match="UTF-8"):
        load_facts(bad)
    with pytest.raises(InputError, match="no such fact file"):
        load_facts(tmp_path / "missing.json")
    with pytest.raises(InputError, match="directory"):
        load_facts(tmp_path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "target_new", "subject", "target_true", "rephrase_prompts",
                         "locality_prompts", "ground_truth", "locality_prompt", "answer", "x"]), kids, max_size=6),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_parser_only_accepts_or_refuses_cleanly(value):
    try:
        facts = parse_facts_text(json.dumps(value))
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    for f in facts:
        assert f.prompt.strip() and f.target_new.strip()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_parser_on_arbitrary_text(text):
    # Any text either parses into facts or is refused with a one-line InputError; no other
    # exception escapes.
    try:
        facts = parse_facts_text(text)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(facts, list)
    for f in facts:
        assert f.prompt.strip() and f.target_new.strip()


ROME = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                            "target_new": {"str": "English"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Danielle Darrieux speaks"], "neighborhood_prompts": ["Michel Rocard speaks"]}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: who plays walter", "loc_ans": "John Goodman", "cond": "x"}
KNOWEDIT = {"subject": "Paris", "prompt": "Paris is the capital of", "target_new": "Italy", "ground_truth": ["France"],
            "rephrase_prompt": "Paris is a capital city in",
            "locality": {"Relation_Specificity": [{"prompt": "Rome is the capital of", "ground_truth": ["Italy"]}]},
            "portability": {"Reasoning": [{"prompt": "x", "ground_truth": ["y"]}]}}


def test_importers_detect_and_map_each_form():
    from ledger.facts import detect_format
    assert [detect_format(r) for r in (FACT, ROME, ZSRE, KNOWEDIT)] == ["native", "rome", "zsre", "knowedit"]
    rome, zsre, ke = parse_facts_text(json.dumps([ROME, ZSRE, KNOWEDIT]))
    assert rome.prompt == "The mother tongue of Danielle Darrieux is" and rome.target_new == "English"
    assert rome.target_true == "French" and rome.locality_prompts[0].answer == "French"
    assert rome.rephrase_prompts == ("Danielle Darrieux speaks",)
    assert zsre.prompt.startswith("What is the product") and zsre.target_new == "unmanned aircraft"
    assert zsre.target_true == "uniform" and zsre.locality_prompts[0].answer == "John Goodman"
    assert ke.target_true == "France" and ke.locality_prompts[0].prompt == "Rome is the capital of"
    assert ke.rephrase_prompts == ("Paris is a capital city in",)


def test_shared_data_files_parse(tmp_path):
    from pathlib import Path
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not data.exists():
        pytest.skip(f"no shared data at {data}")
    zs = load_facts(data / "zsre" / "zsre_mend_train-1k.json", limit=50)
    assert len(zs) == 50 and all(f.target_new for f in zs)
    cf = load_facts(data / "counterfact" / "counterfact-val.json", offset=10, limit=5)
    assert len(cf) == 5 and cf[0].relation


@pytest.mark.parametrize("rec, needle", [
    ({"requested_rewrite": {"prompt": "no template", "subject": "x", "target_new": {"str": "y"}}}, "no '{}'"),
    ({"requested_rewrite": "x"}, "needs a 'prompt'"),
    ({"src": "q?", "alt": 5}, "must be a string"),
    ({"prompt": "p", "target_new": "t", "locality": {"a": [{"prompt": 3}]}}, "locality_prompts[0]"),
])
def test_importers_refuse_broken_records(rec, needle):
    with pytest.raises(InputError) as e:
        parse_facts_text(json.dumps([FACT, rec]))
    assert "record 1" in str(e.value) and needle in str(e.value)


def test_format_offset_limit_and_skip_bad():
    text = json.dumps([FACT, {"prompt": "x"}, ZSRE, KNOWEDIT])
    facts, problems = parse_facts_skipping_bad(text)
    assert len(facts) == 3 and problems == ["record 1: missing required field 'target_new'"]
    assert [f.target_new for f in parse_facts_text(text, offset=2, limit=1)] == ["unmanned aircraft"]
    with pytest.raises(InputError, match="record 0"):
        parse_facts_text(json.dumps([ZSRE]), fmt="rome")
    with pytest.raises(InputError, match="unknown --format"):
        parse_facts_text(text, fmt="xml")
