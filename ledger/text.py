"""Tokenising prompts and targets the way EasyEdit does, and batching them for teacher forcing.

A target is tokenised on its own with a leading space (unless the prompt already ends in
whitespace) and appended to the prompt's ids, so the target tokens are the same wherever they
are scored. In a sequence of length T, the logits at position t predict token t + 1: the
target's first token is predicted by the prompt's last position (the off-by-one of teacher
forcing lives here and only here).
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Callable

import torch


def prompt_ids(tok, prompt: str) -> list[int]:
    return list(tok(prompt, add_special_tokens=True)["input_ids"])


def target_ids(tok, prompt: str, target: str) -> list[int]:
    text = target if prompt[-1:].isspace() else " " + target.strip()
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


@dataclass
class Batch:
    input_ids: torch.Tensor        # (B, T)
    attention_mask: torch.Tensor   # (B, T)
    target_mask: torch.Tensor      # (B, T) True where the *next* token is a target token
    next_ids: torch.Tensor         # (B, T) the token each position should predict (0 at pad)
    lengths: list[int]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.target_mask.to(device), self.next_ids.to(device), self.lengths)


def encode_pair(tok, prompt: str, target: str | None) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + target and the mask of positions whose next token is scored.
    A pair with target None is the prompt alone, scored at its last position only (the next
    token after the prompt)."""
    p = prompt_ids(tok, prompt)
    t = target_ids(tok, prompt, target) if target is not None else []
    ids = p + t
    # position i predicts ids[i+1]; targets start at index len(p), predicted from len(p)-1
    m = [False] * len(ids)
    if t:
        for i in range(len(p) - 1, len(ids) - 1):
            m[i] = True
    else:
        m[len(p) - 1] = True
    return ids, m


def batch_of(tok, encoded: list[tuple[list[int], list[bool]]], device="cpu") -> Batch:
    """Right-padded batch of encoded sequences (see encode_pair)."""
    T = max(len(s) for s, _ in encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    B = len(encoded)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    tmask = torch.zeros((B, T), dtype=torch.bool)
    next_ids = torch.zeros((B, T), dtype=torch.long)
    for i, (s, m) in enumerate(encoded):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        tmask[i, : len(m)] = torch.tensor(m)
        next_ids[i, : len(s) - 1] = torch.tensor(s[1:]) if len(s) > 1 else next_ids[i, :0]
    return Batch(input_ids, attn, tmask, next_ids, [len(s) for s, _ in encoded]).to(device)


def make_batch(tok, pairs: list[tuple[str, str | None]], device="cpu") -> Batch:
    """Right-padded batch of prompt + target sequences (see encode_pair)."""
    return batch_of(tok, [encode_pair(tok, p, t) for p, t in pairs], device)


def logits(model, batch: Batch) -> torch.Tensor:
    # No KV cache: these are one-shot teacher-forced passes.
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


def scored_logits(model, batch: Batch) -> torch.Tensor:
    """The logits at the batch's scored positions (target_mask, row-major). Where the model's
    output head alone gives its logits (head_matches_logits) the head runs only there: a
    49,152-word head at every padded position was most of a measurement's cost."""
    if not head_matches_logits(model):
        return logits(model, batch)[batch.target_mask]
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[batch.target_mask])


# --- what a model supports, checked once per model -------------------------------------------

# Per model, the checks it passed: {"head": bool, "packing": bool, "prefix": bool}.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def probe_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two short rows of different lengths (ids, right-padded mask) to check a model on."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 64))
    ids = (torch.arange(10, device=device).reshape(2, 5) * 7 + 3) % vocab
    return ids, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], device=device)


def checked_once(model, name: str, check: Callable[[], bool]) -> bool:
    """check() for this model, run once (without gradients) and remembered; an error in it
    counts as a failed check."""
    found = _CHECKED.setdefault(model, {})
    if name not in found:
        try:
            with torch.no_grad():
                found[name] = bool(check())
        except (TypeError, ValueError, RuntimeError, IndexError, AttributeError):
            found[name] = False
    return found[name]


def head_matches_logits(model) -> bool:
    """Whether the output head applied to the base model's last hidden states gives this
    model's logits (not so where the model rescales or caps them), checked once per model: then
    the head can run only at the positions a loss reads."""
    def check():
        ids, mask = probe_inputs(model)
        head = model.get_output_embeddings()
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return torch.allclose(head(hidden).float(), logits.float(), atol=1e-4, rtol=1e-4)
    return checked_once(model, "head", check)


def cache_keyword(module) -> str | None:
    """The name under which this model's (or base model's) forward takes a key/value cache
    (`cache` in transformers 5, `past_key_values` before); None when it takes none."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


@torch.no_grad()
def continue_greedily(model, tok, prompts: list[str], n_tokens: int | list[int]) -> list[str]:
    """Each prompt followed by the model's greedy continuation of n_tokens (one count for all,
    or one per prompt), as text, all prompts in one left-padded generate call."""
    counts = list(n_tokens) if isinstance(n_tokens, (list, tuple)) else [n_tokens] * len(prompts)
    if not prompts or max(counts) <= 0:
        return list(prompts)
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tok.padding_side = side
    gen = model.generate(**enc, max_new_tokens=max(counts), do_sample=False, pad_token_id=tok.pad_token_id)
    new = gen[:, enc["input_ids"].shape[1]:]
    # Greedy: the first k tokens of a longer continuation are the continuation of k tokens.
    return [p + tok.decode(row[:k], skip_special_tokens=True) if k > 0 else p
            for p, row, k in zip(prompts, new, counts)]
