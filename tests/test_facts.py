"""The fact parser: accepted forms, refused records, and a fuzzer that it never crashes."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from ledger.errors import InputError
from ledger.facts import load_facts, parse_facts_text

from conftest import FACT


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
    try:
        parse_facts_text(text)
    except InputError:
        pass
