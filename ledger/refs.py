"""Moving HEAD and naming revisions: checkout, branch, tag, and listing refs and their moves."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import InputError
from .history import head
from .names import check_ref_name, rev_name
from .handle import Handle
from .store import audit, refs, revisions
from .store.engine import write_transaction

if TYPE_CHECKING:
    from sqlalchemy import Connection

# A checkout names at most this many revisions it leaves without a ref.
LEFT_BEHIND_LIMIT = 1000


def checkout(s: Handle, rev: str) -> dict[str, Any]:
    """Move HEAD: to a branch (attached) or to a revision (detached, unless it is the tip
    of the branch HEAD is on). Later adds commit on top of where HEAD points."""
    with write_transaction(s.engine) as conn:
        branch = rev if refs.kind_of(conn, rev) == "branch" else None
        rid = refs.resolve(conn, rev)
        state = refs.head(conn)
        if branch is None and state.branch is not None and state.revision == rid:
            branch = state.branch
        left = []
        if state.branch is None and state.revision != rid:
            tips = {t for _, _, t in refs.named(conn) if t is not None} | {rid}
            left = left_behind(conn, state.revision, tips)
        refs.set_head(conn, branch=branch, rev_id=rid, actor=s.author, reason=f"checkout {rev}")
        audit.record(conn, s.author, "checkout", rid, None, {"target": rev, "branch": branch})
    return {**head(s), "left_behind": [rev_name(r) for r in left]}


def left_behind(conn: Connection, old: int, tips: set[int]) -> list[int]:
    """`old` and those of its ancestors that no revision of `tips` reaches, newest first: what
    moving a detached HEAD off `old` leaves without a ref (the ancestors of a revision a tip
    reaches are reached too, so the walk stops at the first)."""
    out = []
    for row in revisions.ancestors(conn, old, LEFT_BEHIND_LIMIT):
        if row.id in tips or any(revisions.is_ancestor(conn, row.id, t) for t in tips):
            break
        out.append(row.id)
    return out


def branch(s: Handle, name: str, rev: str | None = None) -> dict[str, Any]:
    """Create a branch at REV (default HEAD); an existing ref of that name is refused."""
    check_ref_name(name)
    with write_transaction(s.engine) as conn:
        if refs.kind_of(conn, name) is not None:
            raise InputError(f"a ref named {name!r} already exists")
        rid = refs.resolve(conn, rev or "HEAD")
        refs.set_ref(conn, name, "branch", rid, s.author, f"branch {name}")
        audit.record(conn, s.author, "branch", rid, None, {"name": name})
    return {"name": name, "kind": "branch", "revision": rev_name(rid)}


def tag(s: Handle, name: str, rev: str) -> dict[str, Any]:
    """Name a revision for good: tags never move."""
    check_ref_name(name)
    with write_transaction(s.engine) as conn:
        existing = refs.kind_of(conn, name)
        if existing == "tag":
            raise InputError(f"tag {name!r} already exists and tags do not move")
        if existing:
            raise InputError(f"a {existing} named {name!r} already exists")
        rid = refs.resolve(conn, rev)
        refs.set_ref(conn, name, "tag", rid, s.author, f"tag {name}")
        audit.record(conn, s.author, "tag", rid, None, {"name": name})
    return {"name": name, "kind": "tag", "revision": rev_name(rid)}


def list_refs(s: Handle) -> list[dict[str, Any]]:
    """HEAD, then branches and tags by name."""
    with s.reading() as conn:
        state = refs.head(conn)
        out = [{"name": "HEAD", "kind": "head", "revision": rev_name(state.revision), "target": state.branch}]
        for name, kind, rid in refs.named(conn):
            out.append({"name": name, "kind": kind, "revision": rev_name(rid), "target": None})
    return out


def reflog(s: Handle, ref: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Every move of a ref (or of all refs), newest first."""
    with s.reading() as conn:
        return [{"ref": r.ref, "old": rev_name(r.old_revision) if r.old_revision else None,
                 "new": rev_name(r.new_revision) if r.new_revision else None,
                 "old_branch": r.old_symbolic, "new_branch": r.new_symbolic,
                 "actor": r.actor, "time": r.created_at, "reason": r.reason}
                for r in refs.reflog(conn, ref, limit)]
