"""The ledger's tables, as SQLAlchemy 2 typed models. Alembic owns the schema
(migrations/versions); these models must match it (tests run `alembic check`).

Times are stored as ISO-8601 UTC strings, not DateTime: the exact text goes into the chain
hash, and it must read back byte for byte identical on SQLite and PostgreSQL.
"""
from __future__ import annotations

from sqlalchemy import ForeignKey, Index, Integer, LargeBinary, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so SQLite batch migrations can find and alter them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Setting(Base):
    """Ledger-wide facts fixed at init: base model spec and fingerprint, format version."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Blob(Base):
    """Safetensors bytes, addressed by the sha256 of those (canonical) bytes."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[str] = mapped_column(String(32))


class Edit(Base):
    """One trained edit: immutable once written. Revisions add and remove edits."""

    __tablename__ = "edits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fact_json: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    relation: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(16))
    layer: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    config_json: Mapped[str] = mapped_column(Text)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    metrics_json: Mapped[str] = mapped_column(Text)
    stats_json: Mapped[str] = mapped_column(Text)
    versions_json: Mapped[str] = mapped_column(Text)
    # The revision whose blocks were active and frozen while this edit was trained.
    trained_on: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[str] = mapped_column(String(32))
    content_hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (Index("ix_edits_subject_relation", "subject", "relation"),)


class Revision(Base):
    """An immutable revision: its parent, what it changed, and a hash chained to the parent.

    The active set of a revision is not stored per revision (that grows as N^2): every
    CHECKPOINT_EVERY-th revision of a line stores it as a packed checkpoint, and the active
    set of any revision is that checkpoint plus the change sets after it.
    """

    __tablename__ = "revisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"), index=True)
    operation: Mapped[str] = mapped_column(String(16))
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    depth: Mapped[int] = mapped_column(Integer)
    n_active: Mapped[int] = mapped_column(Integer)
    checkpoint: Mapped[bytes | None] = mapped_column(LargeBinary)
    chain_hash: Mapped[str] = mapped_column(String(64))


class RevisionChange(Base):
    """One line of a revision's change set: an edit added or removed."""

    __tablename__ = "revision_changes"
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"), primary_key=True)
    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id"), primary_key=True, index=True)
    action: Mapped[str] = mapped_column(String(8))   # "add" | "remove"


class Ref(Base):
    """HEAD, branches and tags. HEAD is symbolic (names a branch) or detached (a revision)."""

    __tablename__ = "refs"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))     # "head" | "branch" | "tag"
    revision_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))
    symbolic: Mapped[str | None] = mapped_column(String(200))


class RefLog(Base):
    """Every move of every ref: who, when, from where to where, why."""

    __tablename__ = "reflog"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ref: Mapped[str] = mapped_column(String(200), index=True)
    old_revision: Mapped[int | None] = mapped_column(Integer)
    new_revision: Mapped[int | None] = mapped_column(Integer)
    old_symbolic: Mapped[str | None] = mapped_column(String(200))
    new_symbolic: Mapped[str | None] = mapped_column(String(200))
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)


class AuditEvent(Base):
    """Append-only record of every command that changes or reads the model."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str] = mapped_column(String(200), index=True)
    command: Mapped[str] = mapped_column(String(32))
    revision_id: Mapped[int | None] = mapped_column(Integer, index=True)
    edit_id: Mapped[int | None] = mapped_column(Integer)
    details_json: Mapped[str] = mapped_column(Text)


class Measurement(Base):
    """Metrics of an edit measured again at a later revision, when a revert changed the
    composition it runs in (creation metrics live on the edit itself). An observation, not
    history: outside the chain hash."""

    __tablename__ = "measurements"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"), index=True)
    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))          # "remeasure"
    metrics_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))


class Evaluation(Base):
    """One `ledger eval` run: metrics of a fact set at a revision (locality against the
    unedited base model). An observation, not history: outside the chain hash."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"), index=True)
    created_at: Mapped[str] = mapped_column(String(32))
    author: Mapped[str] = mapped_column(String(200))
    label: Mapped[str | None] = mapped_column(Text)
    # sha256 of the canonical JSON of the evaluated fact list: equal sets compare across revisions
    dataset_sha256: Mapped[str] = mapped_column(String(64), index=True)
    n: Mapped[int] = mapped_column(Integer)
    means_json: Mapped[str] = mapped_column(Text)
    results_json: Mapped[str] = mapped_column(Text)      # per fact, in file order: metric -> value
    options_json: Mapped[str] = mapped_column(Text)      # fluency, its generation length, ...


class Wording(Base):
    """One other wording of a relation, as a template with "{}" for the subject: "{} speaks"
    for the relation "The mother tongue of {} is". `ledger add` trains each fact on a few
    wordings of its relation, so the edit answers the question however it is put
    (wordings.py). Imported data, not history: outside the chain hash."""

    __tablename__ = "wordings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    relation: Mapped[str] = mapped_column(Text)
    wording: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)           # the file it came from, for the audit
    created_at: Mapped[str] = mapped_column(String(32))

    __table_args__ = (Index("ix_wordings_relation_wording", "relation", "wording", unique=True),)
