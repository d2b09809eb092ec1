"""What the base model says on rows no active edit touches, kept once per base model.

A composed change is exactly zero at a position where every gate of the site is below its
floor (layer.py). Along a token sequence where that holds at every site and position, the
composed model computes exactly the base model's hidden states, so its greedy continuation
and its log-probabilities there are the base's. Training asks for such things again and
again: the greedy continuations of its unrelated rows (the relation template filled with
generic subjects, locality prompts, the rows of a retrain) and the parent's distributions on
them (neutral sentences, negatives). `BaseRows` keeps both, keyed by the row's tokens, and
hands one out for a composition only after `shut_rows` has checked, in one no-grad pass that
ends at the highest edited layer, that every gate stays shut along it; with no active edit
there is nothing to check.

Up to float rounding: the check and the cached values come from batches of other shapes
than the ones a fresh computation would run in (tests/test_baserows.py holds them equal to
1e-6 on a real model).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..text import batch_of, greedy_token_ids, prompt_ids
from .hooks import InterventionSite


class _Done(Exception):
    """Raised by the hook on the highest edited layer: the rest of the pass is not needed."""


def active_sites(sites: dict[int, InterventionSite]) -> dict[int, InterventionSite]:
    """The sites that can change anything: a stacked edit or a block in training."""
    return {k: s for k, s in sites.items() if s.fused.rank or len(s.trainable)}


@torch.no_grad()
def shut_rows(model, tok, layers, sites: dict[int, InterventionSite], seqs: list[list[int]]) -> list[bool]:
    """Per token sequence, whether every active gate is shut at every one of its positions in
    the composition `sites` (so the composed model computes the base's states along it)."""
    live = active_sites(sites)
    if not seqs or not live:
        return [True] * len(seqs)
    device = next(model.parameters()).device
    batch = batch_of(tok, [(s, [False] * len(s)) for s in seqs], device)
    ids, mask = batch.input_ids, batch.attention_mask
    real = mask.bool()
    opened = torch.zeros(len(seqs), dtype=torch.bool, device=device)
    top = max(live)

    def watch(layer: int, site: InterventionSite):
        def hook(module, args, out):
            # Before the site's own hook: the gates read the block's output as the site does.
            h = out[0] if isinstance(out, tuple) else out
            opened.logical_or_(site.opens(h).logical_and(real).any(1))
            if layer == top:
                raise _Done
        return hook

    handles = [layers[k].register_forward_hook(watch(k, s), prepend=True) for k, s in live.items()]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return (~opened).tolist()


class BaseRows:
    """The base model's greedy continuations and log-probabilities on rows, for reuse where a
    composition's gates are shut along them. References are kept up to `max_bytes`, the least
    recently used dropped first; continuations are a few token ids each and all kept."""

    def __init__(self, max_bytes: int = 256 * 2 ** 20):
        self.max_bytes = max_bytes
        self._continuations: dict[tuple[str, int], list[int]] = {}
        self._references: OrderedDict[tuple[tuple[int, ...], int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = {"continuations": 0, "references": 0}

    # --- greedy continuations -------------------------------------------------------------------

    def continue_greedily(self, model, tok, layers, sites: dict[int, InterventionSite], prompts: list[str],
                          max_new_tokens: int | list[int], keep: bool | list[bool] = True) -> list[str]:
        """As text.continue_greedily on the composed model, with the base's continuation reused
        wherever the composition's gates are shut along it. keep: per prompt (or for all),
        whether its continuation is worth keeping for later runs (a row that recurs, such as a
        generic negative); with an edit active, keeping costs a check, so a row used once is
        not checked."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        keep = [keep] * len(prompts) if isinstance(keep, bool) else list(keep)
        keys = list(zip(prompts, limits))
        gens = [self._continuations.get(k) for k in keys]
        cached = [g is not None for g in gens]
        misses = [i for i, c in enumerate(cached) if not c]
        if misses:
            fresh = greedy_token_ids(model, tok, [prompts[i] for i in misses], [limits[i] for i in misses])
            for i, g in zip(misses, fresh):
                gens[i] = g
        live = bool(active_sites(sites))
        check = [i for i in range(len(prompts)) if cached[i] or (keep[i] and live)]
        shut = dict(zip(check, shut_rows(model, tok, layers, sites,
                                         [prompt_ids(tok, prompts[i]) + gens[i] for i in check])))
        redo = []
        for i, key in enumerate(keys):
            if shut.get(i, not live):
                if keep[i] and not cached[i]:
                    self._continuations[key] = gens[i]     # the base's too: nothing acted along it
                self.hits["continuations"] += cached[i]
            elif cached[i]:
                redo.append(i)                          # an edit acts there: the composition's own
        if redo:
            for i, g in zip(redo, greedy_token_ids(model, tok, [prompts[i] for i in redo], [limits[i] for i in redo])):
                gens[i] = g
        return [p + tok.decode(g, skip_special_tokens=True) for p, g in zip(prompts, gens)]

    # --- reference log-probabilities ------------------------------------------------------------

    def reference(self, ids: list[int], start: int) -> torch.Tensor | None:
        """The base's log-probabilities at positions start.. of this token sequence, if kept."""
        key = (tuple(ids), start)
        out = self._references.get(key)
        if out is not None:
            self._references.move_to_end(key)
            self.hits["references"] += 1
        return out

    def keep_reference(self, ids: list[int], start: int, logp: torch.Tensor) -> None:
        key = (tuple(ids), start)
        size = logp.numel() * logp.element_size()
        if key in self._references or size > self.max_bytes:
            return
        self._references[key] = logp.detach().clone()
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._references.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
