"""`Ledger`: the typed public API. The CLI is a thin skin over these methods.

Data flows one way: fact -> trainer -> edit record -> store -> composer -> model. An edit is
trained outside any database transaction (it takes seconds); the commit that follows is one
short serialised write transaction that first checks the branch did not move meanwhile, so a
revision is never committed on a parent it was not trained against.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from sqlalchemy import Connection, Engine, func, select

from . import __version__
from . import revisions as revs
from . import wordings as wd
from .baft import BaftConfig, default_layer
from .baft.trainer import train_edits
from .compose import UNCOMMITTED, Block, ComposedModel
from .errors import BranchMoved, InputError, StateError
from .evaluate import FLUENCY_MAX_LENGTH, fluency_prompts, mean_metrics, measure, measure_many, n_sequences, score
from .evaluate import fluency as fluency_scores
from .evaluate import GEN_LOCALITY_TOKENS, GEN_NEW_TOKENS, generate_many, generation_metrics, n_generations
from .facts import Fact
from .models import BaseModel, load_base, resolve_spec
from .store import blobs
from .store.engine import (check_reachable, check_schema, database_url, has_ledger_tables,
                           make_engine, upgrade, write_transaction, writer_lock)
from .store.schema import AuditEvent, Edit, Evaluation, Measurement, Ref, RefLog, Revision, Setting

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
    evaluations: list["EvalReport"] | None = None         # filled by show(), without per-fact rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.edits:
            d.pop("edits")
        if self.evaluations is None:
            d.pop("evaluations")
        else:
            d["evaluations"] = [e.to_dict(per_fact=False) for e in self.evaluations]
        return d


@dataclass
class Remeasure:
    edit: str
    before: dict[str, float]
    after: dict[str, float]

    @property
    def delta(self) -> dict[str, float]:
        return {k: self.after[k] - self.before[k] for k in self.after if k in self.before}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta}


@dataclass
class RevertResult:
    revision: str
    reverted: str
    removed: list[str]
    restored: list[str]
    remeasured: list[Remeasure]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "remeasured": [r.to_dict() for r in self.remeasured]}


@dataclass
class LayerStats:
    blocks: int
    total_rank: int


@dataclass
class DiffResult:
    a: str
    b: str
    added: list[dict[str, Any]]        # edits active in b and not in a: id, prompt, target_new
    removed: list[dict[str, Any]]      # edits active in a and not in b
    layers: dict[str, dict[str, Any]]  # layer -> {"a": LayerStats, "b": LayerStats, "norm_added", "norm_removed"}
    metric_deltas: dict[str, dict[str, float]]  # edit in both -> metric -> (at b) - (at a)
    # per dataset evaluated at both: the latest evaluation at a and at b, and mean deltas (b - a)
    eval_deltas: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def eval_name(eval_id: int) -> str:
    return f"eval-{eval_id}"


def dataset_sha256(facts: list[Fact]) -> str:
    """sha256 of the canonical JSON of a fact list (order matters): the same facts evaluated
    at two revisions compare by this."""
    canon = json.dumps([f.to_dict() for f in facts], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


@dataclass
class EvalReport:
    """Metrics of a fact set at one revision (DESIGN.md section 7); locality against the
    unedited base model. `per_fact` follows the order of the facts given."""
    revision: str
    n: int
    means: dict[str, float]
    per_fact: list[dict[str, float]]
    dataset_sha256: str
    label: str | None
    options: dict[str, Any]
    author: str
    created_at: str
    id: str | None = None          # eval-N, once stored
    seconds: float | None = None   # wall time of the run; not stored

    @classmethod
    def from_row(cls, e: Evaluation, *, per_fact: bool = True) -> "EvalReport":
        return cls(revision=revs.rev_name(e.revision_id), n=e.n, means=json.loads(e.means_json),
                   per_fact=json.loads(e.results_json) if per_fact else [], dataset_sha256=e.dataset_sha256,
                   label=e.label, options=json.loads(e.options_json), author=e.author,
                   created_at=e.created_at, id=eval_name(e.id))

    def to_dict(self, per_fact: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not per_fact:
            d.pop("per_fact")
        return d


def tensor_norm(tensors: dict[str, torch.Tensor]) -> float:
    """Frobenius norm of all of an edit's tensors together, as reported by diff."""
    return math.sqrt(math.fsum(float(v.double().pow(2).sum()) for v in tensors.values()))


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
        # How often an add retrains when another writer moved the branch meanwhile.
        self.max_attempts = 20

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def init(cls, db: str | None = None, *, model: str | None = None, author: str | None = None,
             device: str = "cpu", wordings: bool = True) -> "Ledger":
        """Create a ledger: migrate an empty database to head, record the base model's
        fingerprint, and write rev-1, the base model with no edits. With `wordings` (the
        default) the table of relation wordings starts with the tables that ship with the
        package (wordings.BUILTIN), so edits carry over to other wordings out of the box."""
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
            if wordings:
                pairs = wd.builtin_pairs()
                added = wd.insert(conn, pairs, "builtin", blobs.now())
                ledger._audit(conn, "wordings", None, None, {"source": "builtin", "files": list(wd.BUILTIN),
                                                             "pairs": len(pairs), "added": added})
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
                rows = conn.execute(select(Edit).where(revs.among(Edit.id, ids, conn)).order_by(Edit.id)).all()
                info.edits = [EditInfo.from_row(e) for e in rows]
            info.evaluations = self._evaluations(conn, rid, per_fact=False)
            return info

    def active_edits(self, rev: str = "HEAD") -> list[EditInfo]:
        with self.engine.connect() as conn:
            ids = sorted(revs.active_set(conn, revs.resolve(conn, rev)))
            rows = conn.execute(select(Edit).where(revs.among(Edit.id, ids, conn)).order_by(Edit.id)).all() if ids else []
            return [EditInfo.from_row(e) for e in rows]

    def edit(self, edit: str) -> EditInfo:
        eid = revs.edit_id_of(edit)
        if eid is None:
            raise InputError(f"invalid edit name {edit!r}: expected edit-N")
        with self.engine.connect() as conn:
            row = conn.execute(select(Edit).where(Edit.id == eid)).one_or_none()
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
            # Two or three queries whatever the number of edits, not one per blob.
            rows = conn.execute(select(Edit.id, Edit.layer, Edit.blob_sha256)
                                .where(revs.among(Edit.id, missing, conn))).all()
            tensors = blobs.get_many(conn, [address for _, _, address in rows])
            for eid, layer, address in rows:
                self._blocks[eid] = Block(eid, layer, tensors[address])
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
                conn.execute(select(Edit.id, Edit.fact_json).where(revs.among(Edit.id, ids, conn)))}

    def add(self, facts: list[Fact], config: BaftConfig | None = None, *, message: str | None = None,
            batch: int = 1, progress: Progress | None = None) -> list[AddResult]:
        """Train, measure and commit the facts on top of HEAD: each fact as its own revision, or,
        with batch=K, K facts at a time trained together (one block per fact, one optimisation)
        and committed as one revision."""
        if not facts:
            raise InputError("no facts to add")
        if batch < 1:
            raise InputError(f"--batch must be at least 1, got {batch}")
        cfg = config or BaftConfig()
        base = self.base
        n_layers = len(base.layers)
        layer = cfg.layer if cfg.layer is not None else default_layer(n_layers)
        if layer >= n_layers:
            raise InputError(f"--layer {layer} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
        if batch > 1:
            seen: dict[tuple, int] = {}
            for i, f in enumerate(facts):
                key = (f.subject, f.relation) if f.relation else (None, f.prompt)
                if key in seen and seen[key] // batch == i // batch:
                    raise InputError(f"records {seen[key]} and {i} state the same thing and would land in "
                                     "one batch: add them in separate commands")
                seen[key] = i
        self._precheck(facts)
        results = []
        for start in range(0, len(facts), batch):
            group = facts[start: start + batch]
            with writer_lock(self.engine):   # one commit at a time per ledger; readers go on
                results += self._add_group(group, cfg, layer, message, progress, start, len(facts))
        return results

    def _precheck(self, facts: list[Fact]) -> None:
        """Refuse a file before anything is trained: a prompt longer than the model's context,
        or a target the model at HEAD already gives (nothing to edit)."""
        self._check_lengths(facts)
        head = self.model_at()
        known = measure_many(head.model, head.tokenizer, facts, kinds={"rel"})   # one batched pass
        for i, (f, m) in enumerate(zip(facts, known)):
            if m.accuracy["rel"][0] == 1.0:
                raise InputError(f"record {i}: the model at {revs.rev_name(head.revision)} already answers "
                                 f"{f.target_new!r} to {f.prompt!r}: nothing to edit")

    def _check_lengths(self, facts: list[Fact]) -> None:
        """Refuse a prompt (with its target) longer than the model's context."""
        tok = self.base.tokenizer
        limit = getattr(self.base.model.config, "max_position_embeddings", None) or \
            getattr(self.base.model.config, "n_positions", None) or 2048
        for i, f in enumerate(facts):
            longest = max([f.prompt, *f.rephrase_prompts, *(lp.prompt for lp in f.locality_prompts),
                           *(pp.prompt + " " + pp.answer for pp in f.portability_prompts)], key=len)
            n = len(tok(longest + " " + f.target_new)["input_ids"])
            if n + 8 > limit:
                raise InputError(f"record {i}: a prompt is {n} tokens, longer than the model's context ({limit})")

    def _add_group(self, facts: list[Fact], cfg: BaftConfig, layer: int, message: str | None,
                   progress: Progress | None, index: int, total: int) -> list[AddResult]:
        label = f"edit {index + 1}/{total}" if len(facts) == 1 else \
            f"edits {index + 1}-{index + len(facts)}/{total}"
        if message is None:
            message = (f"add: {facts[0].prompt} -> {facts[0].target_new}" if len(facts) == 1
                       else f"add: {len(facts)} facts in one batch ({facts[0].prompt} -> {facts[0].target_new}, ...)")
        rng = random.Random()
        for attempt in range(self.max_attempts):
            with self.engine.connect() as conn:
                state = revs.head(conn)
                parent_active = revs.active_set(conn, state.revision)
                superseded = sorted({e for f in facts for e in self._superseded(conn, f, parent_active)})
            try:
                return self._train_and_commit(
                    facts, cfg, layer, state.revision, parent_active - set(superseded), superseded, "add",
                    message, (lambda d, t: progress(label, d, t)) if progress else None)
            except BranchMoved:
                # Another writer committed first. An edit must be trained in the composition
                # it is committed on, so retrain on the new head (after a short random wait
                # so that racing writers spread out).
                if attempt + 1 == self.max_attempts:
                    raise
                time.sleep(rng.uniform(0, 0.05 * (attempt + 1)))
        raise AssertionError("unreachable")

    def _train_and_commit(self, facts: list[Fact], cfg: BaftConfig, layer: int, parent: int, train_on: set[int],
                          remove: list[int], operation: str, message: str,
                          progress: Callable[[int, int], None] | None) -> list[AddResult]:
        """Train one block per fact (together) with the blocks of `train_on` active and frozen,
        measure each, and commit one revision on `parent` that removes `remove` and adds them."""
        with self.engine.connect() as conn:
            retention = [(f["prompt"], f["target_new"]) for f in self._facts_of(conn, train_on).values()]
            extra = self._wording_prompts(conn, facts, cfg)
        others = [wd.other_relations(f, ws, cfg.other_relations, cfg.seed) for f, ws in zip(facts, extra)]
        composed = self._compose_ids(train_on, parent if not remove else None)
        model, tok = composed.model, composed.tokenizer
        before = measure_many(model, tok, facts)
        trained = train_edits(model, tok, composed.sites, self.base.layers, facts, cfg, layer=layer,
                              retention=retention, extra_prompts=extra, other_prompts=others, progress=progress)
        for t, prompts, kept in zip(trained, extra, others):
            t.stats["wording_prompts"] = prompts      # what this edit was trained on, for the audit
            t.stats["other_relation_prompts"] = kept
        # Measured as they will compose: the uncommitted blocks sort last, in order, as their
        # ids will.
        composed.compose(self._blocks_of(train_on) + [Block(UNCOMMITTED + k, layer, t.tensors)
                                                      for k, t in enumerate(trained)], None)
        metrics = [score(after, b) for after, b in zip(measure_many(model, tok, facts), before)]
        data = [blobs.encode(t.tensors) for t in trained]

        with write_transaction(self.engine) as conn:
            now_state = revs.head(conn)
            if now_state.revision != parent:
                raise BranchMoved(f"the branch moved from {revs.rev_name(parent)} to "
                                  f"{revs.rev_name(now_state.revision)} while training: nothing was written, "
                                  "run the command again")
            edit_ids = []
            for fact, t, m, blob in zip(facts, trained, metrics, data):
                address = blobs.put(conn, blob)
                edit = Edit(fact_json=json.dumps(fact.to_dict(), sort_keys=True, ensure_ascii=False),
                            subject=fact.subject, relation=fact.relation, method=cfg.method, layer=layer,
                            rank=cfg.rank, config_json=json.dumps({**cfg.to_dict(), "layer": layer}, sort_keys=True),
                            blob_sha256=address, metrics_json=json.dumps(m, sort_keys=True),
                            stats_json=json.dumps({**t.stats, "tensor_norm": tensor_norm(t.tensors)},
                                                  sort_keys=True),
                            versions_json=json.dumps(library_versions(), sort_keys=True),
                            trained_on=parent, author=self.author, created_at=blobs.now(), content_hash="")
                edit_id = conn.execute(Edit.__table__.insert().values(
                    {c.name: getattr(edit, c.name) for c in Edit.__table__.columns if c.name != "id"})
                ).inserted_primary_key[0]
                edit.id = edit_id
                conn.execute(Edit.__table__.update().where(Edit.id == edit_id)
                             .values(content_hash=revs.edit_hash(edit)))
                edit_ids.append(edit_id)
            changes = [(e, "remove") for e in remove] + [(e, "add") for e in edit_ids]
            rev = revs.append(conn, parent_id=parent, operation=operation, author=self.author,
                              message=message, changes=changes)
            what = revs.edit_name(edit_ids[0]) if len(edit_ids) == 1 else \
                f"{revs.edit_name(edit_ids[0])}..{revs.edit_name(edit_ids[-1])}"
            revs.advance_head(conn, rev.id, self.author, f"{operation} {what}")
            for fact, edit_id in zip(facts, edit_ids):
                self._audit(conn, operation, rev.id, edit_id, {
                    "fact": fact.prompt, "target_new": fact.target_new,
                    "removed": [revs.edit_name(e) for e in remove]})
        for edit_id, t in zip(edit_ids, trained):
            self._blocks[edit_id] = Block(edit_id, layer, t.tensors)   # what the blob holds
        composed.compose(self._blocks_of(train_on | set(edit_ids)), rev.id)
        return [AddResult(revision=revs.rev_name(rev.id), edit=revs.edit_name(e), metrics=m, stats=t.stats,
                          superseded=[revs.edit_name(x) for x in remove], fact=f.to_dict())
                for e, m, t, f in zip(edit_ids, metrics, trained, facts)]

    @staticmethod
    def _wording_prompts(conn: Connection, facts: list[Fact], cfg: BaftConfig) -> list[list[str]]:
        """Per fact, up to cfg.wordings other wordings of its relation, filled with its subject."""
        if cfg.wordings <= 0:
            return [[] for _ in facts]
        relations = [wd.template_of(f.prompt, f.subject) for f in facts]
        table = wd.of_relations(conn, [r for r in relations if r])
        out = []
        for f, r in zip(facts, relations):
            own = table.get(r, []) if r else []
            # Related relations lend wordings only where the fact's own are too few; then the
            # relation nearest by content words (a hand-written prompt rarely is a key).
            lent = wd.related(conn, r, own, cfg.wordings_related) if r and len(own) < cfg.wordings else []
            if r and cfg.wordings_nearest and len(own) + len(lent) < cfg.wordings:
                lent += [w for w in wd.nearest(conn, r) if w not in own and w not in lent]
            out.append(wd.training_prompts(f, own, cfg.wordings, cfg.seed, borrowed=lent))
        return out

    # --- relation wordings -----------------------------------------------------------------------

    def import_wordings(self, path: str | Path, *, exclude: Iterable[tuple[str, str]] = ()) -> wd.ImportResult:
        """Add the (relation, wording) pairs of a wordings or fact file to the ledger's table
        (pairs it holds already are kept once). `exclude` leaves pairs out, e.g. the wordings a
        benchmark holds out. The file is read whole before anything is written."""
        pairs, n_records, skipped = wd.read_pairs(path)
        drop = set(exclude)
        kept = [p for p in pairs if p not in drop]
        source = os.path.basename(str(path))
        with write_transaction(self.engine) as conn:
            added = wd.insert(conn, kept, source, blobs.now())
            self._audit(conn, "wordings", None, None, {"source": source, "pairs": len(kept), "added": added})
        return wd.ImportResult(source=source, records=n_records, pairs=len(pairs), added=added,
                               excluded=len(pairs) - len(kept), skipped=len(skipped),
                               skipped_examples=skipped[:5])

    def wordings(self, relation: str | None = None) -> dict[str, Any]:
        """With a relation (a template with "{}" for the subject, as `import_wordings` stores
        it): its wordings. Without: every relation and how many wordings it has."""
        with self.engine.connect() as conn:
            if relation is not None:
                return {"relation": relation, "wordings": wd.of_relations(conn, [relation])[relation]}
            rows = wd.summary(conn)
        return {"relations": len(rows), "wordings": sum(k for _, k in rows),
                "by_relation": [{"relation": r, "wordings": k} for r, k in rows]}

    # --- history: revert, rebase, diff -----------------------------------------------------------

    def _remeasure(self, active: set[int], edit_ids: list[int], revision: int | None) -> dict[int, dict[str, float]]:
        """Metrics of each edit in the composition `active`, locality against the same
        composition without that edit (as at creation)."""
        from .facts import fact_from_record
        with self.engine.connect() as conn:
            facts = self._facts_of(conn, edit_ids)
        out = {}
        for eid in edit_ids:
            fact = fact_from_record(facts[eid])
            composed = self._compose_ids(active - {eid}, None)
            before = measure(composed.model, composed.tokenizer, fact)
            composed = self._compose_ids(active, revision)
            out[eid] = score(measure(composed.model, composed.tokenizer, fact), before)
        return out

    def _dependents(self, conn: Connection, active: set[int], changed: set[int]) -> list[int]:
        """Active edits that were trained with any of `changed` in a different state than now."""
        deps = []
        for eid, trained_on in conn.execute(select(Edit.id, Edit.trained_on).where(revs.among(Edit.id, active, conn))):
            if trained_on is None:
                continue
            then = revs.active_set(conn, trained_on)
            if any((c in then) != (c in active) for c in changed):
                deps.append(eid)
        return sorted(deps)

    def revert(self, target: str, *, message: str | None = None) -> RevertResult:
        """A new revision on HEAD undoing `target`: a revision (its change set, inverted) or
        an edit (removed). Edits trained with the reverted state are re-measured."""
        with writer_lock(self.engine):
            return self._revert(target, message)

    def _revert(self, target: str, message: str | None) -> RevertResult:
        with self.engine.connect() as conn:
            state = revs.head(conn)
            active = revs.active_set(conn, state.revision)
            eid = revs.edit_id_of(target)
            if eid is not None:
                if eid not in active:
                    raise InputError(f"{target} is not active at {revs.rev_name(state.revision)}: nothing to revert")
                changes = [(eid, "remove")]
            else:
                rid = revs.resolve(conn, target)
                changes = []
                for e, action in revs.changes_of(conn, rid):
                    if action == "add" and e in active:
                        changes.append((e, "remove"))
                    elif action == "remove" and e not in active:
                        changes.append((e, "add"))
                if not changes:
                    raise InputError(f"{target} changed nothing that is still in effect at "
                                     f"{revs.rev_name(state.revision)}: nothing to revert")
            new_active = set(active)
            for e, a in changes:
                (new_active.add if a == "add" else new_active.discard)(e)
            deps = self._dependents(conn, new_active, {e for e, _ in changes})
            old_metrics = {e: json.loads(m) for e, m in
                           conn.execute(select(Edit.id, Edit.metrics_json).where(Edit.id.in_(deps)))} if deps else {}
        after = self._remeasure(new_active, deps, None)
        with write_transaction(self.engine) as conn:
            if revs.head(conn).revision != state.revision:
                raise StateError("the branch moved while re-measuring: nothing was written, run the revert again")
            msg = message or f"revert {target}"
            rev = revs.append(conn, parent_id=state.revision, operation="revert", author=self.author,
                              message=msg, changes=changes)
            if after:
                conn.execute(Measurement.__table__.insert(), [
                    {"revision_id": rev.id, "edit_id": e, "kind": "remeasure",
                     "metrics_json": json.dumps(m, sort_keys=True), "created_at": blobs.now()}
                    for e, m in after.items()])
            revs.advance_head(conn, rev.id, self.author, f"revert {target}")
            self._audit(conn, "revert", rev.id, eid, {"target": target, "changes": [
                [revs.edit_name(e), a] for e, a in changes], "remeasured": [revs.edit_name(e) for e in deps]})
        return RevertResult(
            revision=revs.rev_name(rev.id), reverted=target,
            removed=[revs.edit_name(e) for e, a in changes if a == "remove"],
            restored=[revs.edit_name(e) for e, a in changes if a == "add"],
            remeasured=[Remeasure(revs.edit_name(e), old_metrics[e], after[e]) for e in deps])

    def stale_edits(self, rev: str = "HEAD") -> list[str]:
        """Active edits whose training composition has since changed (revert, supersede)."""
        with self.engine.connect() as conn:
            active = revs.active_set(conn, revs.resolve(conn, rev))
            return [revs.edit_name(e) for e in self._stale(conn, active)]

    def _stale(self, conn: Connection, active: set[int]) -> list[int]:
        """Edits whose training composition holds an edit no longer active. A rebased edit
        counts as its replacement, so rebasing one edit does not make the others stale."""
        from .store.schema import RevisionChange
        replaced: dict[int, int] = {}
        by_rev: dict[int, dict[str, int]] = {}
        for rid, eid, action in conn.execute(
                select(RevisionChange.revision_id, RevisionChange.edit_id, RevisionChange.action)
                .join(Revision, Revision.id == RevisionChange.revision_id).where(Revision.operation == "rebase")):
            by_rev.setdefault(rid, {})[action] = eid
        for ch in by_rev.values():
            if "add" in ch and "remove" in ch:
                replaced[ch["remove"]] = ch["add"]

        def current(e: int) -> int:
            while e in replaced:
                e = replaced[e]
            return e
        out = []
        rows = conn.execute(select(Edit.id, Edit.trained_on).where(revs.among(Edit.id, active, conn))).all() if active else []
        for eid, trained_on in rows:
            if trained_on is not None and not {current(e) for e in revs.active_set(conn, trained_on)} <= active:
                out.append(eid)
        return sorted(out)

    def rebase(self, *, progress: Progress | None = None) -> list[AddResult]:
        """Retrain every stale edit at HEAD against the current composition, each as a new
        `rebase` revision that replaces the old edit, keeping its fact and hyperparameters."""
        with self.engine.connect() as conn:
            active = revs.active_set(conn, revs.head(conn).revision)
            stale = self._stale(conn, active)
            rows = {e: (json.loads(f), json.loads(c), layer) for e, f, c, layer in conn.execute(
                select(Edit.id, Edit.fact_json, Edit.config_json, Edit.layer)
                .where(revs.among(Edit.id, stale, conn)))} if stale else {}
        results = []
        for i, eid in enumerate(stale):
            label = f"edit {i + 1}/{len(stale)}"
            with writer_lock(self.engine):
                results.append(self._rebase_one(eid, rows[eid], label, progress))
        return results

    def _rebase_one(self, eid: int, row: tuple, label: str, progress: Progress | None) -> AddResult:
        from .facts import fact_from_record
        fact_d, cfg_d, layer = row
        with self.engine.connect() as conn:
            state = revs.head(conn)
            now_active = revs.active_set(conn, state.revision)
        [result] = self._train_and_commit(
            [fact_from_record(fact_d)], BaftConfig.from_dict(cfg_d, stored=True), layer, state.revision,
            now_active - {eid}, [eid], "rebase", f"rebase {revs.edit_name(eid)}",
            (lambda d, t: progress(label, d, t)) if progress else None)
        return result

    def diff(self, a: str, b: str) -> DiffResult:
        """What changes from revision a to revision b: edits, per-layer blocks and rank, the
        norm of the added and removed tensors, and metric deltas of edits present in both."""
        with self.engine.connect() as conn:
            ra, rb = revs.resolve(conn, a), revs.resolve(conn, b)
            sa, sb = revs.active_set(conn, ra), revs.active_set(conn, rb)
            added, removed = sorted(sb - sa), sorted(sa - sb)
            changed = added + removed
            info = {e: (layer, rank, json.loads(f), blob, json.loads(st).get("tensor_norm"))
                    for e, layer, rank, f, blob, st in conn.execute(
                        select(Edit.id, Edit.layer, Edit.rank, Edit.fact_json, Edit.blob_sha256, Edit.stats_json)
                        .where(revs.among(Edit.id, changed, conn)))} if changed else {}
            layers: dict[str, dict[str, Any]] = {}
            for side, ids in (("a", sa), ("b", sb)):
                for layer, n, total in conn.execute(
                        select(Edit.layer, func.count(), func.sum(Edit.rank)).where(revs.among(Edit.id, ids, conn))
                        .group_by(Edit.layer)) if ids else []:
                    entry = layers.setdefault(str(layer), {"a": asdict(LayerStats(0, 0)), "b": asdict(LayerStats(0, 0)),
                                                           "norm_added": 0.0, "norm_removed": 0.0})
                    entry[side] = asdict(LayerStats(int(n), int(total or 0)))
            sums: dict[tuple[str, str], list[float]] = {}
            for e in changed:
                layer, _, _, blob, norm = info[e]
                if norm is None:   # recorded at creation; older records: read the tensors
                    norm = tensor_norm(blobs.get(conn, blob))
                sums.setdefault((str(layer), "norm_added" if e in sb else "norm_removed"), []).append(norm)
            for (layer, key), norms in sums.items():
                layers[layer][key] = round(math.fsum(norms), 6)   # fsum: independent of order
            deltas = self._metric_deltas(conn, ra, rb, sa & sb)
            eval_deltas = self._eval_deltas(conn, ra, rb)
        def brief(e: int) -> dict[str, Any]:
            layer, rank, fact = info[e][0], info[e][1], info[e][2]
            return {"edit": revs.edit_name(e), "prompt": fact["prompt"], "target_new": fact["target_new"],
                    "layer": layer, "rank": rank}
        return DiffResult(a=revs.rev_name(ra), b=revs.rev_name(rb), added=[brief(e) for e in added],
                          removed=[brief(e) for e in removed], layers=dict(sorted(layers.items())),
                          metric_deltas=deltas, eval_deltas=eval_deltas)

    def _metric_deltas(self, conn: Connection, ra: int, rb: int, common: set[int]) -> dict[str, dict[str, float]]:
        """Edits present in both whose latest measurement differs between the two revisions."""
        if not common:
            return {}
        rows = conn.execute(select(Measurement.edit_id, Measurement.revision_id, Measurement.metrics_json)
                            .where(revs.among(Measurement.edit_id, common, conn)).order_by(Measurement.id)).all()
        if not rows:
            return {}
        created = {e: json.loads(m) for e, m in conn.execute(
            select(Edit.id, Edit.metrics_json).where(Edit.id.in_({r[0] for r in rows})))}

        def at(rev: int, e: int) -> dict[str, float]:
            latest = created[e]
            for eid, rid, m in rows:
                if eid == e and revs.is_ancestor(conn, rid, rev):
                    latest = json.loads(m)
            return latest
        out = {}
        for e in sorted({r[0] for r in rows}):
            ma, mb = at(ra, e), at(rb, e)
            d = {k: round(mb[k] - ma[k], 6) for k in mb if k in ma and mb[k] != ma[k]}
            if d:
                out[revs.edit_name(e)] = d
        return out

    def gc(self) -> dict[str, int]:
        """Delete blobs no edit refers to. Commits write a blob and its edit in one
        transaction, so orphans only come from outside tampering or a future bulk import."""
        from .store.schema import Blob
        with write_transaction(self.engine) as conn:
            used = select(Edit.blob_sha256)
            orphans = conn.execute(select(Blob.sha256, Blob.size).where(Blob.sha256.not_in(used))).all()
            if orphans:
                conn.execute(Blob.__table__.delete().where(Blob.sha256.in_([a for a, _ in orphans])))
                self._audit(conn, "gc", None, None, {"blobs": [a for a, _ in orphans]})
        return {"blobs_removed": len(orphans), "bytes_removed": int(sum(n for _, n in orphans))}

    # --- evaluation -------------------------------------------------------------------------

    def evaluate(self, facts: Iterable[Fact], rev: str = "HEAD", *, fluency: bool = False,
                 generation: bool = True, label: str | None = None,
                 progress: Progress | None = None) -> EvalReport:
        """Measure every fact at `rev` (DESIGN.md section 7) and store the result as an
        evaluation of that revision. Locality compares with the unedited base model (the empty
        composition), measured once per fact. With generation, also the free-generation
        metrics (evaluate.generation_metrics) of greedy generations at `rev` and at the base
        model, the base's made once per call. With fluency, also the n-gram entropy of greedy
        generations of each fact's prompt and rephrases, at `rev` (fluency) and at the base
        (base_fluency). At a revision with no edits the base model's runs are the revision's.
        progress(phase, done, total) counts sequences and generated prompts over all phases."""
        facts = list(facts)
        if not facts:
            raise InputError("no facts to evaluate")
        if any(not isinstance(f, Fact) for f in facts):
            raise InputError("evaluate takes Fact objects (see load_facts)")
        if label is not None and (not isinstance(label, str) or len(label) > 200 or "\x00" in label):
            raise InputError("--label must be text of at most 200 characters")
        with self.engine.connect() as conn:
            rid = revs.resolve(conn, rev)
            active = revs.active_set(conn, rid)
        self._check_lengths(facts)
        t0 = time.perf_counter()
        name = revs.rev_name(rid)
        n_ref = n_sequences(facts, {"loc"}) if active else 0
        n_all = n_sequences(facts)
        n_flu = sum(len(fluency_prompts(f)) for f in facts) if fluency else 0
        n_gen = n_generations(facts) if generation else 0
        n_base = n_ref + (n_gen + n_flu if active else 0)   # the base model's runs, before the revision's
        total = n_base + n_all + n_flu + n_gen

        def phase(label_: str, offset: int):
            return (lambda d, t: progress(label_, offset + d, total)) if progress else None
        reference = base_gens = base_flu = None
        if active:   # the base model; at a revision with no edits the revision's own runs serve
            base = self._compose_ids(set(), None)
            if n_ref:   # its argmax on the locality answers
                reference = measure_many(base.model, base.tokenizer, facts, kinds={"loc"},
                                         progress=phase("base model", 0))
            if generation:
                base_gens = generate_many(base.model, base.tokenizer, facts,
                                          progress=phase("base model generation", n_ref))
            if fluency:
                base_flu = fluency_scores(base.model, base.tokenizer, facts,
                                          progress=phase("base model fluency", n_ref + n_gen))
        composed = self._compose_ids(active, rid)
        after = measure_many(composed.model, composed.tokenizer, facts, progress=phase(name, n_base))
        per_fact = [score(a, b if reference is not None else a)
                    for a, b in zip(after, reference or after)]
        options: dict[str, Any] = {"fluency": fluency, "generation": generation, "locality_reference": "base"}
        if fluency:
            options["fluency_max_length"] = FLUENCY_MAX_LENGTH
            flu = fluency_scores(composed.model, composed.tokenizer, facts,
                                 progress=phase("fluency", n_base + n_all))
            for row, f, b in zip(per_fact, flu, base_flu or flu):
                row["fluency"] = f
                row["base_fluency"] = b
        if generation:
            options["generation_new_tokens"] = GEN_NEW_TOKENS
            options["generation_locality_tokens"] = GEN_LOCALITY_TOKENS
            gens = generate_many(composed.model, composed.tokenizer, facts,
                                 progress=phase("generation", n_base + n_all + n_flu))
            for row, fact, g, b in zip(per_fact, facts, gens, base_gens or gens):
                row.update(generation_metrics(fact, g, b))
        means = mean_metrics(per_fact)
        sha = dataset_sha256(facts)
        created = blobs.now()
        with write_transaction(self.engine) as conn:
            eid = conn.execute(Evaluation.__table__.insert().values(
                revision_id=rid, created_at=created, author=self.author, label=label, dataset_sha256=sha,
                n=len(facts), means_json=json.dumps(means, sort_keys=True),
                results_json=json.dumps(per_fact, sort_keys=True), options_json=json.dumps(options, sort_keys=True))
            ).inserted_primary_key[0]
            self._audit(conn, "eval", rid, None, {"evaluation": eval_name(eid), "dataset_sha256": sha,
                                                  "n": len(facts), "label": label, "means": means,
                                                  "fluency": fluency, "generation": generation})
        return EvalReport(revision=name, n=len(facts), means=means, per_fact=per_fact, dataset_sha256=sha,
                          label=label, options=options, author=self.author, created_at=created,
                          id=eval_name(eid), seconds=round(time.perf_counter() - t0, 3))

    def evaluations(self, rev: str = "HEAD", *, per_fact: bool = True) -> list[EvalReport]:
        """The stored evaluations of a revision, oldest first."""
        with self.engine.connect() as conn:
            return self._evaluations(conn, revs.resolve(conn, rev), per_fact=per_fact)

    def _evaluations(self, conn: Connection, rid: int, *, per_fact: bool) -> list[EvalReport]:
        cols = [c for c in Evaluation.__table__.columns if per_fact or c.name != "results_json"]
        rows = conn.execute(select(*cols).where(Evaluation.revision_id == rid).order_by(Evaluation.id)).all()
        return [EvalReport.from_row(r, per_fact=per_fact) for r in rows]

    def _eval_deltas(self, conn: Connection, ra: int, rb: int) -> list[dict[str, Any]]:
        """Per dataset evaluated at both revisions: the latest evaluation on each side and the
        deltas (b - a) of the means they share."""
        latest: dict[tuple[int, str], Any] = {}
        for r in conn.execute(select(Evaluation.id, Evaluation.revision_id, Evaluation.dataset_sha256,
                                     Evaluation.n, Evaluation.label, Evaluation.means_json)
                              .where(Evaluation.revision_id.in_({ra, rb})).order_by(Evaluation.id)):
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

    # --- export -----------------------------------------------------------------------------

    def export(self, rev: str, out: str | os.PathLike, *, force: bool = False,
               base_ref: bool = False) -> dict[str, Any]:
        """Write a snapshot of `rev` that plain transformers loads (see ledger/export.py).
        With base_ref, the snapshot refers to the base model's directory instead of copying it."""
        from .export import write_snapshot
        with self.engine.connect() as conn:
            rid = revs.resolve(conn, rev)
            chain_hash = conn.execute(select(Revision.chain_hash).where(Revision.id == rid)).scalar_one()
        composed = self.model_at(revs.rev_name(rid))
        s = self.settings()
        manifest = {"revision": revs.rev_name(rid), "chain_hash": chain_hash, "base_model": s["base_model"],
                    "base_fingerprint": s["base_fingerprint"], "versions": library_versions(),
                    "edits": [{"edit": e.id, "fact": e.fact, "metrics": e.metrics, "method": e.method,
                               "layer": e.layer, "rank": e.rank} for e in self.active_edits(revs.rev_name(rid))]}
        base_dir = None
        if base_ref:
            from .models import DEFAULT_MODEL, default_model_dir
            base_dir = default_model_dir() if s["base_model"] == DEFAULT_MODEL else Path(s["base_model"])
        manifest = write_snapshot(self.base, composed.sites, Path(out), manifest, force=force, base_ref=base_dir)
        with write_transaction(self.engine) as conn:
            self._audit(conn, "export", rid, None, {"out": str(Path(out).resolve()), "force": force,
                                                    "files": manifest["files"]})
        return manifest

    # --- refs, reflog, audit ------------------------------------------------------------------

    def branch(self, name: str, rev: str | None = None) -> dict[str, Any]:
        """Create a branch at REV (default HEAD); an existing branch is refused."""
        revs.check_ref_name(name)
        with write_transaction(self.engine) as conn:
            if conn.execute(select(Ref.name).where(Ref.name == name)).first():
                raise InputError(f"a ref named {name!r} already exists")
            rid = revs.resolve(conn, rev or "HEAD")
            revs.set_ref(conn, name, "branch", rid, self.author, f"branch {name}")
            self._audit(conn, "branch", rid, None, {"name": name})
        return {"name": name, "kind": "branch", "revision": revs.rev_name(rid)}

    def tag(self, name: str, rev: str) -> dict[str, Any]:
        """Name a revision for good: tags never move."""
        revs.check_ref_name(name)
        with write_transaction(self.engine) as conn:
            existing = conn.execute(select(Ref.kind).where(Ref.name == name)).scalar_one_or_none()
            if existing == "tag":
                raise InputError(f"tag {name!r} already exists and tags do not move")
            if existing:
                raise InputError(f"a {existing} named {name!r} already exists")
            rid = revs.resolve(conn, rev)
            revs.set_ref(conn, name, "tag", rid, self.author, f"tag {name}")
            self._audit(conn, "tag", rid, None, {"name": name})
        return {"name": name, "kind": "tag", "revision": revs.rev_name(rid)}

    def refs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            state = revs.head(conn)
            out = [{"name": "HEAD", "kind": "head", "revision": revs.rev_name(state.revision),
                    "target": state.branch}]
            for name, kind, rid in conn.execute(select(Ref.name, Ref.kind, Ref.revision_id)
                                                .where(Ref.kind != "head").order_by(Ref.kind, Ref.name)):
                out.append({"name": name, "kind": kind, "revision": revs.rev_name(rid), "target": None})
        return out

    def reflog(self, ref: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            q = select(RefLog).order_by(RefLog.id.desc()).limit(limit)
            if ref:
                q = q.where(RefLog.ref == ref)
            return [{"ref": r.ref, "old": revs.rev_name(r.old_revision) if r.old_revision else None,
                     "new": revs.rev_name(r.new_revision) if r.new_revision else None,
                     "old_branch": r.old_symbolic, "new_branch": r.new_symbolic,
                     "actor": r.actor, "time": r.created_at, "reason": r.reason}
                    for r in conn.execute(q).all()]

    def audit(self, *, rev: str | None = None, edit: str | None = None, actor: str | None = None,
              since: str | None = None, until: str | None = None, command: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        """The append-only audit record, newest first, filtered. Times compare as ISO-8601 text."""
        q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            if rev:
                q = q.where(AuditEvent.revision_id == revs.resolve(conn, rev))
            if edit:
                eid = revs.edit_id_of(edit)
                if eid is None:
                    raise InputError(f"invalid edit name {edit!r}: expected edit-N")
                q = q.where(AuditEvent.edit_id == eid)
            if actor:
                q = q.where(AuditEvent.actor == actor)
            if since:
                q = q.where(AuditEvent.created_at >= since)
            if until:
                q = q.where(AuditEvent.created_at <= until)
            if command:
                q = q.where(AuditEvent.command == command)
            return [{"id": r.id, "time": r.created_at, "actor": r.actor, "command": r.command,
                     "revision": revs.rev_name(r.revision_id) if r.revision_id else None,
                     "edit": revs.edit_name(r.edit_id) if r.edit_id else None,
                     "details": json.loads(r.details_json)} for r in conn.execute(q).all()]

    def _blocks_of(self, ids: set[int]) -> list[Block]:
        """The blocks of these edits, from the in-memory cache or the database."""
        with self.engine.connect() as conn:
            return self._load_blocks(conn, ids)

    def _superseded(self, conn: Connection, fact: Fact, active: set[int]) -> list[int]:
        """Active edits stating the same subject and relation: the new fact replaces them."""
        if not fact.subject or fact.relation is None or not active:
            return []
        rows = conn.execute(select(Edit.id).where(Edit.subject == fact.subject,
                                                  Edit.relation == fact.relation)).scalars()
        return sorted(e for e in rows if e in active)
