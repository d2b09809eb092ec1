"""`replay`: a ledger's active facts retrained, in order, on another base model, into a new ledger.

When the base model changes, the facts are the source and the tensors are rebuilt: a new
ledger is created on the new model (`Ledger.init`, so a new fingerprint), the source's table
of relation wordings is copied into it (the facts train on the same wordings), and the facts
active at the source revision are added one by one through the normal add path, in the order
their edits were committed, each with the config it was trained with. The layer an edit was
trained at is carried to the same relative depth of the new model (the default layer maps to
the new model's default). Each new revision and edit keeps the source edit's author; its
message names the source ledger and edit, and a `replay` audit event per fact records the
source ledger, revision, edit and content hash and who replayed it. A fact the new base
already answers is not trained (nothing to edit): the result lists it as skipped.

The new ledger appears whole or not at all: a SQLite ledger is built in a temporary file
beside the target and linked into place at the end; a PostgreSQL one is built in place and
its tables are dropped again if the replay fails.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, StateError
from .names import edit_id_of
from .progress import Progress, ProgressEvent
from .store import audit, blobs, edits
from .store import wordings as wording_table
from .store.engine import check_reachable, describe, has_ledger_tables, make_engine, write_transaction

if TYPE_CHECKING:
    from .api import Ledger
    from .results import EditInfo

# The metrics the report sets side by side (the CLI's columns); every stored metric is kept.
HEADLINE = ("reliability", "generalization", "locality")


@dataclass
class ReplayedFact:
    """One source fact: its source edit and metrics, and the new edit and metrics (None where
    it was skipped)."""
    source_edit: str
    fact: dict[str, Any]
    author: str
    source_layer: int
    layer: int
    source_metrics: dict[str, float]
    revision: str | None = None
    edit: str | None = None
    metrics: dict[str, float] | None = None
    steps: int | None = None
    seconds: float | None = None
    skipped: str | None = None       # why it was not trained (the new base already answers it)

    @property
    def delta(self) -> dict[str, float]:
        if self.metrics is None:
            return {}
        return {k: self.metrics[k] - self.source_metrics[k] for k in self.metrics if k in self.source_metrics}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta}


@dataclass
class ReplayResult:
    source: str                  # the source ledger's URL
    source_revision: str
    source_chain_hash: str
    source_model: str
    source_fingerprint: str
    database: str                # the new ledger's URL
    model: str
    fingerprint: str
    facts: list[ReplayedFact] = field(default_factory=list)
    wordings: int = 0            # wordings copied from the source's table
    seconds: float = 0.0

    def means(self, which: str) -> dict[str, float]:
        """Mean of each metric over the replayed (not skipped) facts, on the old base
        (`which="source"`) or the new one (`"new"`)."""
        done = [f for f in self.facts if f.metrics is not None]
        rows = [f.source_metrics if which == "source" else f.metrics for f in done]
        keys = [k for k in (rows[0] if rows else {}) if all(k in r for r in rows)]
        return {k: sum(r[k] for r in rows) / len(rows) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "facts"}
        return {**d, "replayed": sum(f.metrics is not None for f in self.facts),
                "skipped": sum(f.skipped is not None for f in self.facts),
                "means_source": self.means("source"), "means_new": self.means("new"),
                "facts": [f.to_dict() for f in self.facts]}


def mapped_layer(layer: int, n_source: int, n_new: int) -> int:
    """The block of the new model at the same relative depth as `layer` of the source's;
    the source's default layer maps to the new model's default."""
    from .baft import default_layer
    if layer == default_layer(n_source):
        return default_layer(n_new)
    return max(0, min(n_new - 1, round(layer * n_new / n_source)))


def default_target(spec: str) -> str:
    """Where a replay onto `spec` goes when no --db is given: `./NAME/.ledger/ledger.db`, NAME
    the model's name or its directory's name (as git clone makes a directory), so that
    commands run in ./NAME open it."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(spec.rstrip("/"))).strip(".-") or "replay"
    return "sqlite:///" + str(Path.cwd() / name / ".ledger" / "ledger.db")


def replay(src: Ledger, onto: str, db: str | None = None, *, rev: str = "HEAD",
           progress: Progress | None = None) -> ReplayResult:
    """Retrain the facts active at `rev` of the ledger `src` on the base model `onto` (a model
    name or a directory) into a new ledger at `db` (default: default_target). Refuses, writing
    nothing: the same base model, a target that holds a ledger or is the source, a missing model."""
    from .models import load_base, resolve_spec
    started = time.perf_counter()
    spec = resolve_spec(onto)
    settings = src.settings()
    if spec == settings["base_model"]:
        raise InputError(f"--onto-model {onto}: the ledger is already on {spec}: replay onto another model")
    info = src.show(rev)
    sources = src.active_edits(info.revision)
    with src.engine.connect() as conn:
        pairs = wording_table.all_pairs(conn)
        hashes = edits.content_hashes(conn, [edit_id_of(e.id) for e in sources])
    source_url = describe(src.engine)
    target = db or default_target(spec)
    sqlite_file = _sqlite_path(target)          # a malformed or unsupported URL: refused here
    if sqlite_file is not None:
        target = "sqlite:///" + str(sqlite_file)
        if target == source_url:
            raise InputError(f"--db {target}: that is the source ledger; replay into a new one")
        if sqlite_file.exists():
            raise StateError(f"{target} exists: refusing to overwrite it (remove it or give another --db)")
        parent = sqlite_file.parent
        if db is not None and not parent.is_dir() and not (parent.name == ".ledger" and parent.parent.is_dir()):
            # As init: only the ledger's own `.ledger/` is made; another missing directory is a typo.
            raise InputError(f"no directory {parent} for the ledger database: create it first")
    else:
        target_engine = make_engine(target)
        try:
            target = describe(target_engine)
            if target == source_url:
                raise InputError(f"--db {target}: that is the source ledger; replay into a new one")
            check_reachable(target_engine)
            if has_ledger_tables(target_engine):
                raise StateError(f"{target} already holds a ledger: refusing to overwrite it")
        finally:
            target_engine.dispose()
    base = load_base(spec, device=src.device)
    if base.fingerprint == settings["base_fingerprint"]:
        raise InputError(f"--onto-model {onto}: it is the ledger's own base model (fingerprint "
                         f"{base.fingerprint[:12]}): replay onto another model")
    result = ReplayResult(source=source_url, source_revision=info.revision, source_chain_hash=info.chain_hash,
                          source_model=settings["base_model"], source_fingerprint=settings["base_fingerprint"],
                          database=target, model=spec, fingerprint=base.fingerprint)
    provenance = {"source": source_url, "source_revision": info.revision, "source_chain_hash": info.chain_hash,
                  "source_model": settings["base_model"], "source_fingerprint": settings["base_fingerprint"]}
    build = _Build(target, sqlite_file, make_dirs=db is None)
    try:
        from .api import Ledger
        with Ledger.init(build.url, model=spec, author=src.author, device=src.device, wordings=False,
                         base=base) as new:
            result.wordings = _copy_wordings(new, pairs, provenance)
            _replay_facts(new, src.author, sources, hashes, int(settings["n_layers"]), provenance, result, progress)
        build.finish()
    except BaseException:
        build.abandon()
        raise
    result.seconds = time.perf_counter() - started
    return result


def _replay_facts(new: Ledger, replayer: str, sources: list[EditInfo], hashes: dict[int, str], n_source_layers: int,
                  provenance: dict[str, Any], result: ReplayResult, progress: Progress | None) -> None:
    from .baft import BaftConfig
    from .facts import fact_from_record
    n_new = len(new.base.layers)
    configs = [BaftConfig.from_dict(e.config, stored=True) for e in sources]
    total = sum(c.steps for c in configs)
    offset = 0
    for i, (e, stored_cfg) in enumerate(zip(sources, configs)):
        layer = mapped_layer(e.layer, n_source_layers, n_new)
        cfg = dataclasses.replace(stored_cfg, layer=layer)
        fact = fact_from_record(e.fact)
        new.handle.author = e.author          # the fact keeps its author
        message = f"replay {e.id} of {provenance['source']} {provenance['source_revision']}: " \
                  f"{fact.prompt} -> {fact.target_new}"
        try:
            added = new.add([fact], cfg, message=message, skip_known=True,
                            progress=_relabelled(progress, i, len(sources), offset, total))
        except InputError as err:      # e.g. a prompt longer than the new model's context
            raise InputError(f"{e.id} cannot be replayed onto {new.settings()['base_model']}: "
                             f"{str(err).removeprefix('record 0: ')}; nothing was written") from None
        offset += cfg.steps
        item = ReplayedFact(source_edit=e.id, fact=e.fact, author=e.author, source_layer=e.layer, layer=layer,
                            source_metrics=e.metrics)
        if added.skipped:
            item.skipped = added.skipped[0].reason
        else:
            [r] = added
            item.revision, item.edit, item.metrics = r.revision, r.edit, r.metrics
            item.steps, item.seconds = r.stats.get("steps"), r.stats.get("seconds")
        result.facts.append(item)
        rid = new.resolve(item.revision) if item.revision else None
        eid = edit_id_of(item.edit) if item.edit else None
        with write_transaction(new.engine) as conn:
            audit.record(conn, replayer, "replay", rid, eid, {
                **provenance, "source_edit": e.id, "source_content_hash": hashes.get(edit_id_of(e.id)), "author": e.author,
                "source_layer": e.layer, "layer": layer, "skipped": item.skipped})
    new.handle.author = replayer


def _copy_wordings(new: Ledger, pairs: list[tuple[str, str]], provenance: dict[str, Any]) -> int:
    """The source's wordings table, in its import order, into the new ledger."""
    with write_transaction(new.engine) as conn:
        added = wording_table.write(conn, pairs, "replay", blobs.now())
        audit.record(conn, new.author, "wordings", None, None, {
            "source": "replay", "from": provenance["source"], "pairs": len(pairs), "added": added})
        audit.record(conn, new.author, "replay", None, None, {**provenance, "wordings": added})
    return added


def _relabelled(progress: Progress | None, i: int, n: int, offset: int, total: int) -> Progress | None:
    """Progress of fact i's add, counted over the whole replay."""
    if progress is None:
        return None

    def report(ev: ProgressEvent) -> None:
        progress(dataclasses.replace(ev, label=f"fact {i + 1}/{n}", done=offset + ev.done, total=total,
                                     fact=i, facts_total=n))
    return report


def _sqlite_path(url: str) -> Path | None:
    """The absolute file of a SQLite URL; None for another database. Refuses a URL the ledger
    does not run on."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from .store.engine import check_supported
    try:
        u = make_url(url)
    except ArgumentError:
        raise InputError(f"--db {url!r} is not a database URL (e.g. sqlite:///path/ledger.db)") from None
    check_supported(u)
    if u.get_backend_name() != "sqlite":
        return None
    if not u.database or u.database == ":memory:" or u.query:
        raise InputError(f"--db {url}: replay needs a database file (sqlite:///PATH) or server")
    return Path(u.database).expanduser().resolve()


class _Build:
    """Where the new ledger is built, and making it appear whole or not at all."""

    def __init__(self, target: str, sqlite_file: Path | None, *, make_dirs: bool):
        self.target, self.file = target, sqlite_file
        self.made: list[Path] = []          # directories this replay created: removed if it fails
        if sqlite_file is None:
            self.url, self.tmp = target, None
            return
        self.made = [d for d in (sqlite_file.parent, *sqlite_file.parent.parents) if not d.exists()]
        if make_dirs:      # the default target, ./NAME/.ledger/, is ours to make
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        # Else Ledger.init makes a missing `.ledger/` and refuses any other missing directory.
        self.tmp = sqlite_file.with_name(f".{sqlite_file.name}.replay-{os.getpid()}")
        self.url = "sqlite:///" + str(self.tmp)

    def _tmp_files(self) -> list[Path]:
        return [Path(str(self.tmp) + suffix) for suffix in ("", "-wal", "-shm", "-journal", ".writer-lock")]

    def finish(self) -> None:
        if self.tmp is None:
            return
        import sqlite3
        # Every connection is closed; fold the write-ahead log into the file, which alone moves.
        conn = sqlite3.connect(self.tmp)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        try:
            os.link(self.tmp, self.file)      # fails if the target appeared meanwhile: never overwrites
        except FileExistsError:
            raise StateError(f"{self.target} appeared while replaying: refusing to overwrite it") from None
        for p in self._tmp_files():
            p.unlink(missing_ok=True)

    def abandon(self) -> None:
        if self.tmp is not None:
            for p in self._tmp_files():
                p.unlink(missing_ok=True)
            for d in self.made:              # deepest first
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            return
        from sqlalchemy import text

        from .store.schema import Base
        engine = make_engine(self.target)
        try:
            Base.metadata.drop_all(engine)
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        except Exception:   # noqa: BLE001 - the replay's own error is the one to report
            pass
        finally:
            engine.dispose()
