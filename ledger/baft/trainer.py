"""The trainer of BaFT edits.

The model arrives with the parent revision's fused interventions attached and frozen; each new
block is added beside them at its layer, so an edit is trained in exactly the composition it
will be deployed in. Only the new blocks' parameters receive gradients. Several facts can be
trained together (`ledger add --batch K`): one block per fact, one optimisation, so each fact
keeps its own record and can be reverted alone.

Loss of one step, on one padded batch of "edit" rows and "unrelated" rows:

    CE(target_new | edit rows)                                   make the edit
  + locality_weight * KL(parent || edited) over unrelated rows    leave the rest alone
  + gate_weight * mean gate s where the edit must not fire        keep the gate shut there
  + gate_open_weight * -log s at the subject's last token         ... and open on the subject

Edit rows: the prompt, the fact's rephrase prompts (when `train_on_rephrases`), and the prompt
behind short fixed prefixes (generalisation, as ROME does). With `edit_positions="subject"`
(BaFT's default) a block changes its own fact's edit rows only at the subject's tokens, so the
edit must be carried by the subject's representation (ROME's finding); everywhere else its
gate is trained shut, so at serve time the gate decides where it fires. Unrelated rows: the
fact's own locality prompts continued by the parent (when `train_on_locality`), the relation
template filled with generic subjects (hard negatives), a few neutral sentences, and the
prompts + targets of edits already active (a retention set, so old edits survive new ones).
The parent's distributions on the unrelated rows are computed once, before the new blocks
exist.

The gate terms read the gate before its floor (see layer.py), from the edited block's cached
input, on every row.

Speed, without changing what is learned (tests/test_baft.py checks gradients and results
against the plain path): the blocks below the edited one are replayed from one cached pass,
the output head runs only at the positions the loss reads, and with a gate floor a step runs
the blocks above only on the edit rows and the unrelated rows where a new gate is open
(elsewhere the new blocks change nothing, so those rows' KL and gradient are exactly 0), and
the rows run are packed, without pads (text.py), and a row runs from the first position a new
block acts on: before it (a BaFT edit acts at the subject's tokens) the states are the parent's
whatever the parameters, so their keys and values are recorded once and read by every step
(text.PrefixKV). `train_dtype="bfloat16"` is the one option
that trades exactness for speed: the blocks above the edited one then run in bfloat16.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import StateError
from ..facts import Fact
from ..models import hidden_size
from ..text import Batch, cache_keyword, head_matches_logits, make_batch, prompt_ids
from .packing import PrefixKV, packed_inputs, packing_works, prefix_split_works, split_inputs
from .config import MAX_PREFIXES, BaftConfig
from .hooks import InterventionSite
from .layer import BaftBlock, FusedIntervention

# Contexts put before the prompt in training (`n_prefixes`: the first n), so the edit holds
# behind other text. Appending keeps what `n_prefixes` = k means for stored edits.
PREFIXES = ("Here is a fact. ", "As everyone knows, ", "In short: ", "Note that ",
            "I read this yesterday: ", "According to the encyclopedia, ", "It is often said that ",
            "The answer to the question is simple. ")
assert len(PREFIXES) == MAX_PREFIXES
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


# The gate's key init: the gate is ~0.95 at the key and ~0.05 this share of the key's distance
# closer to the unrelated states' mean, or at the closest unrelated state if that is further.
KEY_MARGIN = 0.25

# A fast step runs and back-propagates its rows in groups of at most this many tokens (a
# batch of 100 facts holds about 10,000), so that the activations of a large batch need not
# all be held at once; one fact's rows (about 100 tokens) are one group.
STEP_TOKENS = 2048


class _Captured(Exception):
    """Ends the set-up pass at the edited block: nothing above it is needed there."""


@dataclass
class Step:
    """One evaluation of the loss (EditProblem.step)."""
    loss: float
    parts: dict[str, float]
    reached: list[bool]                 # per fact
    pending: torch.Tensor | None        # the loss graph not yet back-propagated

    def backward(self) -> None:
        if self.pending is not None and self.pending.requires_grad:
            self.pending.backward()
        self.pending = None


@dataclass
class TrainedEdit:
    layer: int
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float | int | bool] = field(default_factory=dict)


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


def subject_positions(tok, prompt: str, subject: str | None) -> list[int]:
    """Token positions of the subject's last occurrence in the prompt (as `prompt_ids`
    tokenises it); [] when there is no subject or it does not occur."""
    if not subject:
        return []
    start = prompt.rfind(subject)
    if start < 0:
        start = prompt.lower().rfind(subject.lower())
    if start < 0:
        return []
    end = start + len(subject)
    enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
    if list(enc["input_ids"]) != prompt_ids(tok, prompt):
        return []
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]


def _map_hidden(out, fn):
    """fn applied to a decoder block's hidden-state output (a tensor, or the first item of the
    tuple older and GPT-2 style blocks return)."""
    return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)


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


class _LowPrecisionAbove:
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


@dataclass
class _Rows:
    pairs: list[tuple[str, str | None]]
    owner: list[int]                        # fact index of an edit row, -1 for an unrelated row
    subject_pos: list[list[int]]            # per edit row
    # Unrelated rows that hold a fact's own subject (other relations of the subject, the
    # prompt continued after its new target), by index among the unrelated rows: the KL reads
    # them from read_from on, their subject's states are no negatives for the gate's key, and
    # the stop rule does not wait for them (the gate is open there by design).
    subject_rows: dict[int, tuple[list[int], int]] = field(default_factory=dict)


def _build_rows(model, tok, facts: list[Fact], cfg: BaftConfig, retention: list[tuple[str, str]],
                rng: random.Random, extra: list[list[str]], others: list[list[str]]) -> _Rows:
    pairs: list[tuple[str, str | None]] = []
    owner: list[int] = []
    for k, fact in enumerate(facts):
        prompts = [fact.prompt]
        if cfg.train_on_rephrases:
            prompts += list(fact.rephrase_prompts)
        prompts += extra[k]          # other wordings of the relation (wordings.py)
        prompts += [pre + fact.prompt for pre in PREFIXES[: cfg.n_prefixes]]
        pairs += [(p, fact.target_new) for p in prompts]
        owner += [k] * len(prompts)
    subject_pos = [subject_positions(tok, p, facts[k].subject) for (p, _), k in zip(pairs, owner)]

    texts: list[str] = []
    own_subjects = {(f.subject or "").lower() for f in facts}
    # The configured number of generic negatives per fact, in a batch too: the other facts'
    # rows are no KL rows for a block (it does not act there) and, with a kept gate, their
    # gate terms train nothing, so they are no substitute (with 2 per fact, a batch of 100
    # reached locality 0.939 against 0.985 one by one).
    per_fact = cfg.neg_subjects
    loc_prompts, neg_prompts = [], []
    for fact in facts:
        if cfg.train_on_locality:
            loc_prompts += [lp.prompt for lp in fact.locality_prompts]
        relation = fact.relation
        if per_fact and relation and relation.count("{}") == 1:
            pool = [x for x in GENERIC_SUBJECTS if x.lower() not in own_subjects]
            picked = pool if len(pool) <= per_fact else rng.sample(pool, per_fact)
            neg_prompts += [relation.format(x) for x in picked]
            words = (fact.subject or "").split()
            if cfg.near_miss_negatives and len(words) > 1:
                neg_prompts += [relation.format(w) for w in dict.fromkeys(words) if len(w) > 2]
    if len(facts) > 1:      # facts of one relation in a batch draw the same negatives
        neg_prompts = list(dict.fromkeys(neg_prompts))
    # A locality prompt continued by the parent's OWN greedy continuation: the KL then
    # protects what the model actually goes on to say there, not just the next token.
    texts += continue_greedily(model, tok, loc_prompts + neg_prompts,
                               [cfg.continuation_tokens] * len(loc_prompts) + [cfg.neg_continuation_tokens] * len(neg_prompts))
    texts += list(NEUTRAL)
    n = cfg.retention_samples * max(1, min(len(facts), 4))
    keep = _pick_retention(tok, facts, retention, n, rng)
    texts += [p + " " + t.strip() for p, t in keep]
    # The subject in other relations, continued by the parent: the edit changes one relation
    # of its subject, not every prompt that names it.
    subject_rows: dict[int, tuple[list[int], int]] = {}
    own = [(k, p) for k, ps in enumerate(others) for p in ps]
    for (k, p), text in zip(own, continue_greedily(model, tok, [p for _, p in own], cfg.neg_continuation_tokens)):
        subject_rows[len(texts)] = (subject_positions(tok, text, facts[k].subject), 0)
        texts.append(text)
    # The prompt (and up to after_target_wordings of its other wordings) with its new target,
    # continued by the parent: after the new answer the edited model should go on as the
    # parent does after it, not say the answer again.
    if cfg.after_target_tokens:
        said = []
        for k, fact in enumerate(facts):
            wordings = [fact.prompt] + extra[k][: cfg.after_target_wordings]
            said += [(k, w + " " + fact.target_new.strip()) for w in wordings]
        continued = continue_greedily(model, tok, [s for _, s in said], cfg.after_target_tokens)
        for (k, s), text in zip(said, continued):
            start = len(prompt_ids(tok, s)) - 1     # the position predicting what follows the target
            subject_rows[len(texts)] = (subject_positions(tok, text, facts[k].subject), start)
            texts.append(text)
    pairs += [(t, None) for t in texts]
    owner += [-1] * len(texts)
    return _Rows(pairs, owner, subject_pos, subject_rows)


def _pick_retention(tok, facts: list[Fact], retention: list[tuple[str, str]], n: int,
                    rng: random.Random) -> list[tuple[str, str]]:
    """At most n of the active edits' (prompt, target) pairs, as retention rows.

    All of them when they fit. Past n, half the places go to the prompts that share tokens
    with the new subjects, rarest shared tokens first: a new gate keys on its subject's
    states, and where it opened on an earlier edit in 100 edits on val it was on a shared
    token (" II" of "Largo Winch II" on "John Paul II", docs/quality.md). The other
    half is a random sample, for the earlier prompts that no token links to the new ones.
    """
    if len(retention) <= n:
        return list(retention)
    subject_ids = set()
    for fact in facts:
        if fact.subject:
            for text in (fact.subject, " " + fact.subject):
                subject_ids.update(tok(text, add_special_tokens=False)["input_ids"])
    shared = [set(tok(p, add_special_tokens=False)["input_ids"]) & subject_ids for p, _ in retention]
    df = Counter(t for ids in shared for t in ids)     # how many earlier prompts hold each token
    score = [sum(1.0 / df[t] for t in ids) for ids in shared]
    order = list(range(len(retention)))
    rng.shuffle(order)                              # ties in a random order
    linked = sorted((i for i in order if score[i] > 0), key=lambda i: -score[i])[: n // 2]
    chosen = set(linked)
    rest = [i for i in order if i not in chosen]
    picked = linked + rest[: n - len(linked)]
    return [retention[i] for i in sorted(picked)]


class EditProblem:
    """The fixed batch, masks and parent distributions of one training run, and its loss.

    `loss()` is the objective; `fast()` switches the optimised evaluation of it on (replayed
    lower blocks, output head only where the loss reads), which gives the same value and
    gradients as the plain path.
    """

    def __init__(self, model, tok, sites: dict[int, InterventionSite], layers, facts: list[Fact],
                 cfg: BaftConfig, *, layer: int, retention: list[tuple[str, str]] = (),
                 extra_prompts: list[list[str]] | None = None, other_prompts: list[list[str]] | None = None):
        self.model, self.cfg, self.layer, self.layers = model, cfg, layer, layers
        self.device = device = next(model.parameters()).device
        rng = random.Random(cfg.seed)
        extra = [list(x) for x in extra_prompts] if extra_prompts is not None else [[] for _ in facts]
        if len(extra) != len(facts):
            raise ValueError("extra_prompts needs one list per fact")
        self.n_extra = sum(len(x) for x in extra)
        others = [list(x) for x in other_prompts] if other_prompts is not None else [[] for _ in facts]
        rows = _build_rows(model, tok, facts, cfg, list(retention), rng, extra, others)
        batch = make_batch(tok, rows.pairs, device=device)
        self.batch: Batch = batch
        self.n_facts = len(facts)
        self.row_owner = owner = torch.tensor(rows.owner, device=device)
        self.n_edit = n_edit = int((owner >= 0).sum())
        self.n_unrelated = len(rows.pairs) - n_edit
        real = batch.attention_mask.bool()
        # The positions the loss reads, row-major: edit rows' target positions, then every real
        # position of the unrelated rows (KL, each ROW weighing the same: a long neutral
        # sentence must not drown the one position where a neighbour's answer is decided).
        self.read = torch.zeros_like(real)
        self.read[:n_edit] = batch.target_mask[:n_edit]
        self.read[n_edit:] = real[n_edit:]
        # Positions whose states are negatives for the gates' keys: every unrelated position
        # but a fact's own subject in the subject rows.
        self.key_neg = real.clone()
        self.key_neg[:n_edit] = False
        stop_row = torch.ones(self.n_unrelated, dtype=torch.bool, device=device)
        for i, (pos, start) in rows.subject_rows.items():
            self.read[n_edit + i, :start] = False
            self.key_neg[n_edit + i, pos] = False
            stop_row[i] = False
        self.stop_row = stop_row
        tgt_rows = torch.arange(n_edit, device=device)[:, None].expand(n_edit, real.shape[1])[batch.target_mask[:n_edit]]
        self.tgt_owner = owner[tgt_rows]
        self.target_ids = batch.next_ids[:n_edit][batch.target_mask[:n_edit]]
        self.n_tgt = len(self.target_ids)
        unrel = self.read[n_edit:]
        row_len = unrel.sum(1, keepdim=True).float()
        self.pos_weight = (1.0 / row_len).expand_as(unrel)[unrel] / max(1, self.n_unrelated)
        self.row_of_pos = torch.arange(self.n_unrelated, device=device)[:, None].expand_as(unrel)[unrel]

        # Where each block acts while training (its output is multiplied by this mask), and
        # where its gate is pushed shut / open.
        subject_mode = cfg.method == "baft" and cfg.edit_positions == "subject"
        B, T = real.shape
        self.apply_masks, self.close_masks, self.open_masks = [], [], []
        for k in range(len(facts)):
            apply = real.clone()
            close = torch.zeros_like(real)
            close[n_edit:] = self.key_neg[n_edit:]
            opened = torch.zeros_like(real)
            for i in range(n_edit):
                if rows.owner[i] != k:
                    if cfg.method == "baft":
                        apply[i] = False             # another fact's row: not this block's job
                        close[i] = real[i]
                    continue
                pos = rows.subject_pos[i]
                if pos:
                    opened[i, pos[-1]] = True
                if subject_mode and pos:
                    apply[i] = False
                    apply[i, pos] = True
                    if cfg.gate_close_edit_rest:
                        close[i] = real[i]
                        close[i, pos] = False
            self.apply_masks.append(apply[..., None].float())
            self.close_masks.append(close)
            self.open_masks.append(opened)
        self.subject_found = sum(1 for i in range(n_edit) if rows.subject_pos[i]) / max(1, n_edit)

        own_site = layer not in sites
        if own_site:
            site = InterventionSite(layer, FusedIntervention([], hidden_size(model)))
            site.attach(layers[layer])
            sites = {**sites, layer: site}
        self.own_site, self.site = own_site, sites[layer]

        # One no-grad pass of the parent over every row up to the edited block, whose raw output
        # the steps replay; it ends there (nothing above is needed yet). It runs packed where
        # the model gives the same results so (checked once per model, text.py). The parent's
        # distributions on the unrelated rows are taken later, on first need, and only for
        # the rows a step runs (reference()): with a kept, floored gate that is mostly none.
        self._head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_ok = self._head is not None and head_matches_logits(model)
        self.packed = self.head_ok and packing_works(model)
        captured: dict[str, object] = {}

        def grab_output(module, args, out):
            captured["out"] = out
            raise _Captured

        grab = layers[layer].register_forward_hook(grab_output, prepend=True)
        try:
            with torch.no_grad():
                inputs, pk, _ = self._layout(batch.input_ids, batch.attention_mask, self.read)
                inputs.pop("read")
                try:
                    (model.base_model if self.head_ok else model)(**inputs, use_cache=False)
                except _Captured:
                    pass
        finally:
            grab.remove()
        if "out" not in captured:
            raise RuntimeError(f"decoder block {layer} did not run in the model's forward pass")
        self._site_out = captured["out"]
        if pk is not None:  # back to the padded layout (pads: 0, never read: right padding)
            def unpack(h):
                padded = h.new_zeros(*real.shape, h.shape[-1])
                padded[real] = h[pk.valid]
                return padded
            self._site_out = _map_hidden(self._site_out, unpack)
        # The parent's log-probabilities at the unrelated read positions, filled row by row
        # on first need: _ref_index[i] is position i's row in _ref_logp, -1 until computed.
        vocab = self._head.weight.shape[0] if self._head is not None else model.config.vocab_size
        self._ref_logp = torch.empty(0, vocab, device=device)
        self._ref_index = torch.full((len(self.row_of_pos),), -1, dtype=torch.long, device=device)
        self._site_h = (self._site_out[0] if isinstance(self._site_out, tuple) else self._site_out).detach()
        self.read_row = self.read.nonzero()[:, 0]
        # The positions a step needs: up to each row's last read position. An edit row's last
        # token (its target's last) predicts nothing the loss reads, and with causal attention
        # no position reads it: packed steps leave it out.
        cols = torch.arange(real.shape[1], device=device)
        last_read = torch.where(self.read, cols, torch.full_like(cols, -1)).amax(1, keepdim=True)
        self.needed = real & (cols[None, :] <= last_read)
        # Per row, the first position where a new block may act or the loss reads: before it
        # the hidden states are the parent's at every layer whatever the parameters (a block
        # trained at the subject's tokens changes nothing before them). The fast steps run a
        # row from there on, over the recorded keys and values of its prefix (text.PrefixKV),
        # where the model gives the same results so (checked once per model).
        big = torch.full_like(cols, real.shape[1])
        first = torch.where(self.read, cols, big).amin(1)
        for apply in self.apply_masks:
            first = torch.minimum(first, torch.where(apply[..., 0] > 0, cols, big).amin(1))
        self.first_free = first
        self.split = self.packed and cfg.fast_path and prefix_split_works(model)
        self._cache_kw = cache_keyword(model.base_model) if self.split else None
        self._replay = _ReplayBelow(layers, layer, self.site, self._site_out)
        # train_dtype bfloat16: the fast steps run the blocks above the edited one in bfloat16.
        self._low = _LowPrecisionAbove(layers, layer) \
            if cfg.train_dtype == "bfloat16" and cfg.fast_path and self.head_ok else None
        # With a kept gate (gate_lr_scale 0) the gates never change, and so neither do the rows
        # a step must run: _step_gates computes them once, and each chunk's inputs are built
        # once per set of facts still training.
        self._kept: tuple | None = None
        self._fast = False
        self._inputs_cache: dict[tuple, tuple] = {}
        # Facts whose block has reached its target and is frozen (a batch: see step()).
        self.done = [False] * len(facts)
        self.separable = cfg.method == "baft"
        self.chunk_tokens = STEP_TOKENS

        # The orthogonal parametrisation draws from torch's global generator when it is set
        # up: seed it too (in a fork, leaving the caller's state alone) so edits reproduce.
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.blocks = [BaftBlock(hidden_size(model), cfg.rank, method=cfg.method,
                                     gate_bias_init=cfg.gate_bias_init, gate_floor=cfg.gate_floor,
                                     generator=gen).to(device)
                           for _ in facts]
        self.key_fisher = [False] * len(facts)     # per block: its gate's key by Fisher's direction
        if cfg.gate_key_init and cfg.method == "baft":
            self._init_gates(self._site_h)
        if cfg.rotation_init == "gradient":
            for block, q in zip(self.blocks, self._gradient_rotations(gen)):
                block.start_rotation(q)
        if cfg.gate_lr_scale == 0:
            for block in self.blocks:       # the gate stays as initialised: no gradient at all
                block.U.requires_grad_(False)
                block.c.requires_grad_(False)
        for block, mask in zip(self.blocks, self.apply_masks):
            block.train_mask = mask
            self.site.trainable.append(block)

    def _gradient_rotations(self, gen: torch.Generator) -> list[torch.Tensor]:
        """Per fact, r orthonormal directions: the top right singular vectors of the gradient of
        its target loss with respect to the edited block's output at the positions its block
        acts on (its edit rows' subject tokens), from one pass of the parent over the edit rows
        (the blocks below replayed). Where there are fewer than r such directions, random ones
        complete the basis.

        Why: R barely turns in the few steps an edit takes, so a random R makes the edit write
        in a random subspace; the idea was that along the directions the later blocks read, the
        value would carry over to unseen wordings. On val it did not, beyond noise
        (docs/quality.md)."""
        n_edit, b = self.n_edit, self.batch
        probe: dict[str, torch.Tensor] = {}

        def add_probe(module, args, out):
            def f(h):
                probe["d"] = torch.zeros_like(h, requires_grad=True)
                return h + probe["d"]
            return _map_hidden(out, f)

        tm = b.target_mask[:n_edit]
        self._replay.enter()
        self._replay.replay.output = _map_hidden(self._site_out, lambda h: h[:n_edit])
        hook = self._replay.replay.register_forward_hook(add_probe)    # after the site's own
        try:
            with torch.enable_grad():
                inputs = {"input_ids": b.input_ids[:n_edit], "attention_mask": b.attention_mask[:n_edit],
                          "use_cache": False}
                logits = self._head(self.model.base_model(**inputs).last_hidden_state[tm]) if self.head_ok \
                    else self.model(**inputs).logits[tm]
                logp = torch.log_softmax(logits.float(), -1)
                ce = -logp.gather(-1, b.next_ids[:n_edit][tm][:, None]).sum()
                [grad] = torch.autograd.grad(ce, probe["d"])
        finally:
            hook.remove()
            self._replay.replay.output = self._site_out
            self._replay.exit()
        d, r = grad.shape[-1], self.cfg.rank
        out = []
        for k, apply in enumerate(self.apply_masks):
            own = self.row_owner[:n_edit] == k
            g = grad[(apply[:n_edit, :, 0] > 0) & own[:, None]].float()
            vecs = torch.linalg.svd(g, full_matrices=False).Vh[:r] if len(g) else g.new_zeros(0, d)
            if vecs.shape[0] < r:
                vecs = torch.cat([vecs, torch.randn(r - vecs.shape[0], d, generator=gen).to(vecs)])
            out.append(torch.linalg.qr(vecs.T).Q.T.contiguous())    # orthonormal rows, same span
        return out

    @torch.no_grad()
    def _init_gates(self, h: torch.Tensor) -> None:
        h = h.float()
        neg = h[self.key_neg]
        mu = neg.mean(0)
        alpha = self.cfg.gate_key_shrinkage
        neg_scatter = None      # d x d, computed only if some key needs Fisher's direction

        def separation(direction, key):
            """(unit direction, the key's projection, the closest unrelated state's), from mu."""
            e = direction / direction.norm()
            return e, float((key - mu) @ e), float(((neg - mu) @ e).max())

        for k, (block, om) in enumerate(zip(self.blocks, self.open_masks)):
            if not om.any():
                continue
            pos = h[om]
            key = pos.mean(0)
            if (key - mu).norm() == 0:
                continue
            e, p_key, p_neg = separation(key - mu, key)
            if alpha < 1 and p_key - p_neg < KEY_MARGIN * p_key:
                # The difference of means does not set the key apart: typically a subject that
                # begins the prompt, whose state is mostly what the start of every input shares,
                # so its gate would open at the start of every input (docs/quality.md).
                # Fisher's discriminant discounts the directions the unrelated states (and
                # the subject's own states across its rows) spread along; the scatter is shrunk
                # towards the identity, as few states estimate it.
                if neg_scatter is None:
                    neg_scatter = (neg - mu).T @ (neg - mu)
                scatter = (neg_scatter + (pos - key).T @ (pos - key)) / max(1, len(neg) + len(pos) - 2)
                eye = torch.eye(len(key), dtype=h.dtype, device=h.device)
                shrunk = (1 - alpha) * scatter + alpha * float(scatter.diagonal().mean()) * eye
                fisher = separation(torch.linalg.solve(shrunk, key - mu), key)
                if (fisher[1] - fisher[2]) / fisher[1] > (p_key - p_neg) / p_key:
                    e, p_key, p_neg = fisher
                    self.key_fisher[k] = True
            width = max(p_key - p_neg, KEY_MARGIN * p_key)
            beta = 6.0 / width                      # sigmoid(+-3) at the two ends
            mid = p_key - width / 2
            block.U.copy_(block.U + (beta * e)[None, :])
            block.c.fill_(float(-beta * (mid + mu @ e)))

    def _logits_plain(self) -> torch.Tensor:
        b = self.batch
        out = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        return out[self.read]

    def _logits_fast(self, rows: torch.Tensor | None, keep: torch.Tensor | None, *, cache: bool = True) -> torch.Tensor:
        """The logits at the read positions of `rows` (all rows when None); `keep` marks those
        positions among all read positions."""
        if not self.head_ok:
            return self._logits_plain() if rows is None else self._logits_plain()[keep]
        inputs, site_out, train = self._step_inputs(rows, cache=cache)
        read = inputs.pop("read")
        self._replay.replay.output = site_out
        for block, index in zip(self.blocks, train):
            block.train_index = index
        try:
            with self._autocast():
                out = self.model.base_model(**inputs, use_cache=False)
        finally:
            self._replay.replay.output = self._site_out
            for block in self.blocks:
                block.train_index = None
        return self._head(out.last_hidden_state[read].float())

    def _autocast(self):
        if self._low is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _layout(self, ids, mask, read, start=None):
        """(model inputs, with "read": the read positions in that layout; the Packing or None;
        the prefixes' (inputs, Packing) or None) of right-padded rows: packed where self.packed
        (the real tokens only, rows kept apart by the attention mask: no pad is computed), else
        as they are; with `start` (per row) and self.split, each row from start on, its prefix
        laid out apart to be recorded once. Counts the positions run."""
        if start is not None and self.split and bool((start > 0).any()):     # split implies packed
            pre, live, sp = split_inputs(self.model, ids, mask, start.tolist())
            self._tokens_run = int(sp.live.valid.sum())
            return {**live, "read": sp.live.gather(read[mask.bool()])}, sp.live, (pre, sp.prefix)
        if self.packed:
            inputs, pk = packed_inputs(self.model, ids, mask)
            self._tokens_run = int(pk.valid.sum())
            return {**inputs, "read": pk.gather(read[mask.bool()])}, pk, None
        self._tokens_run = int(ids.numel())
        return {"input_ids": ids, "attention_mask": mask, "read": read}, None, None

    def _step_inputs(self, rows: torch.Tensor | None, *, cache: bool = True):
        """The model inputs of a fast step over `rows` (None: all), the replayed block output
        for them and each block's positions (flat indices), laid out as the step runs them: packed (see
        _layout; the needed positions only) where this model supports it, else right-padded
        and cut to the longest row (columns past it are pads for every row run). Fixed for a
        kept gate: built once."""
        key = None if rows is None else tuple(rows.tolist())
        if key in self._inputs_cache:
            inputs, site_out, train, self._tokens_run = self._inputs_cache[key]
            return dict(inputs), site_out, train
        ids, read = self.batch.input_ids, self.read
        mask = self.needed.long() if self.packed else self.batch.attention_mask
        site_out, train, start = self._site_out, list(self.apply_masks), self.first_free
        if rows is not None:
            n = int(mask[rows].sum(1).max())
            ids, mask, read = ids[rows, :n], mask[rows, :n], read[rows, :n]
            site_out = _map_hidden(site_out, lambda h: h[rows, :n])
            train = [t[rows, :n] for t in train]
            start = start[rows]
        inputs, pk, prefix = self._layout(ids, mask, read, start if self.site.trainable else None)
        real = mask.bool()
        if prefix is not None:
            inputs[self._cache_kw] = self._record_prefix(*prefix, _map_hidden(site_out, lambda h: h[real]))
        if pk is not None:
            site_out = _map_hidden(site_out, lambda h: pk.gather(h[real]))
            train = [pk.gather(t[real]) for t in train]
        # each block's positions as flat indices of the layout run (see BaftBlock.add_change)
        train = [(t.reshape(-1) > 0).nonzero().squeeze(1) for t in train]
        if self._kept is not None and cache:
            self._inputs_cache[key] = (inputs, site_out, train, self._tokens_run)
        return dict(inputs), site_out, train

    @torch.no_grad()
    def _record_prefix(self, inputs: dict, pk, site_real) -> PrefixKV:
        """The keys and values of the blocks above the edited one at the rows' prefixes, from
        one pass of the parent (no new block acts there), in the steps' precision."""
        kv = PrefixKV()
        trainable, self.site.trainable = self.site.trainable, torch.nn.ModuleList()
        self._replay.replay.output = _map_hidden(site_real, pk.gather)
        try:
            with self._autocast():
                self.model.base_model(**inputs, use_cache=False, **{self._cache_kw: kv})
        finally:
            self.site.trainable = trainable
            self._replay.replay.output = self._site_out
        kv.recording = False
        return kv

    def _keep_pos(self, rows: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(self.batch.input_ids.shape[0], dtype=torch.bool, device=self.device)
        keep[rows] = True
        return keep[self.read_row]

    @torch.no_grad()
    def reference(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The parent's log-probabilities at the unrelated read positions marked by `keep`
        (all when None), as the current path computes them (fast: replayed, packed, in the
        training precision; plain: the full forward), taken on first need, whole rows at a
        time, with the new blocks set aside."""
        n_unrel = len(self._ref_index)
        need = torch.ones(n_unrel, dtype=torch.bool, device=self.device) if keep is None else keep
        missing = need & (self._ref_index < 0)
        if bool(missing.any()):
            rows = torch.unique(self.row_of_pos[missing]) + self.n_edit
            trainable, self.site.trainable = self.site.trainable, torch.nn.ModuleList()
            try:
                keep_all = self._keep_pos(rows)
                logits = self._logits_fast(rows, keep_all, cache=False) if self._fast \
                    else self._logits_plain()[keep_all]
            finally:
                self.site.trainable = trainable
            fresh = keep_all[self.n_tgt:].nonzero().squeeze(1)
            self._ref_index[fresh] = torch.arange(len(fresh), device=self.device) + len(self._ref_logp)
            self._ref_logp = torch.cat([self._ref_logp, torch.log_softmax(logits.float(), -1)])
        return self._ref_logp[self._ref_index[need]]

    def _live_by_block(self, gates: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per block, the unrelated rows where its floored gate is open at a position it acts
        on; elsewhere its change is exactly 0. None: every unrelated row for every block (the
        plain path, no floor so no gate is ever exactly 0, or ReFT)."""
        if not self._fast or self.cfg.gate_floor <= 0 or self.cfg.method != "baft":
            return None
        out = []
        for g, apply in zip(gates, self.apply_masks):
            live = ((g.detach() > 0).any(-1) & (apply[..., 0] > 0)).any(1)
            live[: self.n_edit] = False
            out.append(live)
        return out

    def _rows_to_run(self, live: list[torch.Tensor] | None) -> torch.Tensor | None:
        """The rows a step runs above the edited block (None: all): the edit rows of the
        facts still training, and the unrelated rows where one of their blocks is live.
        Elsewhere no training block changes anything, so the row adds nothing to the gradient
        of the parameters still trained. The plain path runs every row."""
        if not self._fast:
            return None
        active = [k for k, d in enumerate(self.done) if not d] if self.separable else range(len(self.blocks))
        run = torch.zeros(self.batch.input_ids.shape[0], dtype=torch.bool, device=self.device)
        if live is None:
            run[self.n_edit:] = True
        else:
            for k in active:
                run |= live[k]
        owners = self.row_owner[: self.n_edit]
        run[: self.n_edit] = torch.isin(owners, torch.tensor(list(active), dtype=owners.dtype, device=self.device))
        return None if bool(run.all()) else run.nonzero().squeeze(1)

    def _chunks(self, rows: torch.Tensor | None) -> list[torch.Tensor | None]:
        """`rows` in consecutive groups of at most chunk_tokens needed tokens each (one group
        at least): a large batch of facts is run and back-propagated a group at a time, so its
        activations need not all be held at once. A single group is the rows as they are."""
        need = self.needed.sum(1)
        idx = torch.arange(len(need), device=self.device) if rows is None else rows
        if not self._fast or int(need[idx].sum()) <= self.chunk_tokens:
            return [rows]
        groups, cur, used = [], [], 0
        for r, n in zip(idx.tolist(), need[idx].tolist()):
            if cur and used + n > self.chunk_tokens:
                groups.append(cur)
                cur, used = [], 0
            cur.append(r)
            used += n
        groups.append(cur)
        return [torch.tensor(g, device=self.device) for g in groups]

    @contextmanager
    def fast(self):
        """Optimised evaluation of the same loss (the blocks below are replayed)."""
        self._replay.enter()
        if self._low is not None:
            self._low.enter()
        self._fast = True
        try:
            yield self
        finally:
            self._fast = False
            if self._low is not None:
                self._low.exit()
            self._replay.exit()

    def _step_gates(self):
        """(raw gates s, per block the unrelated rows where it is live) of this step, from the
        edited block's cached input (the same h the blocks see in the forward pass: nothing
        below them changes while training)."""
        if self._kept is not None and self._fast:
            return self._kept
        raw = [block.raw_gate(self._site_h) for block in self.blocks] if self.cfg.method == "baft" else []
        out = (raw, self._live_by_block([block.gate(s) for block, s in zip(self.blocks, raw)]))
        if self.cfg.method == "baft" and self.cfg.gate_lr_scale == 0 and self._fast:
            self._kept = out
        return out

    def _gate_terms(self, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(close, open) gate terms. Both read s, before the floor: a gate already below the
        floor is still pushed further down (a margin for neighbours never seen in training),
        and one below it on the subject still gets a gradient back up."""
        close = torch.zeros((), device=self.device)
        opened = torch.zeros((), device=self.device)
        if self.cfg.method != "baft":
            return close, opened
        for s, cm, om in zip(raw, self.close_masks, self.open_masks):
            if cm.any():
                if self.cfg.gate_close_pool == "max":
                    rows_c = cm.any(1)
                    masked = s.masked_fill(~cm[..., None], 0.0)[rows_c]
                    close = close + masked.amax(dim=(1, 2)).mean()
                else:
                    close = close + s[cm].mean()
            if om.any():
                opened = opened - torch.log(s[om].clamp_min(1e-6)).mean()
        return close / len(self.blocks), opened / len(self.blocks)

    def step(self) -> "Step":
        """The loss of one step over the facts still training, and per fact whether it has
        reached its target with margin with its unrelated rows back to the parent.

        One group of rows (_chunks): the loss stays a graph, and Step.backward() runs its
        backward pass (left out on the last step). Several: each group's backward pass runs
        as soon as its forward pass is done, accumulating the same gradient in .grad."""
        cfg = self.cfg
        raw, live = self._step_gates()
        close, opened = self._gate_terms(raw)
        pending = cfg.gate_weight * close + cfg.gate_open_weight * opened
        chunks = self._chunks(self._rows_to_run(live))
        tgt_logp = torch.full((self.n_tgt,), float("nan"), device=self.device)
        tgt_hit = torch.zeros(self.n_tgt, dtype=torch.bool, device=self.device)
        row_kl = torch.zeros(max(1, self.n_unrelated), device=self.device)
        active_tgt = self._active_targets()
        ce_total = kl_total = 0.0
        rows_run = tokens_run = 0
        for rows in chunks:
            keep = None if rows is None else self._keep_pos(rows)
            self._tokens_run = self.batch.input_ids.numel()
            out = (self._logits_fast(rows, keep) if self._fast else self._logits_plain()).float()
            tokens_run += self._tokens_run
            rows_run += self.batch.input_ids.shape[0] if rows is None else len(rows)
            logp = torch.log_softmax(out, -1)
            tkeep = torch.ones(self.n_tgt, dtype=torch.bool, device=self.device) if keep is None else keep[: self.n_tgt]
            n_t = int(tkeep.sum())
            tok_logp = logp[:n_t].gather(-1, self.target_ids[tkeep][:, None]).squeeze(-1)
            # CE over the targets of the facts still training, each token weighing 1/n_tgt
            # whichever facts are done, so a block's gradient does not depend on the others'.
            ce = -(tok_logp * active_tgt[tkeep]).sum() / max(1, self.n_tgt)
            tgt_logp[tkeep] = tok_logp.detach()
            tgt_hit[tkeep] = logp[:n_t].detach().argmax(-1) == self.target_ids[tkeep]
            ukeep = None if keep is None else keep[self.n_tgt:]
            ref = self.reference(ukeep)
            pos_weight = self.pos_weight if ukeep is None else self.pos_weight[ukeep]
            row_of_pos = self.row_of_pos if ukeep is None else self.row_of_pos[ukeep]
            kl_pos = (ref.exp() * (ref - logp[n_t:])).sum(-1)
            kl = (kl_pos * pos_weight).sum()
            row_kl.index_add_(0, row_of_pos, kl_pos.detach() * pos_weight * self.n_unrelated)
            part = ce + cfg.locality_weight * kl
            ce_total += ce.item()
            kl_total += kl.item()
            pending = part if pending is None else pending + part
            if len(chunks) > 1:
                if pending.requires_grad:
                    pending.backward()
                pending = None
        gate_part = cfg.gate_weight * close.item() + cfg.gate_open_weight * opened.item()
        loss = ce_total + cfg.locality_weight * kl_total + gate_part
        parts = {"loss": loss, "ce": ce_total, "kl": kl_total, "gate": close.item(),
                 "gate_open": opened.item(), "worst_kl": float(row_kl.max()),
                 "rows_run": rows_run, "tokens_run": tokens_run}
        # A fact is done when every one of its target tokens is the argmax with margin AND
        # its unrelated rows are back to the parent's distribution: stopping on the target
        # alone leaves gates open.
        reached = []
        for k in range(len(self.blocks)):
            mine = self.tgt_owner == k
            ok = bool(tgt_hit[mine].all()) and float(tgt_logp[mine].exp().min()) >= cfg.stop_prob \
                if bool(mine.any()) else True
            rows_k = self.stop_row if live is None else live[k][self.n_edit:] & self.stop_row
            worst = row_kl[: self.n_unrelated][rows_k]
            reached.append(ok and (len(worst) == 0 or float(worst.max()) <= cfg.stop_kl))
        if not self.separable:      # a ReFT block acts on every fact's rows: all or none
            reached = [all(reached)] * len(reached)
        return Step(loss, parts, reached, pending)

    def _active_targets(self) -> torch.Tensor:
        done = torch.tensor(self.done, dtype=torch.bool, device=self.device)
        return (~done[self.tgt_owner]).float()

    def finish(self, k: int) -> None:
        """Freeze fact k's block as it is: its edit rows leave the steps."""
        if not self.done[k]:
            self.done[k] = True
            self._inputs_cache.clear()      # the rows run change

    def drop_done_gradients(self) -> None:
        for k, d in enumerate(self.done):
            if d:
                for p in self.blocks[k].parameters():
                    p.grad = None           # Adam leaves a parameter without a gradient alone

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for b in self.blocks for p in b.parameters() if p.requires_grad]

    def close(self) -> None:
        self.site.trainable = torch.nn.ModuleList()
        for b in self.blocks:
            b.last_gate = None
            b.train_mask = None
        if self.own_site:
            self.site.detach()


def train_edits(model, tok, sites: dict[int, InterventionSite], layers, facts: list[Fact],
                cfg: BaftConfig, *, layer: int, retention: list[tuple[str, str]] = (),
                extra_prompts: list[list[str]] | None = None, other_prompts: list[list[str]] | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[TrainedEdit]:
    """Train one block per fact at `layer`, together, with every site in `sites` active and
    frozen. extra_prompts: per fact, more prompts that must give its target (the relation's
    other wordings, filled with the subject); other_prompts: per fact, prompts of its subject
    in other relations, whose continuations must stay the parent's."""
    started = time.perf_counter()
    problem = EditProblem(model, tok, sites, layers, facts, cfg, layer=layer, retention=retention,
                          extra_prompts=extra_prompts, other_prompts=other_prompts)
    gate = [p for b in problem.blocks for p in (b.U, b.c) if p.requires_grad]
    gate_ids = {id(p) for p in gate}
    rest = [p for p in problem.parameters() if id(p) not in gate_ids]
    groups = [{"params": rest}] + ([{"params": gate, "lr": cfg.lr * cfg.gate_lr_scale}] if gate else [])
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, 0.999))
    # Per fact, the steps its block was trained for. In a batch each block stops as its fact
    # is done (the blocks are independent on the edit rows, test_baft.py), so a batch costs
    # about what its facts cost one by one, not K times its slowest fact.
    steps_of = [cfg.steps] * len(facts)
    steps_run, last = 0, {}
    try:
        model.train(False)
        with (problem.fast() if cfg.fast_path else nullcontext()):
            for step in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                res = problem.step()
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
    finally:
        problem.close()
    for ts in tensors:
        for name, t in ts.items():
            if not torch.isfinite(t).all():
                raise StateError(f"training diverged (non-finite values in {name}): nothing was written; "
                                 "try a smaller --lr")
    shared = {**{f"final_{k}": round(v, 6) for k, v in last.items()},
              "seconds": round(time.perf_counter() - started, 3),
              "n_edit_rows": problem.n_edit, "n_unrelated_rows": problem.n_unrelated,
              "n_wording_rows": problem.n_extra,
              "subject_found": round(problem.subject_found, 3), "batch_size": len(facts)}
    if len(facts) > 1:
        shared["batch_steps"] = steps_run
    return [TrainedEdit(layer=layer, tensors=ts, stats={"steps": n, **shared, "reached_target": n < cfg.steps,
                                                        "gate_key_fisher": fisher})
            for ts, n, fisher in zip(tensors, steps_of, problem.key_fisher)]
