"""Text in and out of a model: tokenising prompts and targets the way EasyEdit does, batching them
for teacher forcing, and greedy generation.

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
    49,152-word head at every padded position is most of a measurement's cost."""
    if not head_matches_logits(model):
        return logits(model, batch)[batch.target_mask]
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[batch.target_mask])


@torch.no_grad()
def next_token_logprobs(model, tok, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), vocab): the model's log-probabilities of the token after each prompt (a
    prompt without a target is scored at its last position only, see encode_pair)."""
    batch = make_batch(tok, [(p, None) for p in prompts], next(model.parameters()).device)
    return torch.log_softmax(scored_logits(model, batch).float(), dim=-1)


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


# --- greedy generation ---------------------------------------------------------------------------

@torch.no_grad()
def greedy_token_ids(model, tok, prompts: list[str], max_new_tokens: int | list[int], *, max_rows: int = 32,
                     progress: Callable[[int, int], None] | None = None, padded: bool = False) -> list[list[int]]:
    """The token ids of each prompt's greedy continuation of max_new_tokens (one number, or one
    per prompt), cut at the end token. Prompts of equal token length run as one batch, so
    nothing is padded and each result equals the prompt's unbatched generation (a row with a
    lower limit is cut to it afterwards). Uses the model's KV cache when it has one; a model
    without recomputes the whole sequence. progress(done, total) counts prompts.

    padded: prompts of any length run together, left-padded (with a KV cache only): one decode
    pass per token for up to max_rows prompts, where a group per length costs one per length.
    A row may then differ from its unbatched generation in the last bits of its logits, so it
    serves checks (loop_check), not the measured metrics."""
    ids = [prompt_ids(tok, p) for p in prompts]
    if isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * len(prompts)
    else:
        limits = list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError("max_new_tokens needs one number per prompt")
    eos = tok.eos_token_id
    device = next(model.parameters()).device
    cache_arg = cache_keyword(model)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(ids):
        by_len.setdefault(0 if padded and cache_arg else len(s), []).append(i)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    out: list[list[int]] = [[] for _ in prompts]
    done = 0
    for length, members in sorted(by_len.items()):
        for k in range(0, len(members), max_rows):
            rows = members[k:k + max_rows]
            steps = max(limits[i] for i in rows)
            width = max(len(ids[i]) for i in rows)
            seq = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in rows], dtype=torch.long, device=device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in rows], device=device)
            where = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp_min(0)} if length == 0 else {}
            new = torch.empty((len(rows), 0), dtype=torch.long, device=device)
            past = None
            finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for _ in range(steps):
                if past is None:
                    res = model(input_ids=torch.cat([seq, new], 1), use_cache=cache_arg is not None, **where)
                else:
                    if where:
                        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
                        where = {"attention_mask": mask, "position_ids": where["position_ids"][:, -1:] + 1}
                    res = model(input_ids=new[:, -1:], use_cache=True, **{cache_arg: past}, **where)
                past = getattr(res, cache_arg, None) if cache_arg else None
                nxt = res.logits[:, -1].argmax(-1)
                new = torch.cat([new, nxt[:, None]], 1)
                if eos is not None:
                    finished |= nxt == eos
                    if bool(finished.all()):
                        break
            for r, i in enumerate(rows):
                toks = new[r].tolist()[:limits[i]]
                if eos is not None and eos in toks:
                    toks = toks[:toks.index(eos)]
                out[i] = toks
            done += len(rows)
            if progress:
                progress(done, len(prompts))
    return out


def continue_greedily(model, tok, prompts: list[str], max_new_tokens: int | list[int]) -> list[str]:
    """Each prompt followed by the text of its greedy continuation (greedy_token_ids)."""
    gens = greedy_token_ids(model, tok, prompts, max_new_tokens)
    return [p + tok.decode(g, skip_special_tokens=True) for p, g in zip(prompts, gens)]
