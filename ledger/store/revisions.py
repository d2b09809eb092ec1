"""Revisions and their change sets, on one Connection.

- A revision is immutable. Its chain hash is sha256 over its canonical content (number,
  parent, parent's chain hash, operation, author, time, message, and its change set with each
  edit's content hash), so changing any stored byte of a revision, a fact, a metric or a
  tensor breaks the chain from there on, and `verify` names where.
- The active set of a revision (which edits it composes) is a packed checkpoint every
  CHECKPOINT_EVERY revisions of depth, plus the change sets after it: resolving it reads at
  most CHECKPOINT_EVERY small change sets, whatever the length of the history.
"""
from __future__ import annotations

import hashlib
import zlib
from array import array
from typing import Any, Iterable

from sqlalchemy import Connection, Row, func, select, text

from ..errors import InputError, NotFoundError, StateError
from ..names import edit_name, rev_name
from . import blobs
from .blobs import now
from .edits import canonical, content_hashes, edit_hash
from .schema import Blob, Edit, Revision, RevisionChange

CHECKPOINT_EVERY = 128


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


# --- reading -------------------------------------------------------------------------------------

def exists(conn: Connection, rev_id: int) -> bool:
    return conn.execute(select(Revision.id).where(Revision.id == rev_id)).scalar_one_or_none() is not None


def get(conn: Connection, rev_id: int) -> Row:
    return conn.execute(select(Revision).where(Revision.id == rev_id)).one()


def parent_of(conn: Connection, rev_id: int) -> int | None:
    return conn.execute(select(Revision.parent_id).where(Revision.id == rev_id)).scalar_one()


def chain_hash(conn: Connection, rev_id: int) -> str:
    return conn.execute(select(Revision.chain_hash).where(Revision.id == rev_id)).scalar_one()


def changes_of(conn: Connection, rev_id: int) -> list[tuple[int, str]]:
    return [(e, a) for e, a in conn.execute(
        select(RevisionChange.edit_id, RevisionChange.action)
        .where(RevisionChange.revision_id == rev_id).order_by(RevisionChange.edit_id))]


def ancestors(conn: Connection, rev_id: int, limit: int) -> list[Row]:
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


def rebase_replacements(conn: Connection) -> dict[int, int]:
    """Old edit -> the edit a `rebase` revision replaced it with."""
    by_rev: dict[int, dict[str, int]] = {}
    for rid, eid, action in conn.execute(
            select(RevisionChange.revision_id, RevisionChange.edit_id, RevisionChange.action)
            .join(Revision, Revision.id == RevisionChange.revision_id).where(Revision.operation == "rebase")):
        by_rev.setdefault(rid, {})[action] = eid
    return {ch["remove"]: ch["add"] for ch in by_rev.values() if "add" in ch and "remove" in ch}


# --- appending -------------------------------------------------------------------------------------

def next_revision_id(conn: Connection) -> int:
    # Runs inside the serialised write transaction, so max + 1 cannot race.
    return (conn.execute(select(func.max(Revision.id))).scalar() or 0) + 1


def append(conn: Connection, *, parent_id: int | None, operation: str, author: str, message: str,
           changes: list[tuple[int, str]], parent_active: set[int] | None = None) -> Row:
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
    hashes = content_hashes(conn, [e for e, _ in changes]) if changes else {}
    row["chain_hash"] = revision_hash(row, parent_hash, [(e, a, hashes[e]) for e, a in changes])
    row["checkpoint"] = pack_ids(active) if depth % CHECKPOINT_EVERY == 0 else None
    conn.execute(Revision.__table__.insert().values(**row))
    if changes:
        conn.execute(RevisionChange.__table__.insert(),
                     [{"revision_id": row["id"], "edit_id": e, "action": a} for e, a in changes])
    return get(conn, row["id"])


# --- verification ------------------------------------------------------------------------------

def verify(conn: Connection) -> list[str]:
    """Recompute every edit hash, blob hash and revision chain hash; return the problems."""
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
            blobs.check(bytes(data), address)
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
