"""The fast path: the objective's logits (objective.Logits), the same values as the whole model
forward (plain.py), at a fraction of its cost. tests/test_baft.py holds the two equal in loss
and gradients.

- The blocks below the edited one are replayed: its output is computed once (the set-up pass)
  and nothing below it is trained, so a step starts at the edited block.
- The output head runs only at the positions the loss reads.
- With a gate floor, a step runs the blocks above only on the edit rows of the facts still
  training and the unrelated rows where one of their gates is open (`live_rows`): elsewhere
  the new blocks change nothing, so those rows' KL and gradient are exactly 0.
- The rows run are packed, without pads, and a row runs from the first position a new block
  acts on or the loss reads: before it (a BaFT edit acts at the subject's tokens) the states
  are the parent's whatever the parameters, so their keys and values are recorded once and
  read by every step (packing.PrefixKV).
- A step over many facts runs and back-propagates its rows in groups of at most STEP_TOKENS.
- `train_dtype="bfloat16"`, the one option that trades exactness for speed: the blocks above
  the edited one run in bfloat16.

Packing and the recorded prefix are used only where the model is checked to give the same
hidden states with them (packing.packing_works, packing.prefix_split_works).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from ..text import cache_keyword
from .hooks import InterventionSite
from .packing import PrefixKV, map_hidden, packed_inputs, packing_works, prefix_split_works, split_inputs
from .plain import PlainLogits

if TYPE_CHECKING:
    from .objective import EditProblem

# A step runs and back-propagates its rows in groups of at most this many tokens (a batch of
# 100 facts holds about 10,000), so that the activations of a large batch need not all be
# held at once; one fact's rows (about 100 tokens) are one group.
STEP_TOKENS = 2048


class _Skip(torch.nn.Module):
    """Stands in for a decoder block below the edited one: passes the hidden state through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(torch.nn.Module):
    """Stands in for the edited decoder block: returns its cached raw output. The rows are the
    same at every step and nothing below the edited block changes during training, so this is
    exact, and it saves the forward pass through every block up to the edited one."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output


class ReplayBelow:
    """While entered, the blocks below the edited one are skipped and the edited block returns
    `output`; the site's hook moves to the stand-in, so the interventions still apply."""

    def __init__(self, layers, layer: int, site: InterventionSite, output: Any):
        self.layers, self.layer, self.site = layers, layer, site
        self.originals = [layers[i] for i in range(layer + 1)]
        self.replay = _Replay(output)

    def enter(self) -> None:
        for i in range(self.layer):
            self.layers[i] = _Skip()
        self.layers[self.layer] = self.replay
        self.site.attach(self.replay)

    def exit(self) -> None:
        for i, module in enumerate(self.originals):
            self.layers[i] = module
        self.site.attach(self.layers[self.layer])


class LowPrecisionAbove:
    """While entered, the matrices of the blocks above the edited one are bfloat16 copies (the
    float32 originals come back on exit), so that the steps' matmuls, run under autocast, need
    no cast of the weights at every call. The copies are made once and reused by every entry.
    Norm weights, the edited site and the output head stay float32."""

    def __init__(self, layers, layer: int):
        modules = [m for blk in list(layers)[layer + 1:] for m in blk.modules()]
        self.slots = [(m, name, p) for m in modules for name, p in m.named_parameters(recurse=False)
                      if p.dim() >= 2 and p.dtype == torch.float32]
        self.copies: list[torch.nn.Parameter] | None = None

    def enter(self) -> None:
        if self.copies is None:
            self.copies = [torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                           for _, _, p in self.slots]
        for (m, name, _), copy in zip(self.slots, self.copies):
            m._parameters[name] = copy

    def exit(self) -> None:
        for m, name, p in self.slots:
            m._parameters[name] = p


class FastLogits:
    """objective.Logits by replay, packing, a recorded prefix and live rows (see the module's
    docstring). A context manager: the model is rearranged (blocks below replayed, bfloat16
    above) while it is entered and whole again after."""

    def __init__(self, problem: "EditProblem", *, chunk_tokens: int = STEP_TOKENS):
        self.problem = p = problem
        rows, model = p.rows, p.model
        self.head_ok = p.head_ok
        with p.parent():        # the checks run on the parent (once per model)
            self.packed = p.head_ok and packing_works(model)
            self.split = self.packed and prefix_split_works(model)
        real = rows.batch.attention_mask.bool()
        # The positions a step needs: up to each row's last read position. An edit row's last
        # token (its target's last) predicts nothing the loss reads, and with causal attention
        # no position reads it: packed steps leave it out.
        cols = torch.arange(real.shape[1], device=p.device)
        last_read = torch.where(rows.read, cols, torch.full_like(cols, -1)).amax(1, keepdim=True)
        self.needed = real & (cols[None, :] <= last_read)
        # Per row, the first position where a new block may act or the loss reads: before it
        # the hidden states are the parent's at every layer whatever the parameters. A step
        # runs a row from there on, over the recorded keys and values of its prefix.
        big = torch.full_like(cols, real.shape[1])
        first = torch.where(rows.read, cols, big).amin(1)
        for apply in rows.apply_masks:
            first = torch.minimum(first, torch.where(apply[..., 0] > 0, cols, big).amin(1))
        self.first_free = first
        self.cache_kw = cache_keyword(model.base_model) if self.split else None
        self.replay = ReplayBelow(p.layers, p.layer, p.site, p.site_out)
        self.low = LowPrecisionAbove(p.layers, p.layer) \
            if p.cfg.train_dtype == "bfloat16" and p.head_ok else None
        self.chunk_tokens = chunk_tokens
        self.tokens_run = 0
        self._plain = PlainLogits(problem)       # where the output head cannot run alone
        # With a kept gate the gates never change, and so neither do the rows a step must
        # run: the live rows are computed once, and each group's inputs once per set of
        # facts still training.
        self._live: tuple[list[torch.Tensor] | None] | None = None
        self._inputs_cache: dict[tuple | None, tuple] = {}
        self._active: tuple[int, ...] | None = None

    def __enter__(self) -> "FastLogits":
        self.replay.enter()
        if self.low is not None:
            self.low.enter()
        return self

    def __exit__(self, *exc) -> None:
        if self.low is not None:
            self.low.exit()
        self.replay.exit()

    def live_rows(self, raw_gates: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per block, the unrelated rows where its floored gate is open at a position it acts
        on; elsewhere its change is exactly 0. None: every unrelated row for every block (no
        floor, so no gate is ever exactly 0, or ReFT)."""
        if self._live is not None:
            return self._live[0]
        p = self.problem
        opened = p.open_rows(raw_gates)
        live = None
        if opened is not None:
            unrelated = torch.ones_like(opened[0])
            unrelated[: p.rows.n_edit] = False
            live = [o & unrelated for o in opened]
        if p.gate_kept:
            self._live = (live,)
        return live

    def rows_to_run(self, live: list[torch.Tensor] | None, active: list[int]) -> torch.Tensor | None:
        """The rows a step runs above the edited block (None: all): the edit rows of the
        facts still training, and the unrelated rows where one of their blocks is live.
        Elsewhere no training block changes anything, so the row adds nothing to the gradient
        of the parameters still trained."""
        rows = self.problem.rows
        run = torch.zeros(rows.batch.input_ids.shape[0], dtype=torch.bool, device=self.problem.device)
        if live is None:
            run[rows.n_edit:] = True
        else:
            for k in active:
                run |= live[k]
        owners = rows.row_owner[: rows.n_edit]
        run[: rows.n_edit] = torch.isin(owners, torch.tensor(list(active), dtype=owners.dtype, device=owners.device))
        return None if bool(run.all()) else run.nonzero().squeeze(1)

    def chunks(self, rows: torch.Tensor | None) -> list[torch.Tensor | None]:
        """`rows` in consecutive groups of at most chunk_tokens needed tokens each (one group
        at least): a large batch of facts is run and back-propagated a group at a time, so its
        activations need not all be held at once. A single group is the rows as they are."""
        need = self.needed.sum(1)
        idx = torch.arange(len(need), device=need.device) if rows is None else rows
        if int(need[idx].sum()) <= self.chunk_tokens:
            return [rows]
        groups, cur, used = [], [], 0
        for r, n in zip(idx.tolist(), need[idx].tolist()):
            if cur and used + n > self.chunk_tokens:
                groups.append(cur)
                cur, used = [], 0
            cur.append(r)
            used += n
        groups.append(cur)
        return [torch.tensor(g, device=need.device) for g in groups]

    def row_groups(self, live: list[torch.Tensor] | None, active: list[int]) -> list[torch.Tensor | None]:
        if tuple(active) != self._active:       # a fact finished: the rows run change
            self._inputs_cache.clear()
            self._active = tuple(active)
        return self.chunks(self.rows_to_run(live, active))

    def logits(self, rows: torch.Tensor | None, *, parent: bool = False) -> torch.Tensor:
        p = self.problem
        if not self.head_ok:
            out = self._plain.logits(rows, parent=parent)
            self.tokens_run = self._plain.tokens_run
            return out
        # The parent's logits are taken once per row: neither cached nor run from a record.
        inputs, site_out, train = self._step_inputs(rows, cache=not parent, split=not parent)
        read = inputs.pop("read")
        self.replay.replay.output = site_out
        for block, index in zip(p.blocks, train):
            block.train_index = index
        try:
            with self._autocast():
                out = p.model.base_model(**inputs, use_cache=False)
        finally:
            self.replay.replay.output = p.site_out
            for block in p.blocks:
                block.train_index = None
        return p.head(out.last_hidden_state[read].float())

    def _autocast(self):
        if self.low is None:
            return nullcontext()
        return torch.autocast(self.problem.device.type, dtype=torch.bfloat16)

    def _layout(self, ids, mask, read, start=None):
        """(model inputs, with "read": the read positions in that layout; the Packing or None;
        the prefixes' (inputs, Packing) or None) of right-padded rows: packed where self.packed
        (the real tokens only, rows kept apart by the attention mask: no pad is computed), else
        as they are; with `start` (per row) and self.split, each row from start on, its prefix
        laid out apart to be recorded once. Counts the positions run."""
        if start is not None and self.split and bool((start > 0).any()):     # split implies packed
            pre, live, sp = split_inputs(self.problem.model, ids, mask, start.tolist())
            self.tokens_run = int(sp.live.valid.sum())
            return {**live, "read": sp.live.gather(read[mask.bool()])}, sp.live, (pre, sp.prefix)
        if self.packed:
            inputs, pk = packed_inputs(self.problem.model, ids, mask)
            self.tokens_run = int(pk.valid.sum())
            return {**inputs, "read": pk.gather(read[mask.bool()])}, pk, None
        self.tokens_run = int(ids.numel())
        return {"input_ids": ids, "attention_mask": mask, "read": read}, None, None

    def _step_inputs(self, rows: torch.Tensor | None, *, cache: bool, split: bool):
        """The model inputs of a step over `rows` (None: all), the replayed block output for
        them and each block's positions (flat indices), laid out as the step runs them: packed
        (see _layout; the needed positions only) where this model supports it, else
        right-padded and cut to the longest row (columns past it are pads for every row run).
        Fixed for a kept gate: built once."""
        p = self.problem
        key = None if rows is None else tuple(rows.tolist())
        if key in self._inputs_cache:
            inputs, site_out, train, self.tokens_run = self._inputs_cache[key]
            return dict(inputs), site_out, train
        ids, read = p.rows.batch.input_ids, p.rows.read
        mask = self.needed.long() if self.packed else p.rows.batch.attention_mask
        site_out, train, start = p.site_out, list(p.rows.apply_masks), self.first_free
        if rows is not None:
            n = int(mask[rows].sum(1).max())
            ids, mask, read = ids[rows, :n], mask[rows, :n], read[rows, :n]
            site_out = map_hidden(site_out, lambda h: h[rows, :n])
            train = [t[rows, :n] for t in train]
            start = start[rows]
        inputs, pk, prefix = self._layout(ids, mask, read, start if split else None)
        real = mask.bool()
        if prefix is not None:
            inputs[self.cache_kw] = self._record_prefix(*prefix, map_hidden(site_out, lambda h: h[real]))
        if pk is not None:
            site_out = map_hidden(site_out, lambda h: pk.gather(h[real]))
            train = [pk.gather(t[real]) for t in train]
        # each block's positions as flat indices of the layout run (see BaftBlock.add_change)
        train = [(t.reshape(-1) > 0).nonzero().squeeze(1) for t in train]
        if p.gate_kept and cache:
            self._inputs_cache[key] = (inputs, site_out, train, self.tokens_run)
        return dict(inputs), site_out, train

    @torch.no_grad()
    def _record_prefix(self, inputs: dict, pk, site_real) -> PrefixKV:
        """The keys and values of the blocks above the edited one at the rows' prefixes, from
        one pass of the parent (no new block acts there), in the steps' precision."""
        p = self.problem
        kv = PrefixKV()
        self.replay.replay.output = map_hidden(site_real, pk.gather)
        try:
            with p.parent(), self._autocast():
                p.model.base_model(**inputs, use_cache=False, **{self.cache_kw: kv})
        finally:
            self.replay.replay.output = p.site_out
        kv.recording = False
        return kv
