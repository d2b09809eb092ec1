"""Progress of a long command, reported as structured events (the CLI draws them as a bar)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a command. `done` and `total` count the command's units of work over all of
    it (training steps for add and rebase; sequences and prompts for evaluate), so a bar needs
    nothing else; the other fields say where the work is."""

    phase: str                 # "train", or an evaluation phase: "base model", "generation", ...
    label: str                 # what a progress bar shows: "edit 3/10", "edits 11-20/100", "rev-4"
    done: int
    total: int
    fact: int | None = None    # training: index of the group's first fact among the command's
    n_facts: int | None = None   # training: facts in the group trained together
    step: int | None = None    # training: optimisation steps run for this group
    steps: int | None = None   # training: most steps this group may run (it stops earlier once
    #                            every target is reached, so `steps` is a bound, not a length)
    facts_total: int | None = None   # training: facts the whole command trains


Progress = Callable[[ProgressEvent], None]
