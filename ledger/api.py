"""`Ledger`: the typed public API. The CLI is a thin skin over these methods.

Data flows one way: fact -> trainer -> edit record -> store -> composer -> model. An edit is
trained outside any database transaction (it takes seconds); the commit that follows is one
short serialised write transaction that first checks the branch did not move meanwhile, so a
revision is never committed on a parent it was not trained against.
"""
from __future__ import annotations

import getpass
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from sqlalchemy import Connection, Engine, select

from . import __version__
from . import revisions as revs
from .baft import BaftConfig, default_layer
from .baft.trainer import train_edit
from .compose import Block, ComposedModel
from .errors import InputError, StateError
from .evaluate import measure, score
from .facts import Fact
from .models import BaseModel, load_base, resolve_spec
from .store import blobs
from .store.engine import (check_reachable, check_schema, database_url, has_ledger_tables,
                           make_engine, upgrade, write_transaction)
from .store.schema import AuditEvent, Edit, Revision, Setting

Progress = Callable[[str, int, int], None]   # (label, done, total)


@dataclass
class EditInfo:
    id: str
    fact: dict[str, Any]
    method: str
    layer: int
    rank: int
    metrics: dict[str, float]
    stats: dict[str, Any]
    config: dict[str, Any]
    blob: str
    trained_on: str | None
    author: str
    created_at: str

    @classmethod
    def from_row(cls, e: Edit) -> "EditInfo":
        return cls(id=revs.edit_name(e.id), fact=json.loads(e.fact_json), method=e.method,
                   layer=e.layer, rank=e.rank, metrics=json.loads(e.metrics_json),
                   stats=json.loads(e.stats_json), config=json.loads(e.config_json),
                   blob=e.blob_sha256, trained_on=revs.rev_name(e.trained_on) if e.trained_on else None,
                   author=e.author, created_at=e.created_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RevisionInfo:
    revision: str
    parent: str | None
    operation: str
    author: str
    created_at: str
    message: str
    n_active: int
    chain_hash: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    edits: list[EditInfo] = field(default_factory=list)   # filled by show()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.edits:
            d.pop("edits")
        return d


@dataclass
class AddResult:
    revision: str
    edit: str
    metrics: dict[str, float]
    stats: dict[str, Any]
    superseded: list[str]
    fact: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_author() -> str:
    try:
        return os.environ.get("LEDGER_AUTHOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import safetensors
    import sqlalchemy
    import transformers
    return {"ledger": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "sqlalchemy": sqlalchemy.__version__,
            "python": platform.python_version()}


class Ledger:
    """An open ledger: a database plus, loaded on first use, its base model."""

    def __init__(self, engine: Engine, *, author: str | None = None, device: str = "cpu"):
        self.engine = engine
        self.author = author or default_author()
        self.device = device
        self._base: BaseModel | None = None
        self._composed: ComposedModel | None = None
        self._blocks: dict[int, Block] = {}

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def init(cls, db: str | None = None, *, model: str | None = None, author: str | None = None,
             device: str = "cpu") -> "Ledger":
        """Create a ledger: migrate an empty database to head, record the base model's
        fingerprint, and write rev-1, the base model with no edits."""
        url = database_url(db)
        spec = resolve_spec(model)
        engine = make_engine(url, create_dir=True)
        check_reachable(engine)
        if has_ledger_tables(engine):
            raise StateError(f"{engine.url.render_as_string(hide_password=True)} already holds a ledger")
        base = load_base(spec, device=device)   # before any write: a bad model writes nothing
        upgrade(engine)
        ledger = cls(engine, author=author, device=device)
        ledger._base = base
        with write_transaction(engine) as conn:
            conn.execute(Setting.__table__.insert(), [
                {"key": "base_model", "value": spec},
                {"key": "base_fingerprint", "value": base.fingerprint},
                {"key": "hidden_size", "value": str(base.hidden_size)},
                {"key": "n_layers", "value": str(len(base.layers))},
            ])
            root = revs.append(conn, parent_id=None, operation="init", author=ledger.author,
                               message=f"base model {os.path.basename(spec)}", changes=[])
            revs.set_ref(conn, revs.DEFAULT_BRANCH, "branch", root.id, ledger.author, "init")
            revs.set_head(conn, branch=revs.DEFAULT_BRANCH, rev_id=root.id, actor=ledger.author, reason="init")
            ledger._audit(conn, "init", root.id, None, {"model": spec, "fingerprint": base.fingerprint})
        return ledger

    @classmethod
    def open(cls, db: str | None = None, *, author: str | None = None, device: str = "cpu") -> "Ledger":
        """Open an existing ledger; refuse one whose schema is not at our head migration."""
        url = database_url(db)
        engine = make_engine(url)
        check_schema(engine)
        return cls(engine, author=author, device=device)

    def close(self) -> None:
        if self._composed:
            self._composed.clear()
        self.engine.dispose()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- settings and the base model -----------------------------------------------------------

    def settings(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(Setting.key, Setting.value)).all())

    @property
    def base(self) -> BaseModel:
        """The base model, loaded once and checked against the fingerprint stored at init."""
        if self._base is None:
            s = self.settings()
            base = load_base(s["base_model"], device=self.device)
            if base.fingerprint != s["base_fingerprint"]:
                raise StateError(f"the base model {s['base_model']} has fingerprint {base.fingerprint[:12]}, "
                                 f"this ledger was built on {s['base_fingerprint'][:12]}: refusing to compose")
            self._base = base
        return self._base

    # --- reading history ----------------------------------------------------------------------

    def resolve(self, rev: str = "HEAD") -> int:
        with self.engine.connect() as conn:
            return revs.resolve(conn, rev)

    def head(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            state = revs.head(conn)
        return {"revision": revs.rev_name(state.revision), "branch": state.branch,
                "detached": state.branch is None}

    def _info(self, conn: Connection, r: Revision, refs: dict[int, list[str]]) -> RevisionInfo:
        changes = revs.changes_of(conn, r.id)
        return RevisionInfo(
            revision=revs.rev_name(r.id), parent=revs.rev_name(r.parent_id) if r.parent_id else None,
            operation=r.operation, author=r.author, created_at=r.created_at, message=r.message,
            n_active=r.n_active, chain_hash=r.chain_hash,
            added=[revs.edit_name(e) for e, a in changes if a == "add"],
            removed=[revs.edit_name(e) for e, a in changes if a == "remove"],
            refs=refs.get(r.id, []))

    def _refs_by_revision(self, conn: Connection) -> dict[int, list[str]]:
        from .store.schema import Ref
        out: dict[int, list[str]] = {}
        state = revs.head(conn)
        for name, kind, rid in conn.execute(select(Ref.name, Ref.kind, Ref.revision_id).order_by(Ref.name)):
            if kind != "head" and rid is not None and name != state.branch:
                out.setdefault(rid, []).append(name)
        out.setdefault(state.revision, []).insert(0, "HEAD" + (f" -> {state.branch}" if state.branch else ""))
        return out

    def log(self, rev: str = "HEAD", limit: int = 20) -> list[RevisionInfo]:
        if limit < 1:
            raise InputError("--limit must be at least 1")
        with self.engine.connect() as conn:
            start = revs.resolve(conn, rev)
            refs = self._refs_by_revision(conn)
            return [self._info(conn, r, refs) for r in revs.ancestors(conn, start, limit)]

    def show(self, rev: str = "HEAD") -> RevisionInfo:
        """One revision with the full records of the edits its change set names."""
        with self.engine.connect() as conn:
            rid = revs.resolve(conn, rev)
            r = conn.execute(select(Revision).where(Revision.id == rid)).one()
            info = self._info(conn, r, self._refs_by_revision(conn))
            ids = [e for e, _ in revs.changes_of(conn, rid)]
            if ids:
                rows = conn.execute(select(Edit).where(Edit.id.in_(ids)).order_by(Edit.id)).all()
                info.edits = [EditInfo.from_row(e) for e in rows]
            return info

    def active_edits(self, rev: str = "HEAD") -> list[EditInfo]:
        with self.engine.connect() as conn:
            ids = sorted(revs.active_set(conn, revs.resolve(conn, rev)))
            rows = conn.execute(select(Edit).where(Edit.id.in_(ids)).order_by(Edit.id)).all() if ids else []
            return [EditInfo.from_row(e) for e in rows]

    def edit(self, edit: str) -> EditInfo:
        m = revs._EDIT_RE.match(edit or "")
        if not m:
            raise InputError(f"invalid edit name {edit!r}: expected edit-N")
        with self.engine.connect() as conn:
            row = conn.execute(select(Edit).where(Edit.id == int(m.group(1)))).one_or_none()
        if row is None:
            raise InputError(f"no edit {edit}")
        return EditInfo.from_row(row)

    def verify(self) -> list[str]:
        """Every problem found by recomputing all hashes; empty when the ledger is intact."""
        with self.engine.connect() as conn:
            return revs.verify(conn)

    # --- composing ----------------------------------------------------------------------------

    def _load_blocks(self, conn: Connection, ids: Iterable[int]) -> list[Block]:
        missing = [i for i in ids if i not in self._blocks]
        if missing:
            rows = conn.execute(select(Edit.id, Edit.layer, Edit.blob_sha256).where(Edit.id.in_(missing))).all()
            for eid, layer, address in rows:
                self._blocks[eid] = Block(eid, layer, blobs.get(conn, address))
        return [self._blocks[i] for i in sorted(ids)]

    def _compose_ids(self, ids: set[int], revision: int | None) -> ComposedModel:
        base = self.base
        if self._composed is None:
            self._composed = ComposedModel(base)
        with self.engine.connect() as conn:
            blocks = self._load_blocks(conn, ids)
        self._composed.compose(blocks, revision)
        return self._composed

    def model_at(self, rev: str | None = None) -> ComposedModel:
        """The composed model at a revision (default HEAD). Recomposes only when needed."""
        with self.engine.connect() as conn:
            rid = revs.resolve(conn, rev or "HEAD")
            if self._composed is not None and self._composed.revision == rid:
                return self._composed
            ids = revs.active_set(conn, rid)
        return self._compose_ids(ids, rid)

    def generate(self, prompt: str, *, rev: str | None = None, max_new_tokens: int = 20) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty")
        if not 1 <= max_new_tokens <= 4096:
            raise InputError("--max-new-tokens must be between 1 and 4096")
        return self.model_at(rev).generate(prompt, max_new_tokens=max_new_tokens)

    # --- writing ------------------------------------------------------------------------------

    def _audit(self, conn: Connection, command: str, revision: int | None, edit: int | None,
               details: dict[str, Any]) -> None:
        conn.execute(AuditEvent.__table__.insert().values(
            created_at=blobs.now(), actor=self.author, command=command, revision_id=revision,
            edit_id=edit, details_json=json.dumps(details, sort_keys=True)))

    def checkout(self, rev: str) -> dict[str, Any]:
        """Move HEAD: to a branch (attached) or to a revision (detached, unless it is the tip
        of the branch HEAD is on). Later adds commit on top of where HEAD points."""
        with write_transaction(self.engine) as conn:
            from .store.schema import Ref
            branch = conn.execute(select(Ref.name).where(Ref.name == rev, Ref.kind == "branch")).scalar_one_or_none()
            rid = revs.resolve(conn, rev)
            state = revs.head(conn)
            if branch is None and state.branch is not None and state.revision == rid:
                branch = state.branch
            revs.set_head(conn, branch=branch, rev_id=rid, actor=self.author, reason=f"checkout {rev}")
            self._audit(conn, "checkout", rid, None, {"target": rev, "branch": branch})
        return self.head()

    def _facts_of(self, conn: Connection, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(ids)
        if not ids:
            return {}
        return {eid: json.loads(fj) for eid, fj in
                conn.execute(select(Edit.id, Edit.fact_json).where(Edit.id.in_(ids)))}

    def add(self, facts: list[Fact], config: BaftConfig | None = None, *, message: str | None = None,
            progress: Progress | None = None) -> list[AddResult]:
        """Train, measure and commit each fact as its own revision on top of HEAD."""
        if not facts:
            raise InputError("no facts to add")
        cfg = config or BaftConfig()
        base = self.base
        n_layers = len(base.layers)
        layer = cfg.layer if cfg.layer is not None else default_layer(n_layers)
        if layer >= n_layers:
            raise InputError(f"--layer {layer} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
        self._check_lengths(facts)
        results = []
        for i, fact in enumerate(facts):
            results.append(self._add_one(fact, cfg, layer, message, progress, i, len(facts)))
        return results

    def _check_lengths(self, facts: list[Fact]) -> None:
        tok = self.base.tokenizer
        limit = getattr(self.base.model.config, "max_position_embeddings", None) or \
            getattr(self.base.model.config, "n_positions", None) or 2048
        for i, f in enumerate(facts):
            longest = max([f.prompt, *f.rephrase_prompts, *(lp.prompt for lp in f.locality_prompts)], key=len)
            n = len(tok(longest + " " + f.target_new)["input_ids"])
            if n + 8 > limit:
                raise InputError(f"record {i}: a prompt is {n} tokens, longer than the model's context ({limit})")

    def _add_one(self, fact: Fact, cfg: BaftConfig, layer: int, message: str | None,
                 progress: Progress | None, index: int, total: int) -> AddResult:
        with self.engine.connect() as conn:
            state = revs.head(conn)
            parent_active = revs.active_set(conn, state.revision)
            superseded = self._superseded(conn, fact, parent_active)
            train_on = parent_active - set(superseded)
            retention = [(f["prompt"], f["target_new"]) for f in self._facts_of(conn, train_on).values()]
        composed = self._compose_ids(train_on, state.revision if not superseded else None)
        model, tok = composed.model, composed.tokenizer
        before = measure(model, tok, fact)
        label = f"edit {index + 1}/{total}"
        trained = train_edit(model, tok, composed.sites, self.base.layers, fact, cfg, layer=layer,
                             retention=retention,
                             progress=(lambda d, t: progress(label, d, t)) if progress else None)
        new_block = Block(2 ** 62, layer, trained.tensors)  # sorts last, as its id will
        composed.compose(self._load_blocks_cached(train_on) + [new_block], None)
        metrics = score(measure(model, tok, fact), before)
        data = blobs.encode(trained.tensors)

        with write_transaction(self.engine) as conn:
            now_state = revs.head(conn)
            if now_state.revision != state.revision:
                raise StateError(f"the branch moved from {revs.rev_name(state.revision)} to "
                                 f"{revs.rev_name(now_state.revision)} while training: nothing was written, "
                                 "run the add again")
            address = blobs.put(conn, data)
            edit = Edit(fact_json=json.dumps(fact.to_dict(), sort_keys=True, ensure_ascii=False),
                        subject=fact.subject, relation=fact.relation, method=cfg.method, layer=layer,
                        rank=cfg.rank, config_json=json.dumps({**cfg.to_dict(), "layer": layer}, sort_keys=True),
                        blob_sha256=address, metrics_json=json.dumps(metrics, sort_keys=True),
                        stats_json=json.dumps(trained.stats, sort_keys=True),
                        versions_json=json.dumps(library_versions(), sort_keys=True),
                        trained_on=state.revision, author=self.author, created_at=blobs.now(),
                        content_hash="")
            edit_id = conn.execute(Edit.__table__.insert().values(
                {c.name: getattr(edit, c.name) for c in Edit.__table__.columns if c.name != "id"})
            ).inserted_primary_key[0]
            edit.id = edit_id
            conn.execute(Edit.__table__.update().where(Edit.id == edit_id)
                         .values(content_hash=revs.edit_hash(edit)))
            changes = [(e, "remove") for e in superseded] + [(edit_id, "add")]
            msg = message or f"add: {fact.prompt} -> {fact.target_new}"
            rev = revs.append(conn, parent_id=state.revision, operation="add", author=self.author,
                              message=msg, changes=changes)
            revs.advance_head(conn, rev.id, self.author, f"add {revs.edit_name(edit_id)}")
            self._audit(conn, "add", rev.id, edit_id, {"fact": fact.prompt, "target_new": fact.target_new,
                                                       "superseded": [revs.edit_name(e) for e in superseded]})
        self._blocks[edit_id] = Block(edit_id, layer, blobs.decode(data, address))
        composed.compose(self._load_blocks_cached(train_on | {edit_id}), rev.id)
        return AddResult(revision=revs.rev_name(rev.id), edit=revs.edit_name(edit_id), metrics=metrics,
                         stats=trained.stats, superseded=[revs.edit_name(e) for e in superseded],
                         fact=fact.to_dict())

    def _load_blocks_cached(self, ids: set[int]) -> list[Block]:
        with self.engine.connect() as conn:
            return self._load_blocks(conn, ids)

    def _superseded(self, conn: Connection, fact: Fact, active: set[int]) -> list[int]:
        """Active edits stating the same subject and relation: the new fact replaces them."""
        if not fact.subject or fact.relation is None or not active:
            return []
        rows = conn.execute(select(Edit.id).where(Edit.subject == fact.subject,
                                                  Edit.relation == fact.relation)).scalars()
        return sorted(e for e in rows if e in active)
