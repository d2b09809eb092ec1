"""ledger/refs.py on a real ledger, both engines: checkout, branch, tag, the list of refs and
the reflog, called as library functions on the ledger's Handle."""
import pytest

from ledger import refs
from ledger.errors import InputError, NotFoundError
from ledger.history import head
from ledger.store import audit
from ledger.store.engine import write_transaction

from support import add_edits, counts


@pytest.fixture
def s(ledger):
    """The Handle of a new ledger with three short edits on main: rev-1 (base) .. rev-4."""
    add_edits(ledger, 3)
    return ledger.handle


def _last_event(s):
    with s.engine.connect() as conn:
        e = audit.events(conn, limit=1)[0]
    return e.command, e.actor, e.revision_id, e.details_json


def test_a_new_ledger_has_head_on_main_at_rev_1(ledger):
    s = ledger.handle
    assert refs.list_refs(s) == [{"name": "HEAD", "kind": "head", "revision": "rev-1", "target": "main"},
                                 {"name": "main", "kind": "branch", "revision": "rev-1", "target": None}]
    moves = refs.reflog(s)
    assert [(m["ref"], m["old"], m["new"], m["old_branch"], m["new_branch"], m["reason"], m["actor"])
            for m in moves] == [("HEAD", None, "rev-1", None, "main", "init", "tester"),
                                ("main", None, "rev-1", None, None, "init", "tester")]


def test_branch_at_head_and_at_a_revision(s):
    assert refs.branch(s, "here") == {"name": "here", "kind": "branch", "revision": "rev-4"}
    assert refs.branch(s, "old", "rev-2") == {"name": "old", "kind": "branch", "revision": "rev-2"}
    assert _last_event(s) == ("branch", "tester", 2, '{"name": "old"}')
    assert refs.branch(s, "from-branch", "old~1")["revision"] == "rev-1"
    assert [(r["name"], r["revision"]) for r in refs.list_refs(s)] == \
        [("HEAD", "rev-4"), ("from-branch", "rev-1"), ("here", "rev-4"), ("main", "rev-4"), ("old", "rev-2")]
    assert head(s) == {"revision": "rev-4", "branch": "main", "detached": False}   # HEAD did not move


def test_branch_and_tag_refuse_names_and_write_nothing(s, db_url):
    refs.tag(s, "v1", "rev-3")
    before = counts(db_url)
    with pytest.raises(InputError, match="a ref named 'main' already exists"):
        refs.branch(s, "main")
    with pytest.raises(InputError, match="a ref named 'v1' already exists"):
        refs.branch(s, "v1", "rev-1")
    with pytest.raises(InputError, match="tag 'v1' already exists and tags do not move"):
        refs.tag(s, "v1", "rev-4")
    with pytest.raises(InputError, match="a branch named 'main' already exists"):
        refs.tag(s, "main", "rev-1")
    with pytest.raises(InputError, match=r"invalid ref name 'rev-2': use letters"):
        refs.branch(s, "rev-2")
    with pytest.raises(InputError, match="invalid ref name 'a..b'"):
        refs.tag(s, "a..b", "rev-1")
    with pytest.raises(NotFoundError, match="no revision rev-9"):
        refs.branch(s, "ghost", "rev-9")
    with pytest.raises(NotFoundError, match="no revision, branch or tag named 'nowhere'"):
        refs.tag(s, "ghost", "nowhere")
    assert counts(db_url) == before


def test_tag_names_a_revision_that_later_adds_do_not_move(s, ledger):
    assert refs.tag(s, "v1", "HEAD") == {"name": "v1", "kind": "tag", "revision": "rev-4"}
    assert _last_event(s) == ("tag", "tester", 4, '{"name": "v1"}')
    add_edits(ledger, 1)
    listed = {r["name"]: (r["kind"], r["revision"]) for r in refs.list_refs(s)}
    assert listed == {"HEAD": ("head", "rev-5"), "main": ("branch", "rev-5"), "v1": ("tag", "rev-4")}


def test_checkout_detaches_attaches_and_names_what_it_leaves(s, ledger):
    assert refs.checkout(s, "rev-2") == {"revision": "rev-2", "branch": None, "detached": True, "left_behind": []}
    assert _last_event(s) == ("checkout", "tester", 2, '{"branch": null, "target": "rev-2"}')
    add_edits(ledger, 2)                                  # rev-5, rev-6 on the detached HEAD
    assert head(s)["revision"] == "rev-6" and head(s)["detached"]
    out = refs.checkout(s, "main")
    assert out == {"revision": "rev-4", "branch": "main", "detached": False, "left_behind": ["rev-6", "rev-5"]}
    # A checkout of the tip revision of the branch HEAD is on stays on the branch.
    assert refs.checkout(s, "rev-4")["branch"] == "main"
    # A tag is no branch: HEAD detaches at its revision.
    refs.tag(s, "keep", "rev-5")
    assert refs.checkout(s, "keep") == {"revision": "rev-5", "branch": None, "detached": True, "left_behind": []}
    assert refs.checkout(s, "rev-6")["left_behind"] == []           # rev-5 is under the tag
    assert refs.checkout(s, "rev-1")["left_behind"] == ["rev-6"]   # rev-5 is tagged: the walk stops there


def test_checkout_of_an_unknown_revision_changes_nothing(s, db_url):
    before = counts(db_url)
    for name, error in (("rev-99", NotFoundError), ("nope", NotFoundError), ("x;y", InputError)):
        with pytest.raises(error):
            refs.checkout(s, name)
    assert counts(db_url) == before
    assert head(s) == {"revision": "rev-4", "branch": "main", "detached": False}


def test_left_behind_walks_until_a_tip_reaches(s):
    with write_transaction(s.engine) as conn:
        assert refs.left_behind(conn, 4, {1}) == [4, 3, 2]
        assert refs.left_behind(conn, 4, {2}) == [4, 3]
        assert refs.left_behind(conn, 4, {4}) == []
        assert refs.left_behind(conn, 3, {4}) == []          # rev-4 reaches rev-3


def test_reflog_by_ref_newest_first_with_limit(s):
    refs.checkout(s, "rev-2")
    refs.checkout(s, "main")
    refs.branch(s, "side", "rev-3")
    every = refs.reflog(s)
    assert [(m["ref"], m["old"], m["new"], m["old_branch"], m["new_branch"], m["reason"]) for m in every[:3]] == [
        ("side", None, "rev-3", None, None, "branch side"),
        ("HEAD", "rev-2", "rev-4", None, "main", "checkout main"),
        ("HEAD", None, "rev-2", "main", None, "checkout rev-2"),
    ]
    assert [m["new"] for m in refs.reflog(s, "main")] == ["rev-4", "rev-3", "rev-2", "rev-1"]
    assert [m["reason"] for m in refs.reflog(s, "HEAD")] == ["checkout main", "checkout rev-2", "init"]
    assert len(refs.reflog(s, limit=2)) == 2
    assert refs.reflog(s, "nothing") == []
    assert all(m["actor"] == "tester" and m["time"].endswith("Z") for m in every)
