"""The BaFT objective of one training run: the loss of a step, the gate's starting key, and the
rule that says when a fact is done.

The model arrives with the parent revision's fused interventions attached and frozen; each new
block (one per fact) is added beside them at its layer, so an edit is trained in exactly the
composition it will be deployed in. Only the new blocks' parameters receive gradients.

Loss of one step, over the rows of rows.py:

    CE(target_new | edit rows)                                   make the edit
  + locality_weight * KL(parent || edited) over unrelated rows    leave the rest alone
  + gate_weight * mean gate s where the edit must not fire        keep the gate shut there
  + gate_open_weight * -log s at the subject's last token         ... and open on the subject

The parent's distributions on the unrelated rows are taken with the new blocks set aside, once
per row, on first need. The gate terms read the gate before its floor (see layer.py), from the
hidden state the new blocks read (the edited decoder block's output), which nothing trained
changes: it is computed once, in a set-up pass.

A fact is done when each of its target tokens is the argmax with probability at least
`stop_prob` and its unrelated rows are back to the parent (KL at most `stop_kl`).

The objective reads the model through `Logits`, "the logits at the read positions of these
rows": `plain.PlainLogits` runs the whole model forward; `fast.FastLogits` computes the same
values faster (tests/test_baft.py holds the two equal in loss and gradients).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from ..facts import Fact
from ..models import hidden_size
from ..text import head_matches_logits, make_batch
from .config import BaftConfig
from .hooks import InterventionSite
from .layer import BaftBlock, FusedIntervention
from .packing import block_output, map_hidden, packing_works
from .baserows import BaseRows, active_sites
from .rows import TrainingRows, build_rows, start_words, subject_positions

# The gate's key init: the gate is ~0.95 at the key and ~0.05 this share of the key's distance
# closer to the unrelated states' mean, or at the closest unrelated state if that is further.
KEY_MARGIN = 0.25
# Below this floored gate at the fact's own prompt, the gate's ramp is set from the prompt:
# at 0.006 ("Bandra, in" after 214 edits) the value does not reach the target in 60 steps; at
# 0.12 ("Jakarta is a twin city of" on a new ledger) it does in 30.
PROMPT_GATE = 0.1


class Logits(Protocol):
    """How a step reads the model: the logits at the read positions of some rows."""

    tokens_run: int     # the positions the last `logits` call ran through the model

    def __enter__(self) -> "Logits":
        """The model arranged for this path's steps, until exit."""

    def __exit__(self, *exc) -> None:
        """The model whole again."""

    def live_rows(self, raw_gates: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per block, the rows where it can change anything this step (None: every row)."""

    def row_groups(self, live: list[torch.Tensor] | None, active: list[int]) -> list[torch.Tensor | None]:
        """The rows a step runs, in the groups it runs and back-propagates them in (None: all
        rows), for the blocks still training (`active`)."""

    def logits(self, rows: torch.Tensor | None, *, parent: bool = False) -> torch.Tensor:
        """(read positions of `rows`, vocabulary): the logits at the read positions of these
        rows (None: all rows), row-major. parent: the new blocks are set aside."""


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


def _kept(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """t's entries at the positions `keep` marks (all of t when None)."""
    return t if keep is None else t[keep]


class EditProblem:
    """The rows, new blocks and parent distributions of one training run, and its loss."""

    def __init__(self, model, tok, sites: dict[int, InterventionSite], layers, facts: list[Fact],
                 cfg: BaftConfig, *, layer: int, retention: list[tuple[str, str]] = (),
                 extra_prompts: list[list[str]] | None = None, other_prompts: list[list[str]] | None = None,
                 after_prompts: list[list[str]] | None = None, base_rows: BaseRows | None = None,
                 negative_prompts: list[list[str]] | None = None):
        self.model, self.cfg, self.layer, self.layers = model, cfg, layer, layers
        self.device = device = next(model.parameters()).device
        rng = random.Random(cfg.seed)
        extra = [list(x) for x in extra_prompts] if extra_prompts is not None else [[] for _ in facts]
        if len(extra) != len(facts):
            raise ValueError("extra_prompts needs one list per fact")
        self.n_extra = sum(len(x) for x in extra)
        others = [list(x) for x in other_prompts] if other_prompts is not None else [[] for _ in facts]
        cont = None if base_rows is None else partial(base_rows.continue_greedily, model, tok, layers, dict(sites))
        texts = build_rows(model, tok, facts, cfg, list(retention), rng, extra, others, after_prompts, cont)
        self.rows = rows = TrainingRows(tok, texts, cfg, len(facts), device)
        # The base's reference distributions are reused in the default precision only (a
        # bfloat16 pass gives other values).
        self.base_rows = base_rows if cfg.train_dtype == "float32" else None

        self.own_site = layer not in sites
        if self.own_site:
            site = InterventionSite(layer, FusedIntervention([], hidden_size(model)))
            site.attach(layers[layer])
            sites = {**sites, layer: site}
        self.site = sites[layer]

        # The edited block's raw output for every row, from one no-grad pass of the parent that
        # ends there; run packed where the model gives the same results so (checked once per
        # model, packing.py). Its hidden state is the h every new block and gate reads.
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_ok = self.head is not None and head_matches_logits(model)
        batch = rows.batch
        self.site_out = block_output(model, layers[layer], batch.input_ids, batch.attention_mask,
                                     packed=self.head_ok and packing_works(model), base=self.head_ok)
        self.site_h = (self.site_out[0] if isinstance(self.site_out, tuple) else self.site_out).detach()
        # Per unrelated row: whether every parent gate is shut along it, so the parent's
        # distributions there are the base's (baserows.py). Read for free from the set-up pass
        # where every active parent edit sits at this layer (the site reads site_h); with
        # edits at other layers, no reuse.
        self._shut = [False] * rows.n_unrelated
        if self.base_rows is not None:
            others = [k for k in active_sites(sites) if k != layer]
            if not others:
                opened = self.site.fused.opens(self.site_h) & batch.attention_mask.bool()
                self._shut = (~opened[rows.n_edit:].any(1)).tolist()
        # The parent's log-probabilities at the unrelated read positions, filled row by row
        # on first need: _ref_index[i] is position i's row in _ref_logp, -1 until computed.
        vocab = self.head.weight.shape[0] if self.head is not None else model.config.vocab_size
        self._ref_logp = torch.empty(0, vocab, device=device)
        self._ref_index = torch.full((len(rows.row_of_pos),), -1, dtype=torch.long, device=device)
        # Facts whose block has reached its target and is frozen (a batch: see step()).
        self.done = [False] * len(facts)
        # The probability each target token must reach for the stop rule: stop_prob on the
        # fact's own prompt and rephrases, stop_prob_wordings (where set) on the rows the
        # ledger adds. Fixed for the run.
        self.stop_need = torch.full((rows.n_tgt,), cfg.stop_prob, device=device)
        if cfg.stop_prob_wordings is not None:
            self.stop_need[~rows.tgt_given] = cfg.stop_prob_wordings
        # Each target token's probability at the last step (NaN: not run yet), for target_focus.
        self.last_tgt_p = torch.full((rows.n_tgt,), float("nan"), device=device)
        # A BaFT block acts on its own fact's rows only; a ReFT block on every row.
        self.separable = cfg.method == "baft"
        # A kept gate (gate_lr_scale 0) never changes: its raw values are computed once.
        self.gate_kept = cfg.method == "baft" and cfg.gate_lr_scale == 0
        self._raw: list[torch.Tensor] | None = None
        self._open: tuple[list[torch.Tensor] | None] | None = None

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
        self.key_prompt = [False] * len(facts)     # per block: its gate's ramp set from the prompt
        if cfg.gate_key_init and cfg.method == "baft":
            starts = self._start_states(tok, [start_words(f, cfg.start_negatives) for f in facts])
            # The subject's states in other relations (relation_negatives), for the ramp.
            rel = self._subject_states(tok, facts, negative_prompts or [[] for _ in facts])
            self._init_gates(self.site_h, starts, rel)
        if cfg.rotation_init == "gradient":
            for block, q in zip(self.blocks, self._gradient_rotations(gen)):
                block.start_rotation(q)
        if cfg.gate_lr_scale == 0:
            for block in self.blocks:       # the gate stays as initialised: no gradient at all
                block.U.requires_grad_(False)
                block.c.requires_grad_(False)
        for block, mask in zip(self.blocks, rows.apply_masks):
            block.train_mask = mask
            self.site.trainable.append(block)

    # --- how a block starts -------------------------------------------------------------------

    @torch.no_grad()
    def _block_states(self, tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's states at the edited block's output for these texts, as one
        right-padded batch (float), and the mask of their real positions."""
        batch = make_batch(tok, [(t, None) for t in texts], device=self.device)
        out = block_output(self.model, self.layers[self.layer], batch.input_ids, batch.attention_mask,
                           packed=False, base=self.head_ok)
        return (out[0] if isinstance(out, tuple) else out).detach().float(), batch.attention_mask.bool()

    @torch.no_grad()
    def _start_states(self, tok, words: list[list[str]]) -> list[torch.Tensor | None]:
        """Per fact, the states at the edited block's output of its start words, each alone at
        the start of an input (rows.start_words): what the first tokens of any input that
        begins with the word hold there, since nothing comes before them. None: no words."""
        every = sorted({w for ws in words for w in ws})
        if not every:
            return [None] * len(words)
        h, real = self._block_states(tok, every)
        states = {w: h[i][real[i]] for i, w in enumerate(every)}
        return [torch.cat([states[w] for w in ws]) if ws else None for ws in words]

    @torch.no_grad()
    def _subject_states(self, tok, facts: list[Fact], prompts: list[list[str]]) -> list[torch.Tensor | None]:
        """Per fact, the states at the edited block's output at its subject's last token in
        each of its prompts (the fact's subject in other relations: relation_negatives), from
        one pass that ends there. None: no prompts, or the subject found in none."""
        every = [(k, p) for k, ps in enumerate(prompts) for p in ps]
        out: list[list[torch.Tensor]] = [[] for _ in facts]
        if every:
            h, _ = self._block_states(tok, [p for _, p in every])
            for i, (k, p) in enumerate(every):
                at = subject_positions(tok, p, facts[k].subject)
                if at:
                    out[k].append(h[i, at[-1]])
        return [torch.stack(x) if x else None for x in out]

    @torch.no_grad()
    def _init_gates(self, h: torch.Tensor, starts: list[torch.Tensor | None] | None = None,
                    rel: list[torch.Tensor | None] | None = None) -> None:
        """Each gate starts as a match on its subject's key: U along the direction that sets
        the key (the mean state at the subject's last token of its edit rows) apart from the
        unrelated states, c so that the gate is ~0.95 at the key and ~0.05 at the closest
        unrelated state (or KEY_MARGIN of the way to the unrelated states' mean). The states of
        the fact's start words (`starts`) count among the unrelated ones, but for their mean.
        Those of its subject in other relations (`rel`) only set the ramp: along the direction
        chosen without them, the closest of them is a closest unrelated state too. Fisher's
        direction fitted to states so near the key opens on tokens of unrelated inputs."""
        h = h.float()
        starts = starts or [None] * len(self.blocks)
        rel = rel or [None] * len(self.blocks)
        neg_rows = h[self.rows.key_neg]
        mu = neg_rows.mean(0)
        alpha = self.cfg.gate_key_shrinkage
        row_scatter = None      # d x d, computed only if some key needs Fisher's direction

        def ramp(top: float, width: float) -> tuple[float, float]:
            """The gate's slope and middle along e: sigmoid(+-3) at top and at top - width."""
            return 6.0 / width, top - width / 2

        def separation(direction, key, neg):
            """(unit direction, the key's projection, the closest unrelated state's), from mu."""
            e = direction / direction.norm()
            return e, float((key - mu) @ e), float(((neg - mu) @ e).max())

        for k, (block, om) in enumerate(zip(self.blocks, self.rows.open_masks)):
            if not om.any():
                continue
            pos = h[om]
            key = pos.mean(0)
            if (key - mu).norm() == 0:
                continue
            neg = neg_rows if starts[k] is None else torch.cat([neg_rows, starts[k]])
            e, p_key, p_neg = separation(key - mu, key, neg)
            if alpha < 1 and p_key - p_neg < KEY_MARGIN * p_key:
                # The difference of means does not set the key apart: typically a subject that
                # begins the prompt, whose state is mostly what the start of every input shares,
                # so its gate would open at the start of every input (docs/design.md).
                # Fisher's discriminant discounts the directions the unrelated states (and
                # the subject's own states across its rows) spread along; the scatter is shrunk
                # towards the identity, as few states estimate it.
                if row_scatter is None:
                    row_scatter = (neg_rows - mu).T @ (neg_rows - mu)
                neg_scatter = row_scatter if starts[k] is None else \
                    row_scatter + (starts[k] - mu).T @ (starts[k] - mu)
                scatter = (neg_scatter + (pos - key).T @ (pos - key)) / max(1, len(neg) + len(pos) - 2)
                eye = torch.eye(len(key), dtype=h.dtype, device=h.device)
                shrunk = (1 - alpha) * scatter + alpha * float(scatter.diagonal().mean()) * eye
                fisher = separation(torch.linalg.solve(shrunk, key - mu), key, neg)
                if (fisher[1] - fisher[2]) / fisher[1] > (p_key - p_neg) / p_key:
                    e, p_key, p_neg = fisher
                    self.key_fisher[k] = True
            if rel[k] is not None:      # the subject in other relations: the ramp, not the direction
                p_neg = max(p_neg, float(((rel[k] - mu) @ e).max()))
            beta, mid = ramp(p_key, max(p_key - p_neg, KEY_MARGIN * p_key))
            # The fact's own prompt must open the gate: where its subject's state there lies so
            # low on the ramp that the floored gate is (nearly) shut (a subject that begins the
            # prompt, keyed mostly by its wordings, with many active edits among the
            # negatives), the ramp is set from it instead; else the edit cannot change the one
            # prompt the user gave.
            p_prompt = self._prompt_projection(h, k, e, mu)
            if p_prompt is not None and self._floored(block, beta * (p_prompt - mid)) < PROMPT_GATE:
                beta, mid = ramp(p_prompt, max(p_prompt - p_neg, KEY_MARGIN * p_key))
                self.key_prompt[k] = True
            block.U.copy_(block.U + (beta * e)[None, :])
            block.c.fill_(float(-beta * (mid + mu @ e)))

    @staticmethod
    def _floored(block, logit: float) -> float:
        """The block's floored gate at this logit of its raw gate."""
        return float(block.gate(torch.sigmoid(torch.tensor([logit], dtype=block.c.dtype, device=block.c.device)))[0])

    def _prompt_projection(self, h: torch.Tensor, k: int, e: torch.Tensor, mu: torch.Tensor) -> float | None:
        """Along e, from mu: the state at the subject's last token in fact k's prompt row (its
        first edit row), or None where the subject was not found there."""
        row = int((self.rows.row_owner == k).nonzero()[0, 0])
        at = self.rows.open_masks[k][row]
        if not at.any():
            return None
        return float(((h[row][at] - mu) @ e).min())

    def _gradient_rotations(self, gen: torch.Generator) -> list[torch.Tensor]:
        """rotation_init="gradient": per fact, r orthonormal directions, the top right singular
        vectors of the gradient of its target loss with respect to the edited block's output
        at the positions its block acts on (its edit rows' subject tokens), from one pass of
        the parent over the edit rows with the blocks below replayed. Where there are fewer
        than r such directions, random ones complete the basis."""
        from .fast import ReplayBelow      # the same replayed pass the fast steps run
        rows, n_edit = self.rows, self.rows.n_edit
        b = rows.batch
        probe: dict[str, torch.Tensor] = {}

        def add_probe(module, args, out):
            def f(h):
                probe["d"] = torch.zeros_like(h, requires_grad=True)
                return h + probe["d"]
            return map_hidden(out, f)

        tm = b.target_mask[:n_edit]
        replay = ReplayBelow(self.layers, self.layer, self.site, map_hidden(self.site_out, lambda h: h[:n_edit]))
        replay.enter()
        hook = replay.replay.register_forward_hook(add_probe)    # after the site's own
        try:
            with torch.enable_grad():
                inputs = {"input_ids": b.input_ids[:n_edit], "attention_mask": b.attention_mask[:n_edit],
                          "use_cache": False}
                logits = self.head(self.model.base_model(**inputs).last_hidden_state[tm]) if self.head_ok \
                    else self.model(**inputs).logits[tm]
                logp = torch.log_softmax(logits.float(), -1)
                ce = -logp.gather(-1, b.next_ids[:n_edit][tm][:, None]).sum()
                [grad] = torch.autograd.grad(ce, probe["d"])
        finally:
            hook.remove()
            replay.exit()
        d, r = grad.shape[-1], self.cfg.rank
        out = []
        for k, apply in enumerate(rows.apply_masks):
            own = rows.row_owner[:n_edit] == k
            g = grad[(apply[:n_edit, :, 0] > 0) & own[:, None]].float()
            vecs = torch.linalg.svd(g, full_matrices=False).Vh[:r] if len(g) else g.new_zeros(0, d)
            if vecs.shape[0] < r:
                vecs = torch.cat([vecs, torch.randn(r - vecs.shape[0], d, generator=gen).to(vecs)])
            out.append(torch.linalg.qr(vecs.T).Q.T.contiguous())    # orthonormal rows, same span
        return out

    # --- the loss -------------------------------------------------------------------------------

    def raw_gates(self) -> list[torch.Tensor]:
        """Per block, its gate s before the floor at every position (none for ReFT), from the
        set-up pass's h (the same h the blocks see in the forward pass)."""
        if self._raw is not None:
            return self._raw
        raw = [block.raw_gate(self.site_h) for block in self.blocks] if self.cfg.method == "baft" else []
        if self.gate_kept:
            self._raw = raw
        return raw

    def open_rows(self, raw: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per block, the rows (all of them, edit rows first) where its floored gate is open at
        a position it acts on; elsewhere its change is exactly 0. None: no gate is ever exactly
        0 (no floor, or ReFT), so every block may act on every row."""
        if self._open is not None:
            return self._open[0]
        opened = None
        if raw and self.cfg.gate_floor > 0:
            opened = [((block.gate(s).detach() > 0).any(-1) & (apply[..., 0] > 0)).any(1)
                      for block, s, apply in zip(self.blocks, raw, self.rows.apply_masks)]
        if self.gate_kept:
            self._open = (opened,)
        return opened

    def live_targets(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Per target token: whether its block can move it (open_rows). Where the row is shut
        (a wording whose subject the gate's key does not match) it is the parent's whatever the
        parameters: its target stays where it is, and the stop rule does not wait for it."""
        rows = self.rows
        opened = self.open_rows(raw)
        if opened is None:
            return torch.ones(rows.n_tgt, dtype=torch.bool, device=self.device)
        return torch.stack(opened).any(0)[rows.tgt_row]

    def active(self) -> list[int]:
        """The blocks still training (every block for ReFT: each acts on every fact's rows)."""
        return [k for k, d in enumerate(self.done) if not d] if self.separable else list(range(len(self.blocks)))

    @torch.no_grad()
    def reference(self, path: Logits, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The parent's log-probabilities at the unrelated read positions marked by `keep`
        (all when None), taken through `path` on first need, whole rows at a time, with the
        new blocks set aside."""
        rows = self.rows
        n_unrel = len(self._ref_index)
        need = torch.ones(n_unrel, dtype=torch.bool, device=self.device) if keep is None else keep
        missing = need & (self._ref_index < 0)
        if bool(missing.any()):
            run = torch.unique(rows.row_of_pos[missing]) + rows.n_edit
            if self.base_rows is not None:
                run = self._reuse_references(run)
            if len(run):
                keep_all = rows.keep_pos(run)
                with self.parent():
                    logits = path.logits(run, parent=True)
                fresh = keep_all[rows.n_tgt:].nonzero().squeeze(1)
                start = len(self._ref_logp)
                self._ref_index[fresh] = torch.arange(len(fresh), device=self.device) + start
                self._ref_logp = torch.cat([self._ref_logp, torch.log_softmax(logits.float(), -1)])
                if self.base_rows is not None:
                    self._keep_references(run)
        return self._ref_logp[self._ref_index[need]]

    # --- the base's references, reused (baserows.py) --------------------------------------------

    def _row_key(self, r: int) -> tuple[list[int], int]:
        """Row r's tokens and its first read position."""
        b = self.rows.batch
        ids = b.input_ids[r, : b.lengths[r]].tolist()
        return ids, int(self.rows.read[r].nonzero()[0, 0])

    def _row_positions(self, r: int) -> torch.Tensor:
        """The unrelated read positions of row r, in read order."""
        return (self.rows.row_of_pos == r - self.rows.n_edit).nonzero().squeeze(1)

    def _reuse_references(self, run: torch.Tensor) -> torch.Tensor:
        """Fill the references of the rows of `run` the base has and no parent gate opens on;
        the rows left to compute."""
        left, found = [], []
        start = len(self._ref_logp)
        for r in run.tolist():
            got = self.base_rows.reference(*self._row_key(r)) if self._shut[r - self.rows.n_edit] else None
            if got is None:
                left.append(r)
                continue
            pos = self._row_positions(r)
            self._ref_index[pos] = torch.arange(len(pos), device=self.device) + start
            start += len(pos)
            found.append(got.to(self.device))
        if found:      # one copy of the table, not one per row
            self._ref_logp = torch.cat([self._ref_logp, *found])
        return torch.tensor(left, dtype=torch.long, device=self.device)

    def _keep_references(self, run: torch.Tensor) -> None:
        for r in run.tolist():
            if self._shut[r - self.rows.n_edit]:
                self.base_rows.keep_reference(*self._row_key(r), self._ref_logp[self._ref_index[self._row_positions(r)]])

    @contextmanager
    def parent(self) -> Iterator[None]:
        """While entered, the new blocks are set aside: the model is the parent."""
        trainable, self.site.trainable = self.site.trainable, torch.nn.ModuleList()
        try:
            yield
        finally:
            self.site.trainable = trainable

    def _gate_terms(self, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(close, open) gate terms. Both read s, before the floor: a gate already below the
        floor is still pushed further down (a margin for neighbours never seen in training),
        and one below it on the subject still gets a gradient back up."""
        close = torch.zeros((), device=self.device)
        opened = torch.zeros((), device=self.device)
        if self.cfg.method != "baft":
            return close, opened
        for s, cm, om in zip(raw, self.rows.close_masks, self.rows.open_masks):
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

    def step(self, path: Logits) -> Step:
        """The loss of one step over the facts still training, and per fact whether it has
        reached its target with margin with its unrelated rows back to the parent.

        One group of rows (path.row_groups): the loss stays a graph, and Step.backward() runs
        its backward pass (left out on the last step). Several: each group's backward pass
        runs as soon as its forward pass is done, accumulating the same gradient in .grad."""
        cfg, rows = self.cfg, self.rows
        raw = self.raw_gates()
        live = path.live_rows(raw)
        tgt_live = self.live_targets(raw)
        close, opened = self._gate_terms(raw)
        pending = cfg.gate_weight * close + cfg.gate_open_weight * opened
        groups = path.row_groups(live, self.active())
        n_tgt = rows.n_tgt
        tgt_logp = torch.full((n_tgt,), float("nan"), device=self.device)
        tgt_hit = torch.zeros(n_tgt, dtype=torch.bool, device=self.device)
        row_kl = torch.zeros(max(1, rows.n_unrelated), device=self.device)
        row_slip = torch.zeros(max(1, rows.n_unrelated), device=self.device)
        active_tgt = self._active_targets()
        if cfg.target_focus > 0:
            active_tgt = active_tgt * self._target_weights(tgt_live)
        ce_total = kl_total = 0.0
        rows_run = tokens_run = 0
        for group in groups:
            keep = None if group is None else rows.keep_pos(group)
            out = path.logits(group).float()
            tokens_run += path.tokens_run
            rows_run += rows.batch.input_ids.shape[0] if group is None else len(group)
            logp = torch.log_softmax(out, -1)
            tkeep = torch.ones(n_tgt, dtype=torch.bool, device=self.device) if keep is None else keep[:n_tgt]
            n_t = int(tkeep.sum())
            tok_logp = logp[:n_t].gather(-1, rows.target_ids[tkeep][:, None]).squeeze(-1)
            # CE over the targets of the facts still training, each token weighing 1/n_tgt
            # whichever facts are done, so a block's gradient does not depend on the others'.
            ce = -(tok_logp * active_tgt[tkeep]).sum() / max(1, n_tgt)
            tgt_logp[tkeep] = tok_logp.detach()
            tgt_hit[tkeep] = logp[:n_t].detach().argmax(-1) == rows.target_ids[tkeep]
            ukeep = None if keep is None else keep[n_tgt:]
            ref = self.reference(path, ukeep)
            unrel_logp = logp[n_t:]
            row_of_pos = _kept(rows.row_of_pos, ukeep)
            kl_pos = (ref.exp() * (ref - unrel_logp)).sum(-1)
            kl = (kl_pos * _kept(rows.kl_weight, ukeep)).sum()
            row_kl.index_add_(0, row_of_pos, kl_pos.detach() * _kept(rows.pos_weight, ukeep) * rows.n_unrelated)
            guard = _kept(rows.guard_pos, ukeep)
            if cfg.stop_locality_margin > 0 and bool(guard.any()):
                slips = self._slips(ref[guard], unrel_logp[guard].detach(), cfg.stop_locality_margin)
                row_slip.index_add_(0, row_of_pos[guard], slips.float())
            part = ce + cfg.locality_weight * kl
            ce_total += ce.item()
            kl_total += kl.item()
            pending = part if pending is None else pending + part
            if len(groups) > 1:
                if pending.requires_grad:
                    pending.backward()
                pending = None
        if cfg.target_focus > 0:
            self.last_tgt_p = tgt_logp.exp()
        gate_part = cfg.gate_weight * close.item() + cfg.gate_open_weight * opened.item()
        loss = ce_total + cfg.locality_weight * kl_total + gate_part
        parts = {"loss": loss, "ce": ce_total, "kl": kl_total, "gate": close.item(),
                 "gate_open": opened.item(), "worst_kl": float(row_kl.max()),
                 "rows_run": rows_run, "tokens_run": tokens_run}
        return Step(loss, parts, self._reached(tgt_hit, tgt_logp, row_kl, row_slip, live, tgt_live), pending)

    @staticmethod
    def _slips(ref: torch.Tensor, logp: torch.Tensor, margin: float) -> torch.Tensor:
        """Per position: where the parent's top token leads its next by at least `margin`,
        whether it leads the edited model's others by less than half of that. A near tie in
        the parent is left alone: greedy decoding there hangs on rounding, edit or not."""
        top = ref.topk(2, dim=-1)
        sure = (top.values[:, 0] - top.values[:, 1]) >= margin
        lead = top.indices[:, :1]
        mine = logp.gather(-1, lead).squeeze(-1)
        rest = logp.scatter(-1, lead, float("-inf")).amax(-1)
        return sure & (mine - rest < margin / 2)

    def _reached(self, tgt_hit: torch.Tensor, tgt_logp: torch.Tensor, row_kl: torch.Tensor,
                 row_slip: torch.Tensor, live: list[torch.Tensor] | None, tgt_live: torch.Tensor) -> list[bool]:
        """The stop rule, per fact: every one of its target tokens that its block can move
        (live_targets) is the argmax with probability at least stop_prob (stop_prob_wordings on
        the rows the ledger adds, where set) AND its unrelated rows
        (those its block is live on, where the path knows them) are back to the parent's
        distribution: stopping on the target alone leaves gates open. On the continuations of
        the fact's own locality prompts, the parent's greedy choice also leads with margin
        (stop_locality_margin): a mean KL within stop_kl still lets one token of a close
        call flip, and a user's own neighbours are the ones they check."""
        rows, cfg = self.rows, self.cfg
        short = ~(tgt_logp.exp() >= self.stop_need)      # a token not run (NaN) is short too
        reached = []
        for k in range(len(self.blocks)):
            mine = (rows.tgt_owner == k) & tgt_live
            ok = bool(tgt_hit[mine].all()) and not bool(short[mine].any())
            rows_k = rows.stop_row if live is None else live[k][rows.n_edit:] & rows.stop_row
            worst = row_kl[: rows.n_unrelated][rows_k]
            reached.append(ok and (len(worst) == 0 or float(worst.max()) <= cfg.stop_kl)
                           and not bool(row_slip[: rows.n_unrelated][rows_k].any()))
        if not self.separable:      # a ReFT block acts on every fact's rows: all or none
            reached = [all(reached)] * len(reached)
        return reached

    def _target_weights(self, live: torch.Tensor) -> torch.Tensor:
        """Per target token, its weight in the CE: 1 each, or with target_focus g > 0, (1 - p)^g
        of its probability p at the last step (a token not run: p = 0), scaled so the weights
        of each fact's live tokens (live_targets) still sum to their number. The stop rule
        often waits on a last token or two to reach stop_prob, each 1/n of the mean CE's
        gradient; focused, the steps push there, and the CE's share of the loss against the
        KL stays as it was."""
        g = self.cfg.target_focus
        if g <= 0:
            return torch.ones_like(self.last_tgt_p)
        w = (1 - self.last_tgt_p.nan_to_num(0.0)).clamp_min(0) ** g
        owner, n = self.rows.tgt_owner, len(self.blocks)
        total = w.new_zeros(n).index_add_(0, owner, torch.where(live, w, 0.0))[owner]
        count = w.new_zeros(n).index_add_(0, owner, live.to(w.dtype))[owner]
        scaled = live & (total > 0)
        return torch.where(scaled, w * count / torch.where(scaled, total, 1.0), 1.0)

    def _active_targets(self) -> torch.Tensor:
        done = torch.tensor(self.done, dtype=torch.bool, device=self.device)
        return (~done[self.rows.tgt_owner]).float()

    # --- the run --------------------------------------------------------------------------------

    def finish(self, k: int) -> None:
        """Freeze fact k's block as it is: its edit rows leave the steps."""
        self.done[k] = True

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
