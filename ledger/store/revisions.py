"""Revisions and their change sets, on one Connection.

- A revision is immutable. Its chain hash is sha256 over its canonical content (number,
  parent, parent's chain hash, operation, author, time, message, and its change set with each
  edit's content hash), so changing any stored byte of a revision, a fact, a metric or a
  tensor breaks the chain from there on, and `verify` names where.
- The active set of a revision (which edits it composes) is a packed checkpoint every
  CHECKPOINT_EVERY revisions of depth, plus the change sets after it: resolving it reads at
  most CHECKPOINT_EVERY small change sets, whatever the length of the history.

Reads are SQL text (sql.py), run on a plain driver connection or a SQLAlchemy Connection
alike; appending writes through SQLAlchemy's tables, imported there.
"""
from __future__ import annotations

import hashlib
import zlib
from array import array
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import InputError, NotFoundError, StateError
from ..names import edit_name, rev_name
from . import blobs, edits
from .blobs import now
from .edits import canonical, content_hashes, edit_hash
from .sql import Conn, on

if TYPE_CHECKING:
    from sqlalchemy import Connection

# A revision row's columns, in the table's order.
COLUMNS = "id, parent_id, operation, author, created_at, message, depth, n_active, checkpoint, chain_hash"

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


def active_set(conn: Conn | Connection, rev_id: int) -> set[int]:
    """Edit ids active at a revision: nearest checkpoint at or above it plus later changes."""
    q = on(conn)
    chain = q.rows("""
        WITH RECURSIVE chain(id, parent_id, has_cp, step) AS (
            SELECT id, parent_id, CASE WHEN checkpoint IS NULL THEN 0 ELSE 1 END, 0
              FROM revisions WHERE id = :rev
            UNION ALL
            SELECT r.id, r.parent_id, CASE WHEN r.checkpoint IS NULL THEN 0 ELSE 1 END, chain.step + 1
              FROM revisions r JOIN chain ON r.id = chain.parent_id
             WHERE chain.has_cp = 0)
        SELECT id, has_cp, step FROM chain ORDER BY step""", rev=rev_id)
    if not chain:
        raise NotFoundError(f"no revision {rev_name(rev_id)}")
    cp_id, has_cp, _ = chain[-1]
    if not has_cp:
        raise StateError(f"{rev_name(rev_id)} reaches the root without a checkpoint: the history is damaged")
    active = unpack_ids(q.scalar("SELECT checkpoint FROM revisions WHERE id = :id", id=cp_id))
    later = [row[0] for row in chain[:-1]]  # newest first
    if later:
        changes: dict[int, list[tuple[int, str]]] = {}
        where, ids = q.among("revision_id", later)
        for rid, eid, action in q.rows(f"SELECT revision_id, edit_id, action FROM revision_changes WHERE {where}",
                                       ids=ids):
            changes.setdefault(rid, []).append((eid, action))
        for rid in reversed(later):  # oldest first
            for eid, action in changes.get(rid, ()):
                if action == "add":
                    active.add(eid)
                else:
                    active.discard(eid)
    return active


# --- reading -------------------------------------------------------------------------------------

def exists(conn: Conn | Connection, rev_id: int) -> bool:
    return on(conn).scalar("SELECT id FROM revisions WHERE id = :id", id=rev_id) is not None


def get(conn: Conn | Connection, rev_id: int) -> Any:
    """The revision's row (COLUMNS)."""
    row = on(conn).first(f"SELECT {COLUMNS} FROM revisions WHERE id = :id", id=rev_id)
    if row is None:
        raise NotFoundError(f"no revision {rev_name(rev_id)}")
    return row


def parent_of(conn: Conn | Connection, rev_id: int) -> int | None:
    return on(conn).scalar("SELECT parent_id FROM revisions WHERE id = :id", id=rev_id)


def chain_hash(conn: Conn | Connection, rev_id: int) -> str:
    return on(conn).scalar("SELECT chain_hash FROM revisions WHERE id = :id", id=rev_id)


def changes_of(conn: Conn | Connection, rev_id: int) -> list[tuple[int, str]]:
    return [(e, a) for e, a in on(conn).rows(
        "SELECT edit_id, action FROM revision_changes WHERE revision_id = :rev ORDER BY edit_id", rev=rev_id)]


def ancestors(conn: Conn | Connection, rev_id: int, limit: int) -> list[Any]:
    """rev_id and its ancestors, newest first, at most `limit`: their rows (COLUMNS)."""
    columns = ", ".join(f"r.{c}" for c in COLUMNS.split(", "))
    return on(conn).rows(f"""
        WITH RECURSIVE chain(id, parent_id, step) AS (
            SELECT id, parent_id, 0 FROM revisions WHERE id = :rev
            UNION ALL
            SELECT r.id, r.parent_id, chain.step + 1 FROM revisions r JOIN chain ON r.id = chain.parent_id
             WHERE chain.step + 1 < :limit)
        SELECT {columns} FROM chain JOIN revisions r ON r.id = chain.id ORDER BY chain.step""",
        rev=rev_id, limit=limit)


def is_ancestor(conn: Conn | Connection, anc: int, desc: int) -> bool:
    """True when `anc` is `desc` or one of its ancestors (walks at most the depth gap)."""
    q = on(conn)
    depths = dict(q.rows("SELECT id, depth FROM revisions WHERE id IN (:anc, :desc)", anc=anc, desc=desc))
    if anc not in depths or desc not in depths or depths[anc] > depths[desc]:
        return False
    row = q.first("""
        WITH RECURSIVE chain(id, parent_id, step) AS (
            SELECT id, parent_id, 0 FROM revisions WHERE id = :desc
            UNION ALL
            SELECT r.id, r.parent_id, chain.step + 1 FROM revisions r JOIN chain ON r.id = chain.parent_id
             WHERE chain.step < :gap)
        SELECT id FROM chain WHERE step = :gap""", desc=desc, gap=depths[desc] - depths[anc])
    return row is not None and row[0] == anc


def rebase_replacements(conn: Conn | Connection) -> dict[int, int]:
    """Old edit -> the edit a `rebase` revision replaced it with."""
    by_rev: dict[int, dict[str, int]] = {}
    for rid, eid, action in on(conn).rows(
            "SELECT c.revision_id, c.edit_id, c.action FROM revision_changes c "
            "JOIN revisions r ON r.id = c.revision_id WHERE r.operation = 'rebase'"):
        by_rev.setdefault(rid, {})[action] = eid
    return {ch["remove"]: ch["add"] for ch in by_rev.values() if "add" in ch and "remove" in ch}


# --- appending -------------------------------------------------------------------------------------

def next_revision_id(conn: Conn | Connection) -> int:
    # Runs inside the serialised write transaction, so max + 1 cannot race.
    return (on(conn).scalar("SELECT max(id) FROM revisions") or 0) + 1


def append(conn: Connection, *, parent_id: int | None, operation: str, author: str, message: str,
           changes: list[tuple[int, str]], parent_active: set[int] | None = None) -> Any:
    """Write one immutable revision on top of parent_id. Changes are (edit_id, "add"|"remove").
    A writer appending many revisions in a row may pass the parent's active set it already
    holds (it is not modified); otherwise it is resolved here. The new revision's row (COLUMNS)."""
    from .schema import Revision, RevisionChange
    if parent_id is None:
        active: set[int] = set()
        depth, parent_hash = 0, None
    else:
        parent = get(conn, parent_id)
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

def verify(conn: Conn | Connection) -> list[str]:
    """Recompute every edit hash, blob hash and revision chain hash; return the problems."""
    q = on(conn)
    problems: list[str] = []
    edit_hashes: dict[int, str] = {}
    for e in q.rows(f"SELECT {edits.COLUMNS} FROM edits ORDER BY id"):
        try:
            h = edit_hash(e)
        except (ValueError, TypeError):
            h = ""
        edit_hashes[e.id] = e.content_hash
        if h != e.content_hash:
            problems.append(f"{edit_name(e.id)}: its stored content does not match its hash")
    for address, data in q.rows("SELECT sha256, data FROM blobs"):
        try:
            blobs.check(bytes(data), address)
        except StateError as err:
            problems.append(f"blob {address[:12]}: {err}")
    chain: dict[int, str] = {}
    changes: dict[int, list[tuple[int, str]]] = {}
    for rid, eid, action in q.rows("SELECT revision_id, edit_id, action FROM revision_changes"):
        changes.setdefault(rid, []).append((eid, action))
    for r in q.rows(f"SELECT {COLUMNS} FROM revisions ORDER BY id"):
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
