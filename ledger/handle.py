"""The state every command works with: the database, who acts, and the base model (loaded
once, checked against the fingerprint stored at init) with the composition over it.

Composing is cached twice: each edit's block is decoded from its blob once per handle, and
the composed model is recomposed only when the set of active edits changes.
"""
from __future__ import annotations

import getpass
import os
import platform
from typing import TYPE_CHECKING, ContextManager, Iterable

from . import __version__
from .errors import InputError, StateError
from .store import blobs, edits, refs, revisions, settings as stored_settings
from .store.database import Database

# The model side (torch, transformers) is imported where a model is needed, and SQLAlchemy
# where the engine is: the reading commands open a Handle and load neither.
if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from .store.sql import Conn
    from .compose import Block, ComposedModel
    from .models import BaseModel


def default_author() -> str:
    try:
        return os.environ.get("LEDGER_AUTHOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """The versions an edit is trained with, stored with it."""
    import safetensors
    import sqlalchemy
    import torch
    import transformers
    return {"ledger": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "sqlalchemy": sqlalchemy.__version__,
            "python": platform.python_version()}


class Handle:
    """An open ledger's working state; every command function takes one."""

    def __init__(self, db: Database | Engine, *, author: str | None = None, device: str = "cpu"):
        self.db = db if isinstance(db, Database) else Database(engine=db)
        self.author = author or default_author()
        self.device = device
        self.base_model: BaseModel | None = None
        self.composed: ComposedModel | None = None
        self.blocks: dict[int, Block] = {}
        # How often an add retrains when another writer moved the branch meanwhile.
        self.max_attempts = 20

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created on first use."""
        return self.db.engine

    def reading(self) -> ContextManager[Conn]:
        """A connection for one read (store/database.py): a plain driver connection while no
        engine is in use, so a reading command never imports SQLAlchemy."""
        return self.db.reading()

    def settings(self) -> dict[str, str]:
        with self.reading() as conn:
            return stored_settings.read(conn)

    @property
    def base(self) -> BaseModel:
        """The base model, loaded once and checked against the fingerprint stored at init."""
        if self.base_model is None:
            from .models import load_base
            s = self.settings()
            base = load_base(s["base_model"], device=self.device)
            if base.fingerprint != s["base_fingerprint"]:
                raise StateError(f"the base model {s['base_model']} has fingerprint {base.fingerprint[:12]}, "
                                 f"this ledger was built on {s['base_fingerprint'][:12]}: refusing to compose")
            self.base_model = base
        return self.base_model

    # --- composing --------------------------------------------------------------------------------

    def load_blocks(self, conn: Connection, ids: Iterable[int]) -> list[Block]:
        """The blocks of these edits, by id, from the cache or the database."""
        missing = [i for i in ids if i not in self.blocks]
        if missing:
            from .compose import Block
            # Two or three queries whatever the number of edits, not one per blob.
            rows = edits.block_addresses(conn, missing)
            tensors = blobs.get_many(conn, [address for _, _, address in rows])
            for eid, layer, address in rows:
                self.blocks[eid] = Block(eid, layer, tensors[address])
        return [self.blocks[i] for i in sorted(ids)]

    def blocks_of(self, ids: set[int]) -> list[Block]:
        with self.engine.connect() as conn:
            return self.load_blocks(conn, ids)

    def compose(self, ids: set[int], revision: int | None) -> ComposedModel:
        """The base model with these edits' blocks on; `revision` names the composition (None
        when it is no stored revision's)."""
        base = self.base
        if self.composed is None:
            from .compose import ComposedModel
            self.composed = ComposedModel(base)
        with self.engine.connect() as conn:
            blocks = self.load_blocks(conn, ids)
        self.composed.compose(blocks, revision)
        return self.composed

    def model_at(self, rev: str | None = None) -> ComposedModel:
        """The composed model at a revision (default HEAD). Recomposes only when needed."""
        with self.engine.connect() as conn:
            rid = refs.resolve(conn, rev or "HEAD")
            if self.composed is not None and self.composed.revision == rid:
                return self.composed
            ids = revisions.active_set(conn, rid)
        return self.compose(ids, rid)

    def close(self) -> None:
        if self.composed:
            self.composed.clear()
        self.db.close()


def generate(s: Handle, prompt: str, *, rev: str | None = None, max_new_tokens: int = 20) -> str:
    """Greedy continuation of the prompt by the model composed at `rev` (default HEAD)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty")
    if not 1 <= max_new_tokens <= 4096:
        raise InputError("--max-new-tokens must be between 1 and 4096")
    return s.model_at(rev).generate(prompt, max_new_tokens=max_new_tokens)
