"""Tokenising prompts and targets the way EasyEdit does, and batching them for teacher forcing.

A target is tokenised on its own with a leading space (unless the prompt already ends in
whitespace) and appended to the prompt's ids, so the target tokens are the same wherever they
are scored. In a sequence of length T, the logits at position t predict token t + 1: the
target's first token is predicted by the prompt's last position (the off-by-one of teacher
forcing lives here and only here).
"""
from __future__ import annotations

from dataclasses import dataclass

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
