"""`ledger explain`: which active edits fire on which token of a prompt (and of its greedy
continuation), how strongly, and what the revision does to the next token against the base.

An edit fires at a position where its gate after the floor is above 0 there: that gate is the
factor the block multiplies its change by, so an edit that does not fire changes nothing at
that position (docs/design.md, "Reading explain"). An edit of rank r has one gate per basis; its
reported weight is the largest of them (the edit changes the state as soon as one basis is
open; with the key-matched gate of `ledger add` its bases open together). Its norm is the L2
norm of the change the edit adds to the residual stream at that position.

Everything is read off the model the revision composes: one forward pass with a hook on each
edited decoder block that keeps the state h its intervention site reads, and the site's own
fused tensors (the stacked gate, value and rotation rows, edit by edit in the order `fuse`
stacks them), put through the same gate function as the serving path (`floored_gate`). The
per-edit changes at a layer add up to the site's change.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import InputError
from .names import edit_name, rev_name
from .store import refs, revisions

if TYPE_CHECKING:
    import torch

    from .api import Ledger
    from .baft.hooks import InterventionSite
    from .compose import Block

MAX_NEW_TOKENS = 4096
MAX_TOP_K = 100


@dataclass
class Firing:
    """One edit firing at one position: its gate after the floor (the largest over its bases)
    and the L2 norm of the change it writes there."""
    edit: str           # "edit-N"
    layer: int
    weight: float
    norm: float


@dataclass
class TokenExplanation:
    index: int          # position in the sequence (prompt tokens first, then generated ones)
    token: str          # the token's own text (special tokens included)
    generated: bool     # a token of the greedy continuation, not of the prompt
    firings: list[Firing]   # strongest first


@dataclass
class Explanation:
    revision: str       # "rev-N"
    prompt: str
    continuation: str   # greedy continuation at the revision ("" when max_new_tokens is 0)
    tokens: list[TokenExplanation]
    top_next: list[dict]    # [{"token", "p_revision", "p_base"}]: after the prompt, top_k by p_revision

    def to_dict(self) -> dict:
        return asdict(self)


def explain(ledger: "Ledger", prompt: str, *, rev: str = "HEAD", max_new_tokens: int = 0,
            top_k: int = 5) -> Explanation:
    """Per token of `prompt` and of its greedy continuation of up to `max_new_tokens` at `rev`,
    the active edits that fire there; and the `top_k` next tokens after the prompt with their
    probabilities at `rev` and at the base model (no edits)."""
    import torch

    from .baft.hooks import attach_sites, detach_sites
    from .text import greedy_token_ids, prompt_ids

    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"--max-new-tokens must be between 0 and {MAX_NEW_TOKENS}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InputError(f"--top-k must be between 1 and {MAX_TOP_K}")

    handle = ledger.handle
    with handle.engine.connect() as conn:
        rid = refs.resolve(conn, rev or "HEAD")
        ids = revisions.active_set(conn, rid)
    composed = handle.compose(ids, rid)
    blocks = handle.blocks_of(ids)
    model, tok = composed.model, composed.tokenizer
    device = next(model.parameters()).device

    p_ids = prompt_ids(tok, prompt)
    if not p_ids:
        raise InputError("the prompt tokenises to nothing")
    with torch.no_grad():
        new_ids = greedy_token_ids(model, tok, [prompt], max_new_tokens)[0] if max_new_tokens else []
        seq = torch.tensor([p_ids + new_ids], dtype=torch.long, device=device)
        states, logits = _forward_keeping_states(composed, seq)
        per_position = _firings(composed.sites, _edits_by_layer(blocks, composed.sites), states, seq.shape[1])
        sites = dict(composed.sites)
        detach_sites(sites)         # the base model: the revision's sites off for one pass
        try:
            base_logits = model(input_ids=seq[:, :len(p_ids)], use_cache=False).logits[0, -1]
        finally:
            attach_sites(handle.base.layers, sites)
    p_rev = torch.softmax(logits[len(p_ids) - 1].float(), -1)
    p_base = torch.softmax(base_logits.float(), -1)
    top = torch.topk(p_rev, min(top_k, p_rev.numel()))
    top_next = [{"token": tok.decode([i]), "p_revision": float(p_rev[i]), "p_base": float(p_base[i])}
                for i in top.indices.tolist()]
    all_ids = p_ids + new_ids
    tokens = [TokenExplanation(index=i, token=piece, generated=i >= len(p_ids), firings=per_position[i])
              for i, piece in enumerate(token_texts(tok, all_ids))]
    return Explanation(revision=rev_name(rid), prompt=prompt,
                       continuation=tok.decode(new_ids, skip_special_tokens=True),
                       tokens=tokens, top_next=top_next)


def token_texts(tok, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text, so that the pieces join to it. A token that
    ends inside a UTF-8 character (byte-level vocabularies split them) gets "" and the token
    that completes the character gets all of it, where decoding tokens one by one would show
    "\ufffd" for each part."""
    out, done = [], ""
    for i, t in enumerate(ids):
        text = tok.decode(ids[: i + 1])
        if not text.startswith(done):           # the decoder rewrote earlier text: this token alone
            out.append(tok.decode([t]))
            done = text
        elif text.endswith("\ufffd") and i + 1 < len(ids):
            out.append("")                      # an unfinished character: the next token shows it
        else:
            out.append(text[len(done):])
            done = text
    return out


def _forward_keeping_states(composed, seq: "torch.Tensor") -> tuple[dict[int, "torch.Tensor"], "torch.Tensor"]:
    """One pass of the composed model over seq (1 x T): the logits (T x V) and, per edited
    layer, the block's output h (T x d) as its intervention site reads it (a hook put before
    the site's own, so it sees the output before the edits' change is added)."""
    layers = composed.base.layers
    states: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            states[layer] = h[0].detach()
        return hook

    handles = [layers[layer].register_forward_hook(keep(layer), prepend=True) for layer in composed.sites]
    try:
        logits = composed.model(input_ids=seq, use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return states, logits


def _edits_by_layer(blocks: list["Block"], sites: dict[int, "InterventionSite"]) -> dict[int, list[tuple[int, int]]]:
    """Per edited layer, (edit id, rank) in the order `fuse` stacks the blocks (edit id order),
    checked against the site's total rank."""
    out: dict[int, list[tuple[int, int]]] = {}
    for b in sorted(blocks, key=lambda b: b.edit_id):
        out.setdefault(b.layer, []).append((b.edit_id, int(b.tensors["R"].shape[0])))
    for layer, edits in out.items():
        site = sites.get(layer)
        if site is None or site.fused.rank != sum(r for _, r in edits):
            raise RuntimeError(f"the composed site at layer {layer} does not hold the revision's blocks")
    return out


def _firings(sites: dict[int, "InterventionSite"], by_layer: dict[int, list[tuple[int, int]]],
             states: dict[int, "torch.Tensor"], length: int) -> list[list[Firing]]:
    """Per position (length of them), the edits whose gate after the floor is above 0 there,
    strongest first (ties: by layer, then edit id)."""
    found: list[list[tuple[float, int, int, Firing]]] = [[] for _ in range(length)]
    for layer, edits in sorted(by_layer.items()):
        weights, changes = edit_gates_and_changes(sites[layer], states[layer], edits)
        for (eid, _), g, change in zip(edits, weights, changes):
            if change is None:
                continue
            norms = change.norm(dim=-1)
            for t in (g > 0).nonzero().flatten().tolist():
                f = Firing(edit=edit_name(eid), layer=layer, weight=float(g[t]), norm=float(norms[t]))
                found[t].append((-f.weight, layer, eid, f))
    return [[f for *_, f in sorted(row, key=lambda x: x[:3])] for row in found]


def edit_gates_and_changes(site: "InterventionSite", h: "torch.Tensor", edits: list[tuple[int, int]]
                           ) -> tuple[list["torch.Tensor"], list["torch.Tensor | None"]]:
    """For each (edit id, rank) of a site's fused stack, in stacking order: its weight per
    position (T: the largest gate after the floor over its bases) and its change (T x d; None
    where it fires nowhere), from the fused buffers the site's forward uses."""
    import torch
    from torch.nn import functional as F

    from .baft.layer import floored_gate

    fused = site.fused
    n = fused.rank
    h = h.float()
    w, bias, r_t = fused.in_weight.float(), fused.in_bias.float(), fused.R_t.float()
    s = torch.sigmoid(F.linear(h, w[:n], bias[:n]))
    gate = floored_gate(s, fused.floor.float(), fused.floor_scale.float()) if fused.has_floor else s
    value = F.linear(h, w[n:], bias[n:])
    weights, changes, start = [], [], 0
    for _, rank in edits:
        sl = slice(start, start + rank)
        start += rank
        g = gate[:, sl]
        weights.append(g.max(-1).values)
        changes.append(F.linear(g * value[:, sl], r_t[:, sl]) if bool((g > 0).any()) else None)
    return weights, changes
