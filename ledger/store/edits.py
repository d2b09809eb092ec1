"""The edits table, on one Connection: an edit is written once, with a content hash over
every stored field, and read by id. Reads are SQL text (sql.py), on a plain driver
connection or a SQLAlchemy Connection alike; the write goes through SQLAlchemy's table."""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Iterable

from .sql import Conn, on

if TYPE_CHECKING:
    from sqlalchemy import Connection

# An edit row's columns, in the table's order.
COLUMNS = ("id, fact_json, subject, relation, method, layer, rank, config_json, blob_sha256, metrics_json, "
           "stats_json, versions_json, trained_on, author, created_at, content_hash")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def edit_payload(e: Any) -> dict[str, Any]:
    """What an edit's content hash covers: every column but the hash itself."""
    return {"id": e.id, "fact": json.loads(e.fact_json), "subject": e.subject, "relation": e.relation,
            "method": e.method, "layer": e.layer, "rank": e.rank, "config": json.loads(e.config_json),
            "blob": e.blob_sha256, "metrics": json.loads(e.metrics_json), "stats": json.loads(e.stats_json),
            "versions": json.loads(e.versions_json), "trained_on": e.trained_on, "author": e.author,
            "created_at": e.created_at}


def edit_hash(e: Any) -> str:
    return hashlib.sha256(canonical(edit_payload(e))).hexdigest()


def write(conn: Connection, columns: dict[str, Any]) -> int:
    """Write one edit (every column but id and content_hash) and its content hash; its id."""
    from .schema import Edit
    edit = Edit(**columns, content_hash="")
    edit_id = conn.execute(Edit.__table__.insert().values(
        {c.name: getattr(edit, c.name) for c in Edit.__table__.columns if c.name != "id"})).inserted_primary_key[0]
    edit.id = edit_id
    conn.execute(Edit.__table__.update().where(Edit.id == edit_id).values(content_hash=edit_hash(edit)))
    return edit_id


def _of(conn: Conn | Connection, columns: str, ids: Iterable[int], tail: str = "") -> list[Any]:
    """These columns of the edits with these ids (none for no ids); `tail` follows the WHERE."""
    ids = list(ids)
    if not ids:
        return []
    q = on(conn)
    where, value = q.among("id", ids)
    return q.rows(f"SELECT {columns} FROM edits WHERE {where}{tail}", ids=value)


def content_hashes(conn: Conn | Connection, ids: list[int]) -> dict[int, str]:
    return dict(_of(conn, "id, content_hash", ids))


def get(conn: Conn | Connection, edit_id: int) -> Any:
    """The edit's row (COLUMNS), or None."""
    return on(conn).first(f"SELECT {COLUMNS} FROM edits WHERE id = :id", id=edit_id)


def rows(conn: Conn | Connection, ids: Iterable[int]) -> list[Any]:
    """The full rows (COLUMNS) of these edits, by id."""
    return _of(conn, COLUMNS, ids, " ORDER BY id")


def facts_of(conn: Conn | Connection, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Each edit's fact record, in the order the database returns them."""
    return {eid: json.loads(fj) for eid, fj in _of(conn, "id, fact_json", ids)}


def metrics_of(conn: Conn | Connection, ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """The metrics each edit was created with."""
    return {e: json.loads(m) for e, m in _of(conn, "id, metrics_json", ids)}


def retrain_inputs(conn: Conn | Connection,
                   ids: Iterable[int]) -> dict[int, tuple[dict[str, Any], dict[str, Any], int]]:
    """(fact record, stored config, layer) of each edit: what it was trained from."""
    return {e: (json.loads(f), json.loads(c), layer)
            for e, f, c, layer in _of(conn, "id, fact_json, config_json, layer", ids)}


def trained_on(conn: Conn | Connection, ids: Iterable[int]) -> list[tuple[int, int | None]]:
    """(edit, the revision it was trained on) for each of these edits."""
    return [tuple(r) for r in _of(conn, "id, trained_on", ids)]


def block_addresses(conn: Conn | Connection, ids: Iterable[int]) -> list[tuple[int, int, str]]:
    """(edit, layer, blob address) of each of these edits."""
    return [tuple(r) for r in _of(conn, "id, layer, blob_sha256", ids)]


def stating(conn: Conn | Connection, subject: str, relation: str) -> list[int]:
    """Every edit, active or not, that states this subject and relation."""
    return on(conn).column("SELECT id FROM edits WHERE subject = :subject AND relation = :relation",
                           subject=subject, relation=relation)


def summaries(conn: Conn | Connection,
              ids: Iterable[int]) -> dict[int, tuple[int, int, dict[str, Any], str, float | None]]:
    """(layer, rank, fact record, blob address, tensor norm at creation) of each edit."""
    return {e: (layer, rank, json.loads(f), blob, json.loads(st).get("tensor_norm"))
            for e, layer, rank, f, blob, st in _of(conn, "id, layer, rank, fact_json, blob_sha256, stats_json", ids)}


def layer_totals(conn: Conn | Connection, ids: Iterable[int]) -> list[tuple[int, int, int]]:
    """(layer, number of blocks, total rank) over these edits, per layer."""
    return [(layer, int(n), int(total or 0))
            for layer, n, total in _of(conn, "layer, count(*) AS n, sum(rank) AS total", ids, " GROUP BY layer")]
