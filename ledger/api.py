"""`Ledger`: the typed public API, a facade over one function per command.

The commands live by concern: editing.py (add), history.py (log, show, diff, verify, audit),
refs.py (checkout, branch, tag, refs, reflog), evaluation.py (evaluate, evaluations),
maintenance.py (init, revert, rebase, gc, schema), wordings.py and export.py. Each takes the
`Handle` a Ledger holds: the engine, who acts, and the base model loaded once.
"""
from __future__ import annotations

import os
from datetime import date, datetime
from pathlib import Path
from typing import Any, Iterable

from typing import TYPE_CHECKING

from . import history, refs
from .baft import BaftConfig
from .errors import StateError
from .facts import Fact
from .progress import Progress, ProgressEvent
from .results import (AddResult, AddResults, DiffResult, EditInfo, EvalReport, LayerStats, Remeasure, RevertResult,
                      RevisionInfo)
from .handle import Handle, default_author, generate, library_versions
from .store.database import Database
from .store.engine import check_reachable, check_schema, database_url, has_ledger_tables, make_engine

# The commands that train, compose or export (editing, evaluation, maintenance, export, and
# the model modules under them) import torch and transformers: each method imports its
# module when called, so opening a ledger to read its history stays quick. SQLAlchemy comes
# with the engine, made on first use (store/database.py): the reading commands do without.
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from . import wordings as wd
    from .compose import Block, ComposedModel
    from .explain import Explanation
    from .models import BaseModel
    from .replay import ReplayResult

__all__ = ["Ledger", "AddResult", "AddResults", "DiffResult", "EditInfo", "EvalReport", "LayerStats", "Progress", "ProgressEvent",
           "Remeasure", "RevertResult", "RevisionInfo", "default_author", "library_versions"]


class Ledger:
    """An open ledger: a database plus, loaded on first use, its base model."""

    def __init__(self, db: Database | Engine, *, author: str | None = None, device: str = "cpu"):
        self.handle = Handle(db, author=author, device=device)

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def init(cls, db: str | None = None, *, model: str | None = None, author: str | None = None,
             device: str = "cpu", wordings: bool = True, base: BaseModel | None = None) -> "Ledger":
        """Create a ledger: migrate an empty database to head, record the base model's
        fingerprint, and write rev-1, the base model with no edits. With `wordings` (the
        default) the table of relation wordings starts with the tables that ship with the
        package (wordings.BUILTIN), so edits carry over to other wordings out of the box.
        `base`: the model `model` names, already loaded (replay loads it first to compare
        fingerprints), so it is not loaded twice."""
        from . import maintenance
        from .models import load_base, resolve_spec
        spec = resolve_spec(model)
        engine = make_engine(database_url(db), create_dir=True)
        check_reachable(engine)
        if has_ledger_tables(engine):
            raise StateError(f"{engine.url.render_as_string(hide_password=True)} already holds a ledger")
        if base is None or base.spec != spec:
            base = load_base(spec, device=device)   # before any write: a bad model writes nothing
        ledger = cls(engine, author=author, device=device)
        ledger.handle.base_model = base
        maintenance.create(engine, spec, base, ledger.author, wordings=wordings)
        return ledger

    @classmethod
    def open(cls, db: str | None = None, *, author: str | None = None, device: str = "cpu") -> "Ledger":
        """Open an existing ledger; refuse one whose schema is not at this version's head migration."""
        database = Database.open(database_url(db, search=True))
        try:
            check_schema(database)
        except BaseException:
            database.close()
            raise
        return cls(database, author=author, device=device)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the handle's state ---------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self.handle.engine

    @property
    def database_url(self) -> str:
        """The database's URL as a user can pass it again from anywhere: no password, and a
        SQLite file as an absolute path."""
        return self.handle.db.describe()

    @property
    def author(self) -> str:
        return self.handle.author

    @property
    def device(self) -> str:
        return self.handle.device

    @property
    def max_attempts(self) -> int:
        """How often an add retrains when another writer moved the branch meanwhile."""
        return self.handle.max_attempts

    @max_attempts.setter
    def max_attempts(self, n: int) -> None:
        self.handle.max_attempts = n

    @property
    def base(self) -> BaseModel:
        """The base model, loaded once and checked against the fingerprint stored at init."""
        return self.handle.base

    @property
    def _base(self) -> BaseModel | None:
        return self.handle.base_model

    @_base.setter
    def _base(self, base: BaseModel | None) -> None:
        self.handle.base_model = base

    @property
    def _composed(self) -> ComposedModel | None:
        return self.handle.composed

    def _blocks_of(self, ids: set[int]) -> list[Block]:
        return self.handle.blocks_of(ids)

    def _precheck(self, facts: list[Fact]) -> None:
        from . import editing
        editing.precheck(self.handle, facts)

    def settings(self) -> dict[str, str]:
        return self.handle.settings()

    # --- reading history -------------------------------------------------------------------------

    def resolve(self, rev: str = "HEAD") -> int:
        return history.resolve(self.handle, rev)

    def head(self) -> dict[str, Any]:
        return history.head(self.handle)

    def log(self, rev: str = "HEAD", limit: int = 20) -> list[RevisionInfo]:
        return history.log(self.handle, rev, limit)

    def show(self, rev: str = "HEAD") -> RevisionInfo:
        return history.show(self.handle, rev)

    def active_edits(self, rev: str = "HEAD", *, offset: int = 0, limit: int | None = None) -> list[EditInfo]:
        return history.active_edits(self.handle, rev, offset=offset, limit=limit)

    def edit(self, edit: str) -> EditInfo:
        return history.edit(self.handle, edit)

    def edit_tensors(self, edit: str) -> dict[str, dict[str, Any]]:
        """Each tensor of an edit: {"shape": [...], "norm": Frobenius norm}, without torch."""
        return history.edit_tensors(self.handle, edit)

    def evaluation_history(self, *, limit: int = 5000) -> list[EvalReport]:
        """Stored evaluations of every revision (means only), by revision: the newest `limit`."""
        return history.evaluation_history(self.handle, limit=limit)

    def verify(self) -> list[str]:
        return history.verify(self.handle)

    def diff(self, a: str, b: str) -> DiffResult:
        return history.diff(self.handle, a, b)

    def audit(self, *, rev: str | None = None, edit: str | None = None, actor: str | None = None,
              since: datetime | date | str | None = None, until: datetime | date | str | None = None,
              command: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The audit record, newest first. since/until: inclusive, as ISO-8601 text, datetimes
        or dates; a time without an offset is UTC; an `until` date includes that whole day."""
        return history.audit(self.handle, rev=rev, edit=edit, actor=actor, since=since, until=until,
                             command=command, limit=limit)

    # --- the model -------------------------------------------------------------------------------

    def model_at(self, rev: str | None = None) -> ComposedModel:
        return self.handle.model_at(rev)

    def generate(self, prompt: str, *, rev: str | None = None, max_new_tokens: int = 20) -> str:
        return generate(self.handle, prompt, rev=rev, max_new_tokens=max_new_tokens)

    def explain(self, prompt: str, *, rev: str = "HEAD", max_new_tokens: int = 0, top_k: int = 5) -> Explanation:
        """Which active edits fire on which token of the prompt (and of its greedy
        continuation), and the top-k next tokens at the revision and at the base model."""
        from .explain import explain
        return explain(self, prompt, rev=rev, max_new_tokens=max_new_tokens, top_k=top_k)

    # --- editing ---------------------------------------------------------------------------------

    def add(self, facts: list[Fact], config: BaftConfig | None = None, *, message: str | None = None,
            batch: int = 1, progress: Progress | None = None, skip_known: bool = False) -> AddResults:
        from . import editing
        return editing.add(self.handle, facts, config, message=message, batch=batch, progress=progress,
                           skip_known=skip_known)

    def replay(self, onto_model: str, db: str | None = None, *, rev: str = "HEAD",
               progress: Progress | None = None) -> ReplayResult:
        """The facts active at `rev` retrained, in order, on another base model into a new
        ledger at `db` (default ./NAME/.ledger/ledger.db, NAME the model's); each fact's metrics
        on the old base and the new (replay.py)."""
        from .replay import replay
        return replay(self, onto_model, db, rev=rev, progress=progress)

    def revert(self, target: str, *, message: str | None = None) -> RevertResult:
        from . import maintenance
        return maintenance.revert(self.handle, target, message=message)

    def stale_edits(self, rev: str = "HEAD") -> list[str]:
        from . import maintenance
        return maintenance.stale_edits(self.handle, rev)

    def rebase(self, *, progress: Progress | None = None) -> list[AddResult]:
        from . import maintenance
        return maintenance.rebase(self.handle, progress=progress)

    def gc(self) -> dict[str, int]:
        from . import maintenance
        return maintenance.gc(self.handle)

    # --- refs ------------------------------------------------------------------------------------

    def checkout(self, rev: str) -> dict[str, Any]:
        return refs.checkout(self.handle, rev)

    def branch(self, name: str, rev: str | None = None) -> dict[str, Any]:
        return refs.branch(self.handle, name, rev)

    def tag(self, name: str, rev: str) -> dict[str, Any]:
        return refs.tag(self.handle, name, rev)

    def refs(self) -> list[dict[str, Any]]:
        return refs.list_refs(self.handle)

    def reflog(self, ref: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return refs.reflog(self.handle, ref, limit)

    # --- evaluation, wordings, export ------------------------------------------------------------

    def evaluate(self, facts: Iterable[Fact], rev: str = "HEAD", *, fluency: bool = False,
                 generation: bool = True, label: str | None = None,
                 progress: Progress | None = None) -> EvalReport:
        from . import evaluation
        return evaluation.evaluate(self.handle, facts, rev, fluency=fluency, generation=generation,
                                   label=label, progress=progress)

    def evaluations(self, rev: str = "HEAD", *, per_fact: bool = True) -> list[EvalReport]:
        from . import evaluation
        return evaluation.evaluations(self.handle, rev, per_fact=per_fact)

    def import_wordings(self, path: str | Path, *, exclude: Iterable[tuple[str, str]] = ()) -> wd.ImportResult:
        from . import wordings as wd
        return wd.import_file(self.handle, path, exclude=exclude)

    def wordings(self, relation: str | None = None) -> dict[str, Any]:
        from . import wordings as wd
        return wd.listing(self.handle, relation)

    def export(self, rev: str, out: str | os.PathLike, *, force: bool = False,
               base_ref: bool = False) -> dict[str, Any]:
        from .export import export_revision
        return export_revision(self.handle, rev, out, force=force, base_ref=base_ref)
