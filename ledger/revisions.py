"""Revisions, refs and the active set: the history side of the ledger, on one Connection.

- A revision is immutable. Its chain hash is sha256 over its canonical content (number,
  parent, parent's chain hash, operation, author, time, message, and its change set with each
  edit's content hash), so changing any stored byte of a revision, a fact, a metric or a
  tensor breaks the chain from there on, and `verify` names where.
- The active set of a revision (which edits it composes) is a packed checkpoint every
  CHECKPOINT_EVERY revisions of depth, plus the change sets after it: resolving it reads at
  most CHECKPOINT_EVERY small change sets, whatever the length of the history.
- Refs: HEAD is symbolic (names a branch) or detached (names a revision); every move of any
  ref is appended to the reflog.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from array import array
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import Connection, func, select, text

from .errors import InputError, NotFoundError, StateError
from .store.blobs import now
from .store.schema import Edit, Ref, RefLog, Revision, RevisionChange

CHECKPOINT_EVERY = 128
_REV_RE = re.compile(r"^rev-([1-9][0-9]{0,11})$")
_EDIT_RE = re.compile(r"^edit-([1-9][0-9]{0,11})$")
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
DEFAULT_BRANCH = "main"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def rev_name(rev_id: int) -> str:
    return f"rev-{rev_id}"


def edit_name(edit_id: int) -> str:
    return f"edit-{edit_id}"


def check_ref_name(name: str) -> str:
    if not isinstance(name, str) or not _REF_RE.match(name) or ".." in name or name.endswith(("/", ".")) \
            or _REV_RE.match(name) or _EDIT_RE.match(name) or name.upper() == "HEAD" or name.startswith("rev-"):
        raise InputError(f"invalid ref name {name!r}: use letters, digits, '.', '_', '-', '/' "
                         "(not starting with rev-, no '..')")
    return name


def among(column, ids: Iterable[int], conn: Connection):
    """`column IN ids` as ONE bound parameter, whatever the number of ids: PostgreSQL plans a
    10,000-item IN list slowly, and SQLite caps the number of parameters."""
    from sqlalchemy import ARRAY, Integer, any_, bindparam, literal_column
    ids = sorted(int(i) for i in ids)
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam("ids_array", ids, type_=ARRAY(Integer)))
    if conn.dialect.name == "sqlite":
        return column.in_(select(literal_column("value")).select_from(
            func.json_each(bindparam("ids_json", json.dumps(ids)))))
    return column.in_(ids)


# --- content hashes ------------------------------------------------------------------------------

def edit_payload(e: Edit) -> dict[str, Any]:
    return {"id": e.id, "fact": json.loads(e.fact_json), "subject": e.subject, "relation": e.relation,
            "method": e.method, "layer": e.layer, "rank": e.rank, "config": json.loads(e.config_json),
            "blob": e.blob_sha256, "metrics": json.loads(e.metrics_json), "stats": json.loads(e.stats_json),
            "versions": json.loads(e.versions_json), "trained_on": e.trained_on, "author": e.author,
            "created_at": e.created_at}


def edit_hash(e: Edit) -> str:
    return hashlib.sha256(canonical(edit_payload(e))).hexdigest()


def revision_hash(rev: dict[str, Any], parent_hash: str | None,
                  changes: Iterable[tuple[int, str, str]]) -> str:
    payload = {"id": rev["id"], "parent": rev["parent_id"], "parent_hash": parent_hash or "",
               "operation": rev["operation"], "author": rev["author"], "created_at": rev["created_at"],
               "message": rev["message"], "depth": rev["depth"], "n_active": rev["n_active"],
               "changes": sorted([list(c) for c in changes])}
    return hashlib.sha256(canonical(payload)).hexdigest()


# --- checkpoints and the active set --------------------------------------------------------------

def pack_ids(ids: Iterable[int]) -> bytes:
    return zlib.compress(array("q", sorted(ids)).tobytes())


def unpack_ids(data: bytes) -> set[int]:
    a = array("q")
    a.frombytes(zlib.decompress(data))
    return set(a)


def active_set(conn: Connection, rev_id: int) -> set[int]:
    """Edit ids active at a revision: nearest checkpoint at or above it plus later changes."""
    chain = conn.execute(text("""
        WITH RECURSIVE chain(id, parent_id, has_cp, step) AS (
            SELECT id, parent_id, CASE WHEN checkpoint IS NULL THEN 0 ELSE 1 END, 0
              FROM revisions WHERE id = :rev
            UNION ALL
            SELECT r.id, r.parent_id, CASE WHEN r.checkpoint IS NULL THEN 0 ELSE 1 END, chain.step + 1
              FROM revisions r JOIN chain ON r.id = chain.parent_id
             WHERE chain.has_cp = 0)
        SELECT id, has_cp, step FROM chain ORDER BY step"""), {"rev": rev_id}).all()
    if not chain:
        raise NotFoundError(f"no revision {rev_name(rev_id)}")
    cp_id, has_cp, _ = chain[-1]
    if not has_cp:
        raise StateError(f"{rev_name(rev_id)} reaches the root without a checkpoint: the history is damaged")
    cp = conn.execute(select(Revision.checkpoint).where(Revision.id == cp_id)).scalar_one()
    active = unpack_ids(cp)
    later = [row[0] for row in chain[:-1]]  # newest first
    if later:
        changes: dict[int, list[tuple[int, str]]] = {}
        for rid, eid, action in conn.execute(
                select(RevisionChange.revision_id, RevisionChange.edit_id, RevisionChange.action)
                .where(RevisionChange.revision_id.in_(later))):
            changes.setdefault(rid, []).append((eid, action))
        for rid in reversed(later):  # oldest first
            for eid, action in changes.get(rid, ()):
                if action == "add":
                    active.add(eid)
                else:
                    active.discard(eid)
    return active


# --- refs ------------------------------------------------------------------------------------------

@dataclass
class HeadState:
    revision: int
    branch: str | None    # None when HEAD is detached


def head(conn: Connection) -> HeadState:
    row = conn.execute(select(Ref).where(Ref.name == "HEAD")).one_or_none()
    if row is None:
        raise StateError("the ledger has no HEAD: the database was not initialised by `ledger init`")
    if row.symbolic:
        target = conn.execute(select(Ref.revision_id).where(Ref.name == row.symbolic)).scalar_one_or_none()
        if target is None:
            raise StateError(f"HEAD names branch {row.symbolic!r}, which does not exist")
        return HeadState(target, row.symbolic)
    return HeadState(row.revision_id, None)


def _log_move(conn: Connection, ref: str, old: int | None, new: int | None, actor: str, reason: str,
              old_sym: str | None = None, new_sym: str | None = None) -> None:
    conn.execute(RefLog.__table__.insert().values(
        ref=ref, old_revision=old, new_revision=new, old_symbolic=old_sym, new_symbolic=new_sym,
        actor=actor, created_at=now(), reason=reason))


def set_ref(conn: Connection, name: str, kind: str, rev_id: int, actor: str, reason: str) -> None:
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


def resolve(conn: Connection, name: str) -> int:
    """A revision number from `rev-N`, `HEAD`, `HEAD~k`, a branch or a tag."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise InputError(f"invalid revision name {name!r}")
    m = _REV_RE.match(name)
    if m:
        rev_id = int(m.group(1))
        if conn.execute(select(Revision.id).where(Revision.id == rev_id)).scalar_one_or_none() is None:
            raise NotFoundError(f"no revision {name}")
        return rev_id
    base, _, back = name.partition("~")
    if base == "HEAD":
        rev_id = head(conn).revision
    elif _REF_RE.match(base) and ".." not in base:
        rev_id = conn.execute(select(Ref.revision_id).where(Ref.name == base, Ref.kind != "head")).scalar_one_or_none()
        if rev_id is None:
            raise NotFoundError(f"no revision, branch or tag named {name!r}")
    else:
        raise InputError(f"invalid revision name {name!r}: expected rev-N, HEAD, HEAD~k, a branch or a tag")
    if back:
        if not back.isdigit() or len(back) > 9:
            raise InputError(f"invalid revision name {name!r}: expected ~ followed by a number")
        for _ in range(int(back)):
            parent = conn.execute(select(Revision.parent_id).where(Revision.id == rev_id)).scalar_one()
            if parent is None:
                raise NotFoundError(f"{name} goes past the first revision")
            rev_id = parent
    return rev_id


# --- appending -------------------------------------------------------------------------------------

def next_revision_id(conn: Connection) -> int:
    # Runs inside the serialised write transaction, so max + 1 cannot race.
    return (conn.execute(select(func.max(Revision.id))).scalar() or 0) + 1


def append(conn: Connection, *, parent_id: int | None, operation: str, author: str, message: str,
           changes: list[tuple[int, str]], parent_active: set[int] | None = None):
    """Write one immutable revision on top of parent_id. Changes are (edit_id, "add"|"remove").
    A writer appending many revisions in a row may pass the parent's active set it already
    holds (it is not modified); otherwise it is resolved here."""
    if parent_id is None:
        active: set[int] = set()
        depth, parent_hash = 0, None
    else:
        parent = conn.execute(select(Revision.depth, Revision.chain_hash).where(Revision.id == parent_id)).one()
        active = set(parent_active) if parent_active is not None else active_set(conn, parent_id)
        depth, parent_hash = parent.depth + 1, parent.chain_hash
    for eid, action in changes:
        if action == "add":
            if eid in active:
                raise InputError(f"{edit_name(eid)} is already active")
            active.add(eid)
        elif action == "remove":
            if eid not in active:
                raise InputError(f"{edit_name(eid)} is not active at {rev_name(parent_id or 0)}")
            active.discard(eid)
        else:
            raise ValueError(action)
    row = {"id": next_revision_id(conn), "parent_id": parent_id, "operation": operation,
           "author": author, "created_at": now(), "message": message, "depth": depth,
           "n_active": len(active)}
    hashes = dict(conn.execute(select(Edit.id, Edit.content_hash)
                               .where(Edit.id.in_([e for e, _ in changes]))).all()) if changes else {}
    row["chain_hash"] = revision_hash(row, parent_hash, [(e, a, hashes[e]) for e, a in changes])
    row["checkpoint"] = pack_ids(active) if depth % CHECKPOINT_EVERY == 0 else None
    conn.execute(Revision.__table__.insert().values(**row))
    if changes:
        conn.execute(RevisionChange.__table__.insert(),
                     [{"revision_id": row["id"], "edit_id": e, "action": a} for e, a in changes])
    return conn.execute(select(Revision).where(Revision.id == row["id"])).one()   # a Row


def changes_of(conn: Connection, rev_id: int) -> list[tuple[int, str]]:
    return [(e, a) for e, a in conn.execute(
        select(RevisionChange.edit_id, RevisionChange.action)
        .where(RevisionChange.revision_id == rev_id).order_by(RevisionChange.edit_id))]


def ancestors(conn: Connection, rev_id: int, limit: int) -> list[Revision]:
    """rev_id and its ancestors, newest first, at most `limit`."""
    ids = [r[0] for r in conn.execute(text("""
        WITH RECURSIVE chain(id, parent_id, step) AS (
            SELECT id, parent_id, 0 FROM revisions WHERE id = :rev
            UNION ALL
            SELECT r.id, r.parent_id, chain.step + 1 FROM revisions r JOIN chain ON r.id = chain.parent_id
             WHERE chain.step + 1 < :limit)
        SELECT id FROM chain ORDER BY step"""), {"rev": rev_id, "limit": limit})]
    rows = {r.id: r for r in conn.execute(select(Revision).where(Revision.id.in_(ids))).all()}
    return [rows[i] for i in ids]


# --- verification ------------------------------------------------------------------------------

def verify(conn: Connection) -> list[str]:
    """Recompute every edit hash, blob hash and revision chain hash; return the problems."""
    from .store import blobs
    from .store.schema import Blob
    problems: list[str] = []
    edit_hashes: dict[int, str] = {}
    for e in conn.execute(select(Edit).order_by(Edit.id)).all():
        try:
            h = edit_hash(e)
        except (ValueError, TypeError):
            h = ""
        edit_hashes[e.id] = e.content_hash
        if h != e.content_hash:
            problems.append(f"{edit_name(e.id)}: its stored content does not match its hash")
    for address, data in conn.execute(select(Blob.sha256, Blob.data)):
        try:
            blobs.decode(bytes(data), address)
        except StateError as err:
            problems.append(f"blob {address[:12]}: {err}")
    chain: dict[int, str] = {}
    changes: dict[int, list[tuple[int, str]]] = {}
    for rid, eid, action in conn.execute(select(RevisionChange.revision_id, RevisionChange.edit_id,
                                                RevisionChange.action)):
        changes.setdefault(rid, []).append((eid, action))
    for r in conn.execute(select(Revision).order_by(Revision.id)).all():
        row = {"id": r.id, "parent_id": r.parent_id, "operation": r.operation, "author": r.author,
               "created_at": r.created_at, "message": r.message, "depth": r.depth, "n_active": r.n_active}
        parent_hash = chain.get(r.parent_id) if r.parent_id is not None else None
        expect = revision_hash(row, parent_hash,
                               [(e, a, edit_hashes.get(e, "")) for e, a in changes.get(r.id, [])])
        chain[r.id] = r.chain_hash
        if expect != r.chain_hash:
            problems.append(f"{rev_name(r.id)}: its content does not match its chain hash")
        if r.checkpoint is not None:
            try:
                stored = unpack_ids(r.checkpoint)
            except (zlib.error, ValueError):
                stored = None
            if stored is None or len(stored) != r.n_active:
                problems.append(f"{rev_name(r.id)}: its checkpoint is damaged")
    return problems


def is_ancestor(conn: Connection, anc: int, desc: int) -> bool:
    """True when `anc` is `desc` or one of its ancestors (walks at most the depth gap)."""
    depths = dict(conn.execute(select(Revision.id, Revision.depth).where(Revision.id.in_([anc, desc]))).all())
    if anc not in depths or desc not in depths or depths[anc] > depths[desc]:
        return False
    row = conn.execute(text("""
        WITH RECURSIVE chain(id, parent_id, step) AS (
            SELECT id, parent_id, 0 FROM revisions WHERE id = :desc
            UNION ALL
            SELECT r.id, r.parent_id, chain.step + 1 FROM revisions r JOIN chain ON r.id = chain.parent_id
             WHERE chain.step < :gap)
        SELECT id FROM chain WHERE step = :gap"""), {"desc": desc, "gap": depths[desc] - depths[anc]}).first()
    return row is not None and row[0] == anc


def edit_id_of(name: str) -> int | None:
    m = _EDIT_RE.match(name or "")
    return int(m.group(1)) if m else None
