"""HEAD, branches, tags and the reflog, on one Connection.

HEAD is symbolic (names a branch) or detached (names a revision); every move of any ref is
appended to the reflog. Reads are SQL text (sql.py), on a plain driver connection or a
SQLAlchemy Connection alike; moves write through SQLAlchemy's tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, NotFoundError, StateError
from ..names import REF_RE, REV_RE
from . import revisions
from .blobs import now
from .sql import Conn, on

if TYPE_CHECKING:
    from sqlalchemy import Connection


@dataclass
class HeadState:
    revision: int
    branch: str | None    # None when HEAD is detached


def head(conn: Conn | Connection) -> HeadState:
    q = on(conn)
    row = q.first("SELECT revision_id, symbolic FROM refs WHERE name = 'HEAD'")
    if row is None:
        raise StateError("the ledger has no HEAD: the database was not initialised by `ledger init`")
    if row.symbolic:
        target = q.scalar("SELECT revision_id FROM refs WHERE name = :name", name=row.symbolic)
        if target is None:
            raise StateError(f"HEAD names branch {row.symbolic!r}, which does not exist")
        return HeadState(target, row.symbolic)
    return HeadState(row.revision_id, None)


def kind_of(conn: Conn | Connection, name: str) -> str | None:
    """"head", "branch" or "tag" for an existing ref; None when there is no ref of that name."""
    return on(conn).scalar("SELECT kind FROM refs WHERE name = :name", name=name)


def named(conn: Conn | Connection) -> list[tuple[str, str, int]]:
    """(name, kind, revision) of every branch and tag, by kind then name."""
    return [tuple(r) for r in on(conn).rows(
        "SELECT name, kind, revision_id FROM refs WHERE kind <> 'head' ORDER BY kind, name")]


def by_revision(conn: Conn | Connection) -> dict[int, list[str]]:
    """The names pointing at each revision, as `log` and `show` print them: HEAD first (with
    its branch), then the other branches and tags by name."""
    out: dict[int, list[str]] = {}
    q = on(conn)
    state = head(q)
    for name, kind, rid in q.rows("SELECT name, kind, revision_id FROM refs ORDER BY name"):
        if kind != "head" and rid is not None and name != state.branch:
            out.setdefault(rid, []).append(name)
    out.setdefault(state.revision, []).insert(0, "HEAD" + (f" -> {state.branch}" if state.branch else ""))
    return out


def _log_move(conn: Connection, ref: str, old: int | None, new: int | None, actor: str, reason: str,
              old_sym: str | None = None, new_sym: str | None = None) -> None:
    from .schema import RefLog
    conn.execute(RefLog.__table__.insert().values(
        ref=ref, old_revision=old, new_revision=new, old_symbolic=old_sym, new_symbolic=new_sym,
        actor=actor, created_at=now(), reason=reason))


def set_ref(conn: Connection, name: str, kind: str, rev_id: int, actor: str, reason: str) -> None:
    from sqlalchemy import select
    from .schema import Ref
    row = conn.execute(select(Ref).where(Ref.name == name)).one_or_none()
    if row is None:
        conn.execute(Ref.__table__.insert().values(name=name, kind=kind, revision_id=rev_id, symbolic=None))
        _log_move(conn, name, None, rev_id, actor, reason)
        return
    if row.kind == "tag":
        raise InputError(f"tag {name!r} already exists and tags do not move")
    if row.revision_id != rev_id:
        conn.execute(Ref.__table__.update().where(Ref.name == name).values(revision_id=rev_id))
        _log_move(conn, name, row.revision_id, rev_id, actor, reason)


def set_head(conn: Connection, *, branch: str | None, rev_id: int | None, actor: str, reason: str) -> None:
    """Point HEAD at a branch (symbolic) or, with branch None, at a revision (detached)."""
    from sqlalchemy import select
    from .schema import Ref
    old = conn.execute(select(Ref).where(Ref.name == "HEAD")).one_or_none()
    values = {"symbolic": branch, "revision_id": None if branch else rev_id}
    if old is None:
        conn.execute(Ref.__table__.insert().values(name="HEAD", kind="head", **values))
        _log_move(conn, "HEAD", None, rev_id, actor, reason, None, branch)
        return
    if old.symbolic == branch and old.revision_id == values["revision_id"]:
        return
    conn.execute(Ref.__table__.update().where(Ref.name == "HEAD").values(**values))
    _log_move(conn, "HEAD", old.revision_id, rev_id, actor, reason, old.symbolic, branch)


def advance_head(conn: Connection, new_rev: int, actor: str, reason: str) -> None:
    """After a commit: move the checked-out branch, or a detached HEAD, to the new revision."""
    state = head(conn)
    if state.branch:
        set_ref(conn, state.branch, "branch", new_rev, actor, reason)
    else:
        set_head(conn, branch=None, rev_id=new_rev, actor=actor, reason=reason)


def resolve(conn: Conn | Connection, name: str) -> int:
    """A revision number from `rev-N`, `HEAD`, `HEAD~k`, a branch or a tag."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise InputError(f"invalid revision name {name!r}")
    conn = on(conn)
    m = REV_RE.match(name)
    if m:
        rev_id = int(m.group(1))
        if not revisions.exists(conn, rev_id):
            raise NotFoundError(f"no revision {name}")
        return rev_id
    base, _, back = name.partition("~")
    if base == "HEAD":
        rev_id = head(conn).revision
    elif REF_RE.match(base) and ".." not in base:
        rev_id = conn.scalar("SELECT revision_id FROM refs WHERE name = :name AND kind <> 'head'", name=base)
        if rev_id is None:
            raise NotFoundError(f"no revision, branch or tag named {name!r}")
    else:
        raise InputError(f"invalid revision name {name!r}: expected rev-N, HEAD, HEAD~k, a branch or a tag")
    if back:
        if not back.isdigit() or len(back) > 9:
            raise InputError(f"invalid revision name {name!r}: expected ~ followed by a number")
        for _ in range(int(back)):
            parent = revisions.parent_of(conn, rev_id)
            if parent is None:
                raise NotFoundError(f"{name} goes past the first revision")
            rev_id = parent
    return rev_id


def reflog(conn: Conn | Connection, ref: str | None, limit: int) -> list[Any]:
    """Moves of one ref (or of all), newest first: their rows (every column of the reflog)."""
    where = "WHERE ref = :ref " if ref else ""
    return on(conn).rows(
        "SELECT id, ref, old_revision, new_revision, old_symbolic, new_symbolic, actor, created_at, reason "
        f"FROM reflog {where}ORDER BY id DESC LIMIT :limit", limit=limit, **({"ref": ref} if ref else {}))
