"""The composer: the model at a revision is the base model plus, at each edited layer, one
fused intervention stacking every active block of that layer (docs/design.md, "Composition").

Blocks are stacked in edit-id order, so the same revision composes to the same tensors in
every process, and reloading a ledger gives bit-identical logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .baft.baserows import BaseRows
from .baft.hooks import InterventionSite, attach_sites, detach_sites
from .baft.layer import FusedIntervention
from .models import BaseModel
from .text import greedy_token_ids


# Id of a block not committed yet (being measured): sorts after every real edit id, as the
# new edit's id will (UNCOMMITTED + k for the k-th edit of a batch).
UNCOMMITTED = 2 ** 62


@dataclass(frozen=True)
class Block:
    """One active edit's tensors at its layer, as the composer needs them."""

    edit_id: int
    layer: int
    tensors: dict[str, torch.Tensor]


def fuse(blocks: list[Block], d: int, device="cpu") -> dict[int, InterventionSite]:
    by_layer: dict[int, list[Block]] = {}
    for b in sorted(blocks, key=lambda b: b.edit_id):
        by_layer.setdefault(b.layer, []).append(b)
    return {layer: InterventionSite(layer, FusedIntervention([b.tensors for b in bs], d).to(device))
            for layer, bs in sorted(by_layer.items())}


class ComposedModel:
    """The base model with a revision's interventions attached. Recomposing swaps the sites;
    the base weights are never modified."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.sites: dict[int, InterventionSite] = {}
        self.revision: int | None = None
        self.edit_ids: frozenset[int] | None = frozenset()   # None while an uncommitted block is on
        # The base's continuations and references, reused by training wherever no active gate
        # opens (baft/baserows.py); None: training computes every row anew.
        self.base_rows: BaseRows | None = BaseRows()

    @property
    def model(self):
        return self.base.model

    @property
    def tokenizer(self):
        return self.base.tokenizer

    def compose(self, blocks: list[Block], revision: int | None) -> None:
        ids = frozenset(b.edit_id for b in blocks)
        if any(i >= UNCOMMITTED for i in ids):
            ids = None
        elif ids == self.edit_ids:
            self.revision = revision   # the same edits: the attached sites are already right
            return
        n_layers = len(self.base.layers)
        for b in blocks:
            if not 0 <= b.layer < n_layers:
                raise ValueError(f"edit-{b.edit_id} sits at layer {b.layer}, the model has {n_layers}")
        device = next(self.model.parameters()).device
        sites = fuse(blocks, self.base.hidden_size, device)
        detach_sites(self.sites)
        attach_sites(self.base.layers, sites)
        self.sites = sites
        self.revision = revision
        self.edit_ids = ids

    def clear(self) -> None:
        detach_sites(self.sites)
        self.sites = {}
        self.revision = None
        self.edit_ids = frozenset()

    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        """The prompt's greedy continuation, as text (the prompt left out)."""
        [ids] = greedy_token_ids(self.model, self.tokenizer, [prompt], max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def logits(self, prompt: str) -> torch.Tensor:
        enc = self.tokenizer(prompt, return_tensors="pt").to(next(self.model.parameters()).device)
        return self.model(**enc).logits[0]
