"""Running a model over many rows cheaply, with the same results at every real position.

Packing: a right-padded batch computes every pad position too; packing puts the real tokens
of all rows into few sequences, with each token's position inside its own row and an
attention mask that keeps the rows apart (causal within a row, nothing across rows). Same
outputs at every real position, up to float rounding, for far fewer positions when rows
differ in length.

A recorded prefix: where nothing that is trained acts before some position of a row (a BaFT
edit trained at the subject's tokens changes nothing before them), the hidden states there
are the parent's at every layer, whatever the parameters, so a training step need not run
them. It runs each row from that position on, its attention reading the prefix's keys and
values, recorded once (PrefixKV).

Each is used only where the model is checked (once) to give the same hidden states so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..text import cache_keyword, checked_once, probe_inputs

# Rows go into packed sequences of at most this many tokens (a longer row gets one of its
# own): attention costs the square of a sequence's length, so a batch of many facts must not
# become one sequence of thousands of tokens.
PACK_TOKENS = 512


@dataclass
class Packing:
    """Where each real token of a right-padded batch goes in its packed form (S, L): rows in
    their order, filled into sequences one after another, so the packed real tokens read
    row-major are the padded batch's real tokens read row-major."""
    index: torch.Tensor            # (S, L) index into the real tokens (0 at a pad)
    valid: torch.Tensor            # (S, L) True at a real token
    position_ids: torch.Tensor     # (S, L) each token's position inside its own row
    attention_mask: torch.Tensor   # (S, 1, L, L) causal within a row, nothing across rows

    def gather(self, real_values: torch.Tensor) -> torch.Tensor:
        """(N, ...) values of the real tokens, row-major -> (S, L, ...), zero (False) at pads."""
        out = real_values[self.index]
        pad = ~self.valid
        if pad.any():
            out[pad] = 0
        return out


def _groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices per packed sequence: rows in order, a new sequence once max_tokens is hit."""
    seqs: list[list[int]] = [[]]
    used = 0
    for r, n in enumerate(lengths):
        if seqs[-1] and used + n > max_tokens:
            seqs.append([])
            used = 0
        seqs[-1].append(r)
        used += n
    return seqs


def _place(seqs, offset, first, count) -> tuple[torch.Tensor, ...]:
    """(index, position, row) of the tokens first[r] .. first[r] + count[r] - 1 of each row r,
    laid out sequence by sequence; offset[r]: row r's first token among the real tokens."""
    L = max(1, max(sum(count[r] for r in rows) for rows in seqs))
    S = len(seqs)
    index = torch.zeros(S, L, dtype=torch.long)
    position = torch.zeros(S, L, dtype=torch.long)
    row = torch.full((S, L), -1, dtype=torch.long)
    for s, rows in enumerate(seqs):
        col = 0
        for r in rows:
            n, a = count[r], first[r]
            index[s, col: col + n] = torch.arange(offset[r] + a, offset[r] + a + n)
            position[s, col: col + n] = torch.arange(a, a + n)
            row[s, col: col + n] = r
            col += n
    return index, position, row


def _mask_form(model, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean (S, Lq, Lk) attention pattern in the form the model's attention takes:
    boolean for SDPA, additive elsewhere; (S, 1, Lq, Lk)."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed[:, None]
    attn = torch.zeros(allowed.shape, dtype=model.dtype)
    attn.masked_fill_(~allowed, torch.finfo(model.dtype).min)
    return attn[:, None]


def _within_rows(row: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(S, L, L): each real token sees the earlier tokens of its own row (causal, nothing across
    rows); a pad sees itself only, so no row of the attention is empty."""
    valid = row >= 0
    allowed = (row[:, :, None] == row[:, None, :]) & (position[:, :, None] >= position[:, None, :]) & valid[:, :, None]
    return allowed | (torch.eye(row.shape[1], dtype=torch.bool)[None] & ~valid[:, :, None])


def _inputs(pk: Packing, real_ids: torch.Tensor) -> dict:
    """Model inputs of a packed layout, from the real token ids read row-major."""
    return {"input_ids": pk.gather(real_ids), "position_ids": pk.position_ids, "attention_mask": pk.attention_mask}


def _offsets(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def pack(model, mask: torch.Tensor, max_tokens: int = PACK_TOKENS) -> Packing:
    """The packed layout of a right-padded batch with this 2D mask, its attention mask in the
    form the model's attention takes (boolean for SDPA, additive elsewhere)."""
    lengths = mask.sum(1).tolist()
    seqs = _groups(lengths, max_tokens)
    index, position, row = _place(seqs, _offsets(lengths), [0] * len(lengths), lengths)
    device = mask.device
    return Packing(index.to(device), (row >= 0).to(device), position.to(device),
                   _mask_form(model, _within_rows(row, position)).to(device))


@dataclass
class SplitPacking:
    """A packed layout cut into each row's frozen prefix (tokens before start[r]) and the rest
    (`live`), the two laid out in the same sequences. live.attention_mask is (S, 1, Ll, Lp + Ll):
    a live token sees its own row's prefix, then its own row's live tokens causally."""
    prefix: Packing
    live: Packing


def pack_split(model, mask: torch.Tensor, start: list[int], max_tokens: int = PACK_TOKENS) -> SplitPacking:
    lengths = mask.sum(1).tolist()
    start = [min(int(a), n) for a, n in zip(start, lengths)]
    seqs = _groups(lengths, max_tokens)
    offset = _offsets(lengths)
    pi, pp, pr = _place(seqs, offset, [0] * len(lengths), start)
    li, lp, lr = _place(seqs, offset, start, [n - a for n, a in zip(lengths, start)])
    pv, lv = pr >= 0, lr >= 0
    to_prefix = (lr[:, :, None] == pr[:, None, :]) & lv[:, :, None] & pv[:, None, :]
    l_allowed = torch.cat([to_prefix, _within_rows(lr, lp)], dim=2)
    device = mask.device
    prefix = Packing(pi.to(device), pv.to(device), pp.to(device), _mask_form(model, _within_rows(pr, pp)).to(device))
    live = Packing(li.to(device), lv.to(device), lp.to(device), _mask_form(model, l_allowed).to(device))
    return SplitPacking(prefix, live)


class PrefixKV:
    """Stands in for a model's key/value cache (the `update` its attention layers call): while
    recording, it keeps each layer's keys and values (of the prefix, from a no-grad pass); then
    it puts them in front of each layer's live keys and values, without keeping those, so one
    recording serves every step."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.recording:
            self.kv[layer_idx] = (key_states.detach(), value_states.detach())
            return key_states, value_states
        k, v = self.kv[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0        # positions are always given


def split_inputs(model, ids: torch.Tensor, mask: torch.Tensor, start: list[int],
                 max_tokens: int = PACK_TOKENS) -> tuple[dict, dict, SplitPacking]:
    """(model inputs of the prefixes, of the live tokens, the SplitPacking) of this right-padded
    batch cut at start[r] in row r."""
    sp = pack_split(model, mask, start, max_tokens)
    real = ids[mask.bool()]
    return _inputs(sp.prefix, real), _inputs(sp.live, real), sp


def prefix_split_works(model) -> bool:
    """Whether this model gives the same hidden states run from a recorded prefix (PrefixKV) as
    packed in one go, checked once per model (a model whose attention takes no such cache, or
    reads it otherwise, fails it)."""
    def check():
        ids, mask = probe_inputs(model)
        base = model.base_model
        keyword = cache_keyword(base)
        if keyword is None:
            return False
        inputs, pk = packed_inputs(model, ids, mask, max_tokens=6)
        whole = base(**inputs, use_cache=False).last_hidden_state[pk.valid]
        pre, live, sp = split_inputs(model, ids, mask, [2, 1], max_tokens=6)
        kv = PrefixKV()
        base(**pre, use_cache=False, **{keyword: kv})
        kv.recording = False
        out = base(**live, use_cache=False, **{keyword: kv}).last_hidden_state
        at = sp.live.index[sp.live.valid]      # each live token's place among the real tokens
        return bool(kv.kv) and torch.allclose(out[sp.live.valid], whole[at], atol=1e-4, rtol=1e-4)
    return checked_once(model, "prefix", check)


def packed_inputs(model, ids: torch.Tensor, mask: torch.Tensor, max_tokens: int = PACK_TOKENS):
    """(model inputs of the packed form of this right-padded batch, its Packing)."""
    pk = pack(model, mask, max_tokens)
    return _inputs(pk, ids[mask.bool()]), pk


def packing_works(model) -> bool:
    """Whether this model gives the same hidden states packed as padded, checked once per model
    (a model that ignores position_ids or a 4D mask fails it)."""
    def check():
        ids, mask = probe_inputs(model)
        base = model.base_model
        padded = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        inputs, pk = packed_inputs(model, ids, mask, max_tokens=6)     # two packed sequences
        packed = base(**inputs, use_cache=False).last_hidden_state
        return torch.allclose(packed[pk.valid], padded[mask.bool()], atol=1e-4, rtol=1e-4)
    return checked_once(model, "packing", check)


def map_hidden(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """fn applied to a decoder block's hidden-state output (a tensor, or the first item of the
    tuple older and GPT-2 style blocks return)."""
    return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)


class _Captured(Exception):
    """Ends a pass at the block whose output it captured: nothing above it is needed."""


@torch.no_grad()
def block_output(model, block: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, packed: bool,
                 base: bool) -> Any:
    """The raw output of decoder block `block` (before any hook of its own) for every row of
    this right-padded batch, in the padded layout (0 at pads), from one pass that ends there.
    packed: the rows run packed (the caller has checked packing_works); base: through
    model.base_model (the model without its output head), else the whole model."""
    captured: dict[str, Any] = {}

    def grab_output(module, args, out):
        captured["out"] = out
        raise _Captured

    if packed:
        inputs, pk = packed_inputs(model, ids, mask)
    else:
        inputs, pk = {"input_ids": ids, "attention_mask": mask}, None
    grab = block.register_forward_hook(grab_output, prepend=True)
    try:
        (model.base_model if base else model)(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        grab.remove()
    if "out" not in captured:
        raise RuntimeError("the decoder block did not run in the model's forward pass")
    if pk is None:
        return captured["out"]
    real = mask.bool()

    def unpack(h):
        padded = h.new_zeros(*real.shape, h.shape[-1])
        padded[real] = h[pk.valid]
        return padded
    return map_hidden(captured["out"], unpack)
