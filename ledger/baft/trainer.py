"""The trainer of BaFT edits: Adam over the objective (objective.py) until each fact is done.

Several facts can be trained together (`ledger add --batch K`): one block per fact, one
optimisation, so each fact keeps its own record and can be reverted alone. In a batch each
block stops as its fact is done (the blocks are independent on the edit rows), so a batch
costs about what its facts cost one by one, not K times its slowest fact.

The trainer returns tensors and statistics; it never sees a database.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import StateError
from ..facts import Fact
from .baserows import BaseRows
from .config import BaftConfig
from .fast import FastLogits
from .hooks import InterventionSite
from .objective import EditProblem
from .plain import PlainLogits


@dataclass
class TrainedEdit:
    layer: int
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float | int | bool] = field(default_factory=dict)


def train_edits(model, tok, sites: dict[int, InterventionSite], layers, facts: list[Fact],
                cfg: BaftConfig, *, layer: int, retention: list[tuple[str, str]] = (),
                extra_prompts: list[list[str]] | None = None, other_prompts: list[list[str]] | None = None,
                progress: Callable[[int, int], None] | None = None, fast: bool = True,
                after_prompts: list[list[str]] | None = None, base_rows: BaseRows | None = None,
                negative_prompts: list[list[str]] | None = None) -> list[TrainedEdit]:
    """Train one block per fact at `layer`, together, with every site in `sites` active and
    frozen. extra_prompts: per fact, more prompts that must give its target (the relation's
    other wordings, filled with the subject); other_prompts: per fact, prompts of its subject
    in other relations, whose continuations must stay the parent's; after_prompts: per fact,
    wordings whose continuation after the new target must stay the parent's; negative_prompts:
    per fact, prompts of its subject whose states there set the ramp of its gate's key. fast:
    the fast path (fast.py); False, the plain one (plain.py), which gives the same edit,
    slower. base_rows: the base model's continuations and references to reuse where no parent
    gate opens (baserows.py)."""
    started = time.perf_counter()
    problem = EditProblem(model, tok, sites, layers, facts, cfg, layer=layer, retention=retention,
                          extra_prompts=extra_prompts, other_prompts=other_prompts,
                          after_prompts=after_prompts, base_rows=base_rows,
                          negative_prompts=negative_prompts)
    gate = [p for b in problem.blocks for p in (b.U, b.c) if p.requires_grad]
    gate_ids = {id(p) for p in gate}
    rest = [p for p in problem.parameters() if id(p) not in gate_ids]
    groups = [{"params": rest}] + ([{"params": gate, "lr": cfg.lr * cfg.gate_lr_scale}] if gate else [])
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    steps_of = [cfg.steps] * len(facts)       # per fact, the steps its block was trained for
    steps_run, last = 0, {}
    try:
        path = FastLogits(problem) if fast else PlainLogits(problem)
        model.train(False)
        with path:
            for step in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                res = problem.step(path)
                last = res.parts
                if step >= cfg.min_steps:
                    for k, ok in enumerate(res.reached):
                        if ok and not problem.done[k]:
                            problem.finish(k)   # the checked state is the one kept: no update after
                            steps_of[k] = step
                if all(problem.done):
                    break
                res.backward()
                problem.drop_done_gradients()
                opt.step()
                steps_run = step + 1
                if progress:
                    progress(steps_run, cfg.steps)
        tensors = [b.tensors() for b in problem.blocks]
        with torch.no_grad():
            unmoved = problem.live_targets(problem.raw_gates()).logical_not()
        # per fact, the target tokens of rows its gate is shut on (live_targets)
        unmoved_of = [int(unmoved[problem.rows.tgt_owner == k].sum()) for k in range(len(facts))]
    finally:
        problem.close()
    for ts in tensors:
        for name, t in ts.items():
            if not torch.isfinite(t).all():
                raise StateError(f"training diverged (non-finite values in {name}): nothing was written; "
                                 "try a smaller --lr")
    shared = {**{f"final_{k}": round(v, 6) for k, v in last.items()},
              "seconds": round(time.perf_counter() - started, 3),
              "n_edit_rows": problem.rows.n_edit, "n_unrelated_rows": problem.rows.n_unrelated,
              "n_wording_rows": problem.n_extra,
              "subject_found": round(problem.rows.subject_found, 3), "batch_size": len(facts)}
    if len(facts) > 1:
        shared["batch_steps"] = steps_run
    return [TrainedEdit(layer=layer, tensors=ts, stats={"steps": n, **shared, "reached_target": n < cfg.steps,
                                                        "gate_key_fisher": fisher, "gate_key_prompt": kp,
                                                        "unmoved_targets": u})
            for ts, n, fisher, kp, u in zip(tensors, steps_of, problem.key_fisher, problem.key_prompt, unmoved_of)]
