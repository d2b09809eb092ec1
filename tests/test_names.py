"""The names users type and read (ledger/names.py): rev-N, edit-N and eval-N, and the rule
for branch and tag names."""
import pytest

from ledger.errors import InputError, LedgerError
from ledger.names import (DEFAULT_BRANCH, EDIT_RE, REV_RE, check_ref_name, edit_id_of, edit_name, eval_name,
                          parse_edit, rev_name)


def test_names_are_formatted_from_numbers():
    assert rev_name(1) == "rev-1"
    assert edit_name(42) == "edit-42"
    assert eval_name(7) == "eval-7"
    assert DEFAULT_BRANCH == "main"


@pytest.mark.parametrize("n", [1, 9, 10, 123456, 999999999999])
def test_formatting_and_parsing_round_trip(n):
    assert edit_id_of(edit_name(n)) == n
    assert parse_edit(edit_name(n)) == n
    assert int(REV_RE.match(rev_name(n)).group(1)) == n


@pytest.mark.parametrize("name", ["edit-0", "edit-01", "edit-", "edit-x", "edit--1", "edit-1.5", "Edit-1",
                                  "edit-1 ", " edit-1", "rev-1", "eval-1", "1", "",
                                  "edit-1234567890123"])   # more than 12 digits
def test_edit_names_of_another_form_are_not_numbers(name):
    assert edit_id_of(name) is None
    with pytest.raises(InputError) as err:
        parse_edit(name)
    assert str(err.value) == f"invalid edit name {name!r}: expected edit-N"
    assert err.value.exit_code == 2


def test_edit_id_of_none_is_none():
    assert edit_id_of(None) is None


@pytest.mark.parametrize("name, number", [("rev-1", "1"), ("rev-100", "100"), ("rev-999999999999", "999999999999")])
def test_rev_pattern_takes_positive_numbers(name, number):
    assert REV_RE.match(name).group(1) == number


@pytest.mark.parametrize("name", ["rev-0", "rev-007", "rev-", "rev-a", "rev-1234567890123", "REV-1", "rev-1x"])
def test_rev_pattern_refuses_other_forms(name):
    assert REV_RE.match(name) is None


def test_edit_pattern_is_separate_from_rev_pattern():
    assert EDIT_RE.match("rev-3") is None and REV_RE.match("edit-3") is None


@pytest.mark.parametrize("name", ["main", "v1", "v1.0", "feature/x", "a_b-c", "release/2026.12", "X",
                                  "0day", "rev", "revision", "edit", "a" * 100, "HEADS", "edit-0"])
def test_valid_ref_names_are_returned_unchanged(name):
    assert check_ref_name(name) == name


@pytest.mark.parametrize("name", [
    "",                      # empty
    "a..b", "a/../b",        # no '..'
    "feature/", "v1.",       # no trailing '/' or '.'
    "/abs", ".hidden", "-x", "_x",   # must start with a letter or digit
    "x;y", "a b", "'q'", "x*", "naïve", "a\nb", "\nmain",
    "rev-9", "rev-1", "rev-x", "rev-", "rev-0",   # nothing starting with rev-
    "edit-3",                # an edit name
    "HEAD", "head", "Head",  # HEAD in any case
    "a" * 101,               # too long
])
def test_invalid_ref_names_are_refused_with_the_rule(name):
    with pytest.raises(InputError) as err:
        check_ref_name(name)
    assert str(err.value) == (f"invalid ref name {name!r}: use letters, digits, '.', '_', '-', '/' "
                              "(not starting with rev-, no '..')")
    assert isinstance(err.value, LedgerError) and err.value.exit_code == 2


@pytest.mark.parametrize("name", [None, 3, b"main"])
def test_a_ref_name_that_is_not_a_string_is_refused(name):
    with pytest.raises(InputError, match="invalid ref name"):
        check_ref_name(name)


# A name is the whole string: a trailing newline makes no valid name.
@pytest.mark.parametrize("what", ["edit", "rev", "ref"])
def test_a_trailing_newline_is_not_part_of_a_valid_name(what):
    if what == "edit":
        assert edit_id_of("edit-1\n") is None
    elif what == "rev":
        assert REV_RE.match("rev-1\n") is None
    else:
        with pytest.raises(InputError):
            check_ref_name("main\n")
