"""The plain path: the objective's logits (objective.Logits) from the whole model forward over
every row, at every position, read where the loss reads. It is the definition fast.py is
tested against, and what a model runs on where its output head cannot run alone."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .objective import EditProblem


class PlainLogits:
    """objective.Logits by the whole model forward: every row, every step, in one group."""

    def __init__(self, problem: "EditProblem"):
        self.problem = problem
        self.tokens_run = 0

    def __enter__(self) -> "PlainLogits":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def live_rows(self, raw_gates: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return None

    def row_groups(self, live: list[torch.Tensor] | None, active: list[int]) -> list[torch.Tensor | None]:
        return [None]

    def logits(self, rows: torch.Tensor | None, *, parent: bool = False) -> torch.Tensor:
        p, b = self.problem, self.problem.rows.batch
        self.tokens_run = b.input_ids.numel()
        out = p.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits[p.rows.read]
        return out if rows is None else out[p.rows.keep_pos(rows)]
