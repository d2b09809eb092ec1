"""Reading history: where HEAD is, revisions and their edits, what changed between two
revisions, the integrity check, and the audit record. Nothing here writes."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import date, datetime, time, timezone
from typing import Any

from .errors import InputError, NotFoundError
from .names import edit_name, eval_name, parse_edit, rev_name
from .results import DiffResult, EditInfo, EvalReport, LayerStats, RevisionInfo
from .handle import Handle
from .store import audit as audit_store
from .store import blobs, edits, evaluations, refs, revisions
from .store.sql import Conn


def resolve(s: Handle, rev: str = "HEAD") -> int:
    with s.reading() as conn:
        return refs.resolve(conn, rev)


def head(s: Handle) -> dict[str, Any]:
    with s.reading() as conn:
        state = refs.head(conn)
    return {"revision": rev_name(state.revision), "branch": state.branch, "detached": state.branch is None}


def _info(conn: Conn, r: Any, names: dict[int, list[str]]) -> RevisionInfo:
    changes = revisions.changes_of(conn, r.id)
    return RevisionInfo(
        revision=rev_name(r.id), parent=rev_name(r.parent_id) if r.parent_id else None,
        operation=r.operation, author=r.author, created_at=r.created_at, message=r.message,
        n_active=r.n_active, chain_hash=r.chain_hash,
        added=[edit_name(e) for e, a in changes if a == "add"],
        removed=[edit_name(e) for e, a in changes if a == "remove"],
        refs=names.get(r.id, []))


def log(s: Handle, rev: str = "HEAD", limit: int = 20) -> list[RevisionInfo]:
    """Revisions from `rev` back through its parents, newest first."""
    if limit < 1:
        raise InputError("--limit must be at least 1")
    with s.reading() as conn:
        start = refs.resolve(conn, rev)
        names = refs.by_revision(conn)
        return [_info(conn, r, names) for r in revisions.ancestors(conn, start, limit)]


def evaluations_at(conn: Conn, rid: int, *, per_fact: bool) -> list[EvalReport]:
    return [EvalReport.from_row(r, per_fact=per_fact) for r in evaluations.of_revision(conn, rid, per_fact=per_fact)]


def show(s: Handle, rev: str = "HEAD") -> RevisionInfo:
    """One revision with the full records of the edits its change set names."""
    with s.reading() as conn:
        rid = refs.resolve(conn, rev)
        info = _info(conn, revisions.get(conn, rid), refs.by_revision(conn))
        ids = [e for e, _ in revisions.changes_of(conn, rid)]
        if ids:
            info.edits = [EditInfo.from_row(e) for e in edits.rows(conn, ids)]
        info.evaluations = evaluations_at(conn, rid, per_fact=False)
        return info


def active_edits(s: Handle, rev: str = "HEAD", *, offset: int = 0, limit: int | None = None) -> list[EditInfo]:
    """The edits active at `rev`, by id; with offset/limit, that slice of them (a page: only
    its rows are read, however many edits are active)."""
    if offset < 0 or (limit is not None and limit < 0):
        raise InputError("offset and limit must not be negative")
    with s.reading() as conn:
        ids = sorted(revisions.active_set(conn, refs.resolve(conn, rev)))
        ids = ids[offset:] if limit is None else ids[offset:offset + limit]
        return [EditInfo.from_row(e) for e in edits.rows(conn, ids)]


def edit_tensors(s: Handle, name: str) -> dict[str, dict[str, Any]]:
    """Each tensor of an edit's blob: its shape and Frobenius norm, read without torch (the
    blob is verified as every read verifies it)."""
    eid = parse_edit(name)
    with s.reading() as conn:
        row = edits.get(conn, eid)
        if row is None:
            raise NotFoundError(f"no edit {name}")
        return blobs.get_tensor_norms(conn, row.blob_sha256)


def evaluation_history(s: Handle, *, limit: int = 5000) -> list[EvalReport]:
    """The stored evaluations of every revision, without their per-fact rows, by revision
    then evaluation: the means over the history (the newest `limit` of them)."""
    if limit < 1:
        raise InputError("limit must be at least 1")
    with s.reading() as conn:
        rows = evaluations.newest(conn, limit)
    return [EvalReport.from_row(r, per_fact=False) for r in sorted(rows, key=lambda r: (r.revision_id, r.id))]


def edit(s: Handle, name: str) -> EditInfo:
    eid = parse_edit(name)
    with s.reading() as conn:
        row = edits.get(conn, eid)
    if row is None:
        raise NotFoundError(f"no edit {name}")
    return EditInfo.from_row(row)


def verify(s: Handle) -> list[str]:
    """Every problem found by recomputing all hashes; empty when the ledger is intact."""
    with s.reading() as conn:
        return revisions.verify(conn)


_TIME_EXAMPLES = "e.g. 2026-12-03, 2026-12-03T19:49, 2026-12-03 19:49:05Z or 2026-12-03T20:49+01:00"


def audit_time(value: datetime | date | str, *, option: str, end_of_day: bool = False) -> str:
    """An audit time bound as the stored text (UTC, `%Y-%m-%dT%H:%M:%S.%fZ`): fixed-width UTC
    text orders as the times do, so the store compares it as text. Accepts ISO-8601 text (a
    date, a date-time with or without seconds, `T` or a space, `Z` or an offset), a datetime or
    a date. A time without an offset is UTC. A date alone is its first instant, or with
    `end_of_day` (an upper bound) its last, so `--until DATE` includes the whole day."""
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed: datetime | date = (date.fromisoformat(text) if len(text) <= 10
                                       else datetime.fromisoformat(text))
        except ValueError:
            raise InputError(f"{option} {value!r} is not an ISO-8601 date or time ({_TIME_EXAMPLES})") from None
    else:
        parsed = value
    if not isinstance(parsed, datetime):
        if not isinstance(parsed, date):
            raise InputError(f"{option} must be a date, a datetime or ISO-8601 text, not {type(value).__name__}")
        parsed = datetime.combine(parsed, time.max if end_of_day else time.min)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audit(s: Handle, *, rev: str | None = None, edit: str | None = None, actor: str | None = None,
          since: datetime | date | str | None = None, until: datetime | date | str | None = None,
          command: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The append-only audit record, newest first, filtered. `since` and `until` are inclusive
    bounds in time (see audit_time: ISO-8601 text, datetimes or dates; no offset means UTC;
    an `until` date includes that whole day)."""
    lo = audit_time(since, option="--since") if since is not None else None
    hi = audit_time(until, option="--until", end_of_day=True) if until is not None else None
    with s.reading() as conn:
        rid = refs.resolve(conn, rev) if rev else None
        eid = parse_edit(edit) if edit else None
        rows = audit_store.events(conn, revision=rid, edit=eid, actor=actor, since=lo, until=hi,
                                  command=command, limit=limit)
        return [{"id": r.id, "time": r.created_at, "actor": r.actor, "command": r.command,
                 "revision": rev_name(r.revision_id) if r.revision_id else None,
                 "edit": edit_name(r.edit_id) if r.edit_id else None,
                 "details": json.loads(r.details_json)} for r in rows]


# --- diff ------------------------------------------------------------------------------------------

def diff(s: Handle, a: str, b: str) -> DiffResult:
    """What changes from revision a to revision b: edits, per-layer blocks and rank, the
    norm of the added and removed tensors, and metric deltas of edits present in both."""
    with s.reading() as conn:
        ra, rb = refs.resolve(conn, a), refs.resolve(conn, b)
        sa, sb = revisions.active_set(conn, ra), revisions.active_set(conn, rb)
        added, removed = sorted(sb - sa), sorted(sa - sb)
        changed = added + removed
        info = edits.summaries(conn, changed)
        layers: dict[str, dict[str, Any]] = {}
        for side, ids in (("a", sa), ("b", sb)):
            for layer, n, total in edits.layer_totals(conn, ids):
                entry = layers.setdefault(str(layer), {"a": asdict(LayerStats(0, 0)), "b": asdict(LayerStats(0, 0)),
                                                       "norm_added": 0.0, "norm_removed": 0.0})
                entry[side] = asdict(LayerStats(n, total))
        sums: dict[tuple[str, str], list[float]] = {}
        for e in changed:
            layer, _, _, blob, norm = info[e]
            if norm is None:   # recorded at creation; older records: read the tensors
                norm = blobs.get_norm(conn, blob)
            sums.setdefault((str(layer), "norm_added" if e in sb else "norm_removed"), []).append(norm)
        for (layer, key), norms in sums.items():
            layers[layer][key] = round(math.fsum(norms), 6)   # fsum: independent of order
        deltas = _metric_deltas(conn, ra, rb, sa & sb)
        eval_deltas = _eval_deltas(conn, ra, rb)

    def brief(e: int) -> dict[str, Any]:
        layer, rank, fact = info[e][0], info[e][1], info[e][2]
        return {"edit": edit_name(e), "prompt": fact["prompt"], "target_new": fact["target_new"],
                "layer": layer, "rank": rank}
    return DiffResult(a=rev_name(ra), b=rev_name(rb), added=[brief(e) for e in added],
                      removed=[brief(e) for e in removed], layers=dict(sorted(layers.items())),
                      metric_deltas=deltas, eval_deltas=eval_deltas)


def _metric_deltas(conn: Conn, ra: int, rb: int, common: set[int]) -> dict[str, dict[str, float]]:
    """Edits present in both whose latest measurement differs between the two revisions."""
    if not common:
        return {}
    rows = evaluations.remeasures_of(conn, common)
    if not rows:
        return {}
    created = edits.metrics_of(conn, {r[0] for r in rows})

    def at(rev: int, e: int) -> dict[str, float]:
        latest = created[e]
        for eid, rid, m in rows:
            if eid == e and revisions.is_ancestor(conn, rid, rev):
                latest = json.loads(m)
        return latest
    out = {}
    for e in sorted({r[0] for r in rows}):
        ma, mb = at(ra, e), at(rb, e)
        d = {k: round(mb[k] - ma[k], 6) for k in mb if k in ma and mb[k] != ma[k]}
        if d:
            out[edit_name(e)] = d
    return out


def _eval_deltas(conn: Conn, ra: int, rb: int) -> list[dict[str, Any]]:
    """Per dataset evaluated at both revisions: the latest evaluation on each side and the
    deltas (b - a) of the means they share."""
    latest: dict[tuple[int, str], Any] = {}
    for r in evaluations.summaries_at(conn, {ra, rb}):
        latest[(r.revision_id, r.dataset_sha256)] = r
    out = []
    for sha in sorted({s for _, s in latest}):
        ea, eb = latest.get((ra, sha)), latest.get((rb, sha))
        if ea is None or eb is None:
            continue
        ma, mb = json.loads(ea.means_json), json.loads(eb.means_json)
        out.append({"dataset_sha256": sha, "n": eb.n, "a": eval_name(ea.id), "b": eval_name(eb.id),
                    "label_a": ea.label, "label_b": eb.label,
                    "deltas": {k: round(mb[k] - ma[k], 6) for k in sorted(mb) if k in ma}})
    return out
