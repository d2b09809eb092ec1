"""Creating a ledger and keeping it: init, the schema's migrations, undoing changes (revert),
retraining outdated edits (rebase), and deleting unreferenced blobs (gc)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import Connection, Engine

from . import wordings as wd
from .baft import BaftConfig
from .errors import InputError, NotFoundError, StateError
from .facts import fact_from_record
from .names import DEFAULT_BRANCH, edit_id_of, edit_name, rev_name
from .progress import Progress
from .results import AddResult, Remeasure, RevertResult
from .handle import Handle
from .store import audit, blobs, edits, evaluations, refs, revisions, settings
from .store import engine as store_engine
from .store import wordings as wording_table
from .store.engine import write_transaction, writer_lock

# Training and measuring (torch, transformers) are imported by the commands that do them:
# `db current`, `db upgrade` and `gc` stay light.
if TYPE_CHECKING:
    from .models import BaseModel


# --- creating a ledger and migrating its schema ------------------------------------------------

def create(engine: Engine, spec: str, base: BaseModel, author: str, *, wordings: bool = True) -> None:
    """Migrate an empty database to head, record the base model's fingerprint, and write
    rev-1, the base model with no edits, with HEAD on the default branch. With `wordings` the
    table of relation wordings starts with the tables that ship with the package."""
    store_engine.upgrade(engine)
    with write_transaction(engine) as conn:
        settings.write(conn, {"base_model": spec, "base_fingerprint": base.fingerprint,
                              "hidden_size": str(base.hidden_size), "n_layers": str(len(base.layers))})
        root = revisions.append(conn, parent_id=None, operation="init", author=author,
                                message=f"base model {os.path.basename(spec)}", changes=[])
        refs.set_ref(conn, DEFAULT_BRANCH, "branch", root.id, author, "init")
        refs.set_head(conn, branch=DEFAULT_BRANCH, rev_id=root.id, actor=author, reason="init")
        audit.record(conn, author, "init", root.id, None, {"model": spec, "fingerprint": base.fingerprint})
        if wordings:
            pairs = wd.builtin_pairs()
            added = wording_table.write(conn, pairs, "builtin", blobs.now())
            audit.record(conn, author, "wordings", None, None, {"source": "builtin", "files": list(wd.BUILTIN),
                                                                "pairs": len(pairs), "added": added})


@dataclass(frozen=True)
class SchemaState:
    current: str | None   # the database's alembic revision (None: not a ledger)
    head: str             # the revision this version of the code needs

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current, "head": self.head}


def db_current(db: str | None) -> SchemaState:
    """The schema revision of a database and the one this version needs; changes nothing."""
    engine = store_engine.make_engine(store_engine.database_url(db, search=True))
    try:
        store_engine.check_reachable(engine)
        return SchemaState(store_engine.current_revision(engine), store_engine.head_revision())
    finally:
        engine.dispose()


def db_upgrade(db: str | None, target: str = "head") -> tuple[str | None, str | None]:
    """Migrate a ledger's schema to `target`; (revision before, revision after)."""
    engine = store_engine.make_engine(store_engine.database_url(db, search=True))
    try:
        store_engine.check_reachable(engine)
        if not store_engine.has_ledger_tables(engine):
            raise StateError("no ledger in this database: run `ledger init`")
        before = store_engine.current_revision(engine)
        store_engine.upgrade(engine, target)
        return before, store_engine.current_revision(engine)
    finally:
        engine.dispose()


# --- gc ----------------------------------------------------------------------------------------------

def gc(s: Handle) -> dict[str, int]:
    """Delete blobs no edit refers to. Commits write a blob and its edit in one
    transaction, so orphans only come from outside tampering or a bulk import."""
    with write_transaction(s.engine) as conn:
        orphans = blobs.orphans(conn)
        if orphans:
            blobs.remove(conn, [a for a, _ in orphans])
            audit.record(conn, s.author, "gc", None, None, {"blobs": [a for a, _ in orphans]})
    return {"blobs_removed": len(orphans), "bytes_removed": int(sum(n for _, n in orphans))}


# --- edits whose training composition changed ------------------------------------------------------
#
# An edit is trained with the parent's edits on, so a later change of that composition can
# change what it does. Two questions are asked of it, and they differ on purpose:
# - `affected_by`: which active edits run in a different composition than they were trained
#   in, as far as THESE changed edits go (either way: removed since, or restored since)? A
#   revert re-measures them.
# - `outdated`: which active edits were trained with an edit that is no longer active (a
#   rebased edit counts as the edit that replaced it, so rebasing one edit does not outdate
#   the others)? Edits added after an edit was trained do not outdate it: that is every
#   ledger's normal state. `rebase` retrains them.

def _training_compositions(conn: Connection, active: set[int]) -> list[tuple[int, set[int]]]:
    """(edit, the active set it was trained in) for each active edit with a recorded parent."""
    return [(eid, revisions.active_set(conn, trained_on))
            for eid, trained_on in edits.trained_on(conn, active) if trained_on is not None]


def affected_by(conn: Connection, active: set[int], changed: set[int]) -> list[int]:
    """Active edits that were trained with any of `changed` in a different state than now."""
    return sorted(eid for eid, then in _training_compositions(conn, active)
                  if any((c in then) != (c in active) for c in changed))


def outdated(conn: Connection, active: set[int]) -> list[int]:
    """Active edits whose training composition holds an edit no longer active, following
    rebase replacements."""
    replaced = revisions.rebase_replacements(conn)

    def current(e: int) -> int:
        while e in replaced:
            e = replaced[e]
        return e
    return sorted(eid for eid, then in _training_compositions(conn, active)
                  if not {current(e) for e in then} <= active)


def stale_edits(s: Handle, rev: str = "HEAD") -> list[str]:
    """Active edits whose training composition has since changed (revert, supersede)."""
    with s.engine.connect() as conn:
        active = revisions.active_set(conn, refs.resolve(conn, rev))
        return [edit_name(e) for e in outdated(conn, active)]


# --- revert ------------------------------------------------------------------------------------------

def remeasure(s: Handle, active: set[int], edit_ids: list[int], revision: int | None) -> dict[int, dict[str, float]]:
    """Metrics of each edit in the composition `active`, locality against the same
    composition without that edit (as at creation)."""
    from .evaluate import measure, score
    with s.engine.connect() as conn:
        facts = edits.facts_of(conn, edit_ids)
    out = {}
    for eid in edit_ids:
        fact = fact_from_record(facts[eid])
        composed = s.compose(active - {eid}, None)
        before = measure(composed.model, composed.tokenizer, fact)
        composed = s.compose(active, revision)
        out[eid] = score(measure(composed.model, composed.tokenizer, fact), before)
    return out


def revert(s: Handle, target: str, *, message: str | None = None) -> RevertResult:
    """A new revision on HEAD undoing `target`: a revision (its change set, inverted) or
    an edit (removed). Edits trained with the reverted state are re-measured."""
    with writer_lock(s.engine):
        return _revert(s, target, message)


def _revert(s: Handle, target: str, message: str | None) -> RevertResult:
    with s.engine.connect() as conn:
        state = refs.head(conn)
        active = revisions.active_set(conn, state.revision)
        eid = edit_id_of(target)
        if eid is not None:
            if eid not in active:
                if edits.get(conn, eid) is None:
                    raise NotFoundError(f"no such edit: {target}")
                raise InputError(f"{target} is not active at {rev_name(state.revision)}: nothing to revert")
            changes = [(eid, "remove")]
        else:
            rid = refs.resolve(conn, target)
            changes = []
            for e, action in revisions.changes_of(conn, rid):
                if action == "add" and e in active:
                    changes.append((e, "remove"))
                elif action == "remove" and e not in active:
                    changes.append((e, "add"))
            if not changes:
                raise InputError(f"{target} changed nothing that is still in effect at "
                                 f"{rev_name(state.revision)}: nothing to revert")
        new_active = set(active)
        for e, a in changes:
            (new_active.add if a == "add" else new_active.discard)(e)
        deps = affected_by(conn, new_active, {e for e, _ in changes})
        old_metrics = edits.metrics_of(conn, deps)
    after = remeasure(s, new_active, deps, None)
    with write_transaction(s.engine) as conn:
        if refs.head(conn).revision != state.revision:
            raise StateError("the branch moved while re-measuring: nothing was written, run the revert again")
        rev = revisions.append(conn, parent_id=state.revision, operation="revert", author=s.author,
                               message=message or f"revert {target}", changes=changes)
        evaluations.write_remeasures(conn, rev.id, after)
        refs.advance_head(conn, rev.id, s.author, f"revert {target}")
        audit.record(conn, s.author, "revert", rev.id, eid, {"target": target, "changes": [
            [edit_name(e), a] for e, a in changes], "remeasured": [edit_name(e) for e in deps]})
    return RevertResult(
        revision=rev_name(rev.id), reverted=target,
        removed=[edit_name(e) for e, a in changes if a == "remove"],
        restored=[edit_name(e) for e, a in changes if a == "add"],
        remeasured=[Remeasure(edit_name(e), old_metrics[e], after[e]) for e in deps])


# --- rebase ------------------------------------------------------------------------------------------

def rebase(s: Handle, *, progress: Progress | None = None) -> list[AddResult]:
    """Retrain every outdated edit at HEAD against the current composition, each as a new
    `rebase` revision that replaces the old edit, keeping its fact and hyperparameters."""
    from .editing import training_progress
    with s.engine.connect() as conn:
        active = revisions.active_set(conn, refs.head(conn).revision)
        stale = outdated(conn, active)
        inputs = edits.retrain_inputs(conn, stale)
    configs = {e: BaftConfig.from_dict(inputs[e][1], stored=True) for e in stale}
    total, offset = sum(configs[e].steps for e in stale), 0
    results = []
    for i, eid in enumerate(stale):
        steps = training_progress(progress, f"edit {i + 1}/{len(stale)}", i, 1, offset, total, len(stale))
        offset += configs[eid].steps
        with writer_lock(s.engine):
            results.append(_rebase_one(s, eid, inputs[eid][0], configs[eid], inputs[eid][2], steps))
    return results


def _rebase_one(s: Handle, eid: int, fact: dict[str, Any], cfg: BaftConfig, layer: int,
                progress: Callable[[int, int], None] | None) -> AddResult:
    from .editing import train_and_commit
    with s.engine.connect() as conn:
        state = refs.head(conn)
        now_active = revisions.active_set(conn, state.revision)
    [result] = train_and_commit(s, [fact_from_record(fact)], cfg, layer, state.revision, now_active - {eid}, [eid],
                                "rebase", f"rebase {edit_name(eid)}", progress)
    return result
