"""What the commands return: plain dataclasses, each with `to_dict` for JSON output."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from .names import edit_name, eval_name, rev_name

if TYPE_CHECKING:
    from sqlalchemy import Row


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
    def from_row(cls, e: Row) -> "EditInfo":
        return cls(id=edit_name(e.id), fact=json.loads(e.fact_json), method=e.method,
                   layer=e.layer, rank=e.rank, metrics=json.loads(e.metrics_json),
                   stats=json.loads(e.stats_json), config=json.loads(e.config_json),
                   blob=e.blob_sha256, trained_on=rev_name(e.trained_on) if e.trained_on else None,
                   author=e.author, created_at=e.created_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    """Metrics of a fact set at one revision (docs/design.md, evaluation); locality against the
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
    def from_row(cls, e: Row, *, per_fact: bool = True) -> "EvalReport":
        return cls(revision=rev_name(e.revision_id), n=e.n, means=json.loads(e.means_json),
                   per_fact=json.loads(e.results_json) if per_fact else [], dataset_sha256=e.dataset_sha256,
                   label=e.label, options=json.loads(e.options_json), author=e.author,
                   created_at=e.created_at, id=eval_name(e.id))

    def to_dict(self, per_fact: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not per_fact:
            d.pop("per_fact")
        return d


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
    evaluations: list[EvalReport] | None = None           # filled by show(), without per-fact rows

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


@dataclass
class SkippedFact:
    """A fact `add` left out, and why (the model already gives its target)."""
    record: int              # its index among the facts given to add
    fact: dict[str, Any]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": True, **asdict(self)}


class AddResults(list):
    """What `add` returns: the new edits, one AddResult each (a plain list of them, so callers
    that index or unpack it keep working), and in `skipped` the facts it left out."""

    def __init__(self, results: Iterable[AddResult] = (), skipped: Iterable[SkippedFact] = ()):
        super().__init__(results)
        self.skipped: list[SkippedFact] = list(skipped)
        self.seconds: float = 0.0        # wall time of the whole add: checks, training, commits
        self.threads: int = 0            # torch threads it ran with

    @property
    def edits_per_minute(self) -> float:
        return 60 * len(self) / self.seconds if self.seconds > 0 else 0.0
