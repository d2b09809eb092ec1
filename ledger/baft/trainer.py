"""The trainer of one BaFT edit.

The model arrives with the parent revision's fused interventions attached and frozen; the new
block is added beside them at its layer, so the edit is trained in exactly the composition it
will be deployed in. Only the new block's parameters receive gradients.

Loss of one step, on one padded batch of "edit" rows and "unrelated" rows:

    CE(target_new | edit rows)                                   make the edit
  + locality_weight * KL(parent || edited) over unrelated rows    leave the rest alone
  + gate_weight * mean gate over unrelated rows (BaFT only)       keep the gate shut there

Edit rows: the prompt, the fact's rephrase prompts (when `train_on_rephrases`), and the prompt
behind short fixed prefixes (generalisation, as ROME does). Unrelated rows: the fact's own
locality prompts with their answers (when `train_on_locality`), a few neutral sentences, and
the prompts + targets of edits already active in the ledger (a retention set, so old edits
survive new ones). The parent's distributions on the unrelated rows are computed once, before
the new block exists.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import StateError
from ..facts import Fact
from ..models import hidden_size
from ..text import logits, make_batch
from .config import BaftConfig
from .hooks import InterventionSite
from .layer import BaftBlock, FusedIntervention

PREFIXES = ("Here is a fact. ", "As everyone knows, ", "In short: ", "Note that ")
NEUTRAL = (
    "The weather today is mild with a light breeze.",
    "She opened the window and looked at the garden.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The meeting was moved to Thursday afternoon.",
    "A triangle has three sides and three angles.",
    "He bought bread, milk and eggs at the shop.",
)

# Hard negatives with no dataset at serve time: the fact's relation template filled with other,
# generic subjects and continued by the parent itself, so the KL and gate terms keep the
# parent's behaviour on the subject's neighbours in the same relation.
GENERIC_SUBJECTS = (
    "Barack Obama", "Paris", "Microsoft", "Albert Einstein", "Tokyo", "Toyota", "William Shakespeare",
    "Germany", "Google", "Lionel Messi", "London", "Nokia", "Marie Curie", "Brazil", "the BBC",
    "Pablo Picasso",
)


@dataclass
class TrainedEdit:
    layer: int
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float | int | bool] = field(default_factory=dict)


def _edit_pairs(fact: Fact, cfg: BaftConfig) -> list[tuple[str, str]]:
    pairs = [(fact.prompt, fact.target_new)]
    if cfg.train_on_rephrases:
        pairs += [(p, fact.target_new) for p in fact.rephrase_prompts]
    pairs += [(pre + fact.prompt, fact.target_new) for pre in PREFIXES[: cfg.n_prefixes]]
    return pairs


def _unrelated_texts(model, tok, fact: Fact, cfg: BaftConfig, retention: list[tuple[str, str]],
                     rng: random.Random) -> list[str]:
    texts = []
    if cfg.train_on_locality and fact.locality_prompts:
        # A locality prompt continued by the parent's OWN greedy continuation: the KL then
        # protects what the model actually goes on to say there, not just the next token.
        texts += continue_greedily(model, tok, [lp.prompt for lp in fact.locality_prompts],
                                   cfg.continuation_tokens)
    relation = fact.relation
    if cfg.neg_subjects and relation and relation.count("{}") == 1:
        pool = [x for x in GENERIC_SUBJECTS if x.lower() != (fact.subject or "").lower()]
        picked = pool if len(pool) <= cfg.neg_subjects else rng.sample(pool, cfg.neg_subjects)
        texts += continue_greedily(model, tok, [relation.format(x) for x in picked], cfg.neg_continuation_tokens)
    texts += list(NEUTRAL)
    n = cfg.retention_samples
    keep = retention if len(retention) <= n else rng.sample(retention, n)
    texts += [p + " " + t.strip() for p, t in keep]
    return texts


@torch.no_grad()
def continue_greedily(model, tok, prompts: list[str], n_tokens: int) -> list[str]:
    """Each prompt followed by the model's greedy continuation of n_tokens (as text)."""
    if n_tokens <= 0:
        return list(prompts)
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(p + tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


class _Skip(torch.nn.Module):
    """Stands in for a decoder block below the edited one: passes the hidden state through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(torch.nn.Module):
    """Stands in for the edited decoder block: returns its cached raw output. The batch is the
    same at every step and nothing below the edited block changes during training, so this is
    exact, and it saves the forward pass through every block up to the edited one."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output


class _ReplayBelow:
    def __init__(self, layers, layer: int, site: InterventionSite, output):
        self.layers, self.layer, self.site = layers, layer, site
        self.originals = [layers[i] for i in range(layer + 1)]
        self.replay = _Replay(output)

    def enter(self) -> None:
        for i in range(self.layer):
            self.layers[i] = _Skip()
        self.layers[self.layer] = self.replay
        self.site.attach(self.replay)      # the site's hook moves to the stand-in

    def exit(self) -> None:
        for i, module in enumerate(self.originals):
            self.layers[i] = module
        self.site.attach(self.layers[self.layer])


def train_edit(model, tok, sites: dict[int, InterventionSite], layers, fact: Fact,
               cfg: BaftConfig, *, layer: int, retention: list[tuple[str, str]] = (),
               progress: Callable[[int, int], None] | None = None) -> TrainedEdit:
    """Train one block at `layer` with every site in `sites` active and frozen."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    edit_pairs = _edit_pairs(fact, cfg)
    unrelated = _unrelated_texts(model, tok, fact, cfg, list(retention), rng)
    batch = make_batch(tok, edit_pairs + [(t, None) for t in unrelated], device=device)
    n_edit = len(edit_pairs)
    target_mask = batch.target_mask[:n_edit]
    target_ids = batch.next_ids[:n_edit][target_mask]
    # KL over every real position of the unrelated rows, each ROW weighing the same: a long
    # neutral sentence must not drown the one position where a neighbour's answer is decided.
    unrel_mask = batch.attention_mask[n_edit:].bool()
    row_len = unrel_mask.sum(1, keepdim=True).float()
    pos_weight = (1.0 / row_len).expand_as(unrel_mask)[unrel_mask] / len(unrelated)
    row_of_pos = torch.arange(len(unrelated), device=device)[:, None].expand_as(unrel_mask)[unrel_mask]

    own_site = layer not in sites
    if own_site:
        site = InterventionSite(layer, FusedIntervention([], hidden_size(model)))
        site.attach(layers[layer])
        sites = {**sites, layer: site}
    site = sites[layer]

    # One no-grad pass of the parent: its distributions on the unrelated rows, and the raw
    # output of the edited block, which the blocks below can then stop recomputing.
    captured: dict[str, object] = {}
    grab = layers[layer].register_forward_hook(lambda m, a, out: captured.setdefault("out", out), prepend=True)
    try:
        with torch.no_grad():
            ref_logp = torch.log_softmax(logits(model, batch)[n_edit:].float(), -1)[unrel_mask]
    finally:
        grab.remove()
    replay = _ReplayBelow(layers, layer, site, captured["out"]) if cfg.replay_lower_layers else None

    # The orthogonal parametrisation draws from torch's global generator when it is set up:
    # seed it too (in a fork, leaving the caller's state alone) so an edit is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        block = BaftBlock(hidden_size(model), cfg.rank, method=cfg.method,
                          gate_bias_init=cfg.gate_bias_init, generator=gen).to(device)
    site.trainable.append(block)
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps_run, last = 0, {}
    try:
        model.train(False)
        if replay:
            replay.enter()
        for step in range(cfg.steps):
            out = logits(model, batch).float()
            logp = torch.log_softmax(out, -1)
            edit_logp = logp[:n_edit][target_mask]
            tok_logp = edit_logp.gather(-1, target_ids[:, None]).squeeze(-1)
            ce = -tok_logp.mean()
            cur = logp[n_edit:][unrel_mask]
            kl_pos = (ref_logp.exp() * (ref_logp - cur)).sum(-1)
            kl = (kl_pos * pos_weight).sum()
            # the worst unrelated row: done only when every one of them is back to the parent
            worst_kl = torch.zeros(len(unrelated), device=device).index_add_(
                0, row_of_pos, kl_pos.detach() * pos_weight * len(unrelated)).max()
            gate_term = torch.zeros((), device=device)
            if cfg.method == "baft" and block.last_gate is not None:
                gate_term = block.last_gate[n_edit:][unrel_mask].mean()
            loss = ce + cfg.locality_weight * kl + cfg.gate_weight * gate_term
            last = {"loss": loss.item(), "ce": ce.item(), "kl": kl.item(), "gate": gate_term.item(),
                    "worst_kl": worst_kl.item()}
            # Done when the target is the argmax with margin AND the unrelated text is back to
            # the parent's distribution: stopping on the target alone leaves the gate half open.
            reached = bool((edit_logp.argmax(-1) == target_ids).all()
                           and tok_logp.exp().min() >= cfg.stop_prob and worst_kl.item() <= cfg.stop_kl)
            if reached and step >= cfg.min_steps:
                break  # the checked state is the one we keep: no update after the check
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps_run = step + 1
            if progress:
                progress(steps_run, cfg.steps)
        tensors = block.tensors()
    finally:
        if replay:
            replay.exit()
        site.trainable = torch.nn.ModuleList()
        block.last_gate = None
        if own_site:
            site.detach()
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise StateError(f"training diverged (non-finite values in {name}): nothing was written; "
                             "try a smaller --lr")
    stats = {"steps": steps_run, "final_loss": round(last.get("loss", float("nan")), 6),
             "final_ce": round(last.get("ce", float("nan")), 6),
             "final_kl": round(last.get("kl", float("nan")), 6),
             "final_gate": round(last.get("gate", float("nan")), 6),
             "final_worst_kl": round(last.get("worst_kl", float("nan")), 6),
             "reached_target": steps_run < cfg.steps,
             "seconds": round(time.perf_counter() - started, 3),
             "n_edit_rows": n_edit, "n_unrelated_rows": len(unrelated)}
    return TrainedEdit(layer=layer, tensors=tensors, stats=stats)
