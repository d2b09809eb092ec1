"""Serving with many edits: greedy generation speed (batch 1, 32 new tokens after a short
prompt) of SmolLM2-135M-Instruct with N composed edits, against the base model measured in
the same run, interleaved with every measurement.

Edits are synthetic (random tensors of the real shapes: rank 4, hidden size 576, spread over
layers like `ledger add` spreads them, see synthetic.py) and go through the real composer
path: `Block`s, `compose.fuse` (one FusedIntervention per edited layer) attached with
`attach_sites`. Modes:
  fused     the composer's stack: one hook per edited layer, whatever N
  per_edit  one forward hook per edit (each reads the layer's own output, so the function is
            the same as fused), the naive composition the ledger avoids

Gate floors (`--gate-floor`, default BaftConfig's): with a floor, a shut gate is exactly 0 and
the fused stack runs the value and the projection back over the open bases only. Synthetic
gates are shut on the bench prompt except for every round(1/--open-share)-th edit, whose gate
is open on every token (default 1 %: a pessimistic stand-in for edits that leak onto unrelated
text; a trained edit's gate opens on its own subject). `open_bases_share` is the measured
share of bases open per token on the check prompts. `--gate-floor 0` measures edits without a
floor (the plain sigmoid gate: every basis always computed).

Before timing, each N is checked for exactness: on real hidden states of SmolLM2 (each edited
layer's output on the prompts), the fused delta equals the sum of the per-block deltas
(`block_delta`, the reference formula) to float tolerance, and the per_edit model gives the
same logits as the fused one.

Prints JSON lines: n_edits, mode, tokens_per_s (median over repeats), baseline_tokens_per_s
(the base model, N=0, measured next to each measurement of that row, median), ratio (the
median over repeats of edited / base tokens/s of each adjacent pair: robust to a machine
whose load drifts; ratio_of_medians is the plain quotient of the two medians), and the
exactness figures. Goal: fused ratio >= 0.95 at N=1000. N=0 is the composer with an
empty revision (no site attached), so its ratio is the run's noise floor.

    .venv/bin/python bench/serving.py [--n 0,10,100,1000,10000] [--repeats 7] [--threads 1]

With `--ledger URL [--rev REV]` the edits are the trained ones active at that revision of a
real ledger (e.g. one kept by `bench/quality.py --keep-ledgers`), on that ledger's base model.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledger.baft import BaftConfig  # noqa: E402
from ledger.baft.layer import FusedIntervention, block_delta  # noqa: E402
from ledger.compose import ComposedModel, fuse  # noqa: E402
from ledger.models import load_base  # noqa: E402
from synthetic import blocks as synthetic_blocks  # noqa: E402

PROMPT = "The capital of France is"
CHECK_PROMPTS = ["The capital of France is", "Danielle Darrieux's mother tongue is French, and she"]
NEW_TOKENS = 32


class PerEditHooks:
    """One forward hook per edit. A first hook per layer keeps the layer's own output, and
    every edit's hook adds its block's change computed on that output, so the result is the
    composition's (all blocks read the same h), only with N hooks instead of one."""

    def __init__(self, blocks, d: int):
        self.blocks = blocks
        self.modules = [FusedIntervention([b.tensors], d) for b in blocks]
        self.handles = []
        self.h: dict[int, torch.Tensor] = {}

    def attach(self, layers) -> None:
        for layer in sorted({b.layer for b in self.blocks}):
            self.handles.append(layers[layer].register_forward_hook(self._keeper(layer)))
        for b, m in zip(self.blocks, self.modules):
            self.handles.append(layers[b.layer].register_forward_hook(self._adder(b.layer, m)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _keeper(self, layer):
        def hook(module, args, output):
            self.h[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def _adder(self, layer, m):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + m(self.h[layer]),) + tuple(output[1:])
            return output + m(self.h[layer])
        return hook


def tokens_per_s(model, enc, pad_id) -> float:
    t = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=pad_id)
    secs = time.perf_counter() - t
    assert out.shape[1] - enc["input_ids"].shape[1] == NEW_TOKENS
    return NEW_TOKENS / secs


def layer_inputs(base, layers: set[int], prompts: list[str]) -> dict[int, torch.Tensor]:
    """Each layer's own output on the prompts, in the base model (real hidden states)."""
    got: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    handles = [base.layers[l].register_forward_hook(
        lambda m, a, o, l=l: got[l].append((o[0] if isinstance(o, tuple) else o).detach().clone()))
        for l in layers]
    try:
        for p in prompts:
            base.model(**base.tokenizer(p, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for l, ts in got.items()}


def exactness(base, blocks, sites, per_edit: PerEditHooks, prompts: list[str]) -> dict:
    """On the check prompts: max |fused - sum of block deltas| over real hidden states, relative
    to max |delta|; max |logits(fused) - logits(per_edit)| (on CHECK_PROMPTS[1]); and the share
    of bases open per token."""
    hs = layer_inputs(base, set(sites), prompts)
    worst_abs, scale = 0.0, 0.0
    n_open, n_all = 0, 0
    for layer, site in sites.items():
        h = hs[layer]
        fused = site.fused(h)
        opened = site.fused.open_bases(h)
        n_open += int(opened.sum())
        n_all += opened.numel()
        ref = torch.zeros_like(h, dtype=torch.float64)
        for b in blocks:
            if b.layer == layer:
                ref += block_delta({k: v.double() for k, v in b.tensors.items()}, h.double())
        worst_abs = max(worst_abs, float((fused.double() - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    enc = base.tokenizer(CHECK_PROMPTS[1], return_tensors="pt")
    from ledger.baft.hooks import attach_sites, detach_sites
    attach_sites(base.layers, sites)
    lf = base.model(**enc).logits
    detach_sites(sites)
    per_edit.attach(base.layers)
    lp = base.model(**enc).logits
    per_edit.detach()
    return {"fused_vs_sum_of_blocks_max_abs": worst_abs, "max_abs_delta": scale,
            "fused_vs_sum_of_blocks_rel": worst_abs / scale if scale else 0.0,
            "logits_fused_vs_per_edit_max_abs": float((lf - lp).abs().max()),
            "open_bases_share": n_open / n_all if n_all else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="0,10,100,1000,10000",
                    help="numbers of synthetic edits, comma-separated (with --ledger: the trained edits active at --rev instead)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--per-edit-repeats", type=int, default=3,
                    help="repeats of the (slow) per_edit mode at N > 1000")
    ap.add_argument("--modes", default="fused,per_edit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--gate-floor", type=float, default=BaftConfig().gate_floor,
                    help="each synthetic edit's gate floor (default: BaftConfig's; 0: no floor)")
    ap.add_argument("--open-share", type=float, default=0.01,
                    help="share of edits whose gate is open on every token (default 0.01)")
    ap.add_argument("--ledger", metavar="URL", default=None,
                    help="measure the trained edits active at --rev of this ledger instead of synthetic ones")
    ap.add_argument("--rev", default="HEAD", help="the revision of --ledger (default HEAD)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    trained = None
    check_prompts = list(CHECK_PROMPTS)
    if args.ledger:
        from ledger import Ledger
        lg = Ledger.open(args.ledger)
        at = lg.model_at(args.rev)
        trained = [lg.handle.blocks[i] for i in sorted(at.edit_ids)]
        # The edits' own prompts too, where their gates open: on unrelated text a trained gate
        # is shut and the exactness figures would compare zeros.
        check_prompts += (lg.edit(f"edit-{i}").fact["prompt"] for i in sorted(at.edit_ids)[:4])
        base = lg.base
        at.clear()           # the base bare again: the bench composes the blocks itself
        counts = [len(trained)]
    else:
        base = load_base()
        counts = [int(x) for x in args.n.split(",")]
    d, n_layers = base.hidden_size, len(base.layers)
    tok = base.tokenizer
    enc = tok(PROMPT, return_tensors="pt")
    composed = ComposedModel(base)
    modes = args.modes.split(",")
    for _ in range(2):   # warm-up
        tokens_per_s(base.model, enc, tok.pad_token_id)
    for n in counts:
        blocks = trained if trained is not None else \
            synthetic_blocks(n, d, n_layers, rank=args.rank, floor=args.gate_floor, open_share=args.open_share)
        sites = fuse(blocks, d)
        per_edit = PerEditHooks(blocks, d)
        check = exactness(base, blocks, sites, per_edit, check_prompts) if n else {}
        layers_used = len(sites)
        rows: dict[str, list[float]] = {m: [] for m in modes}
        base_rows: dict[str, list[float]] = {m: [] for m in modes}

        def edited(m: str) -> float:
            if m == "fused":
                composed.compose(blocks, revision=n)     # the composer's own path
                try:
                    return tokens_per_s(composed.model, enc, tok.pad_token_id)
                finally:
                    composed.clear()
            per_edit.attach(base.layers)
            try:
                return tokens_per_s(base.model, enc, tok.pad_token_id)
            finally:
                per_edit.detach()

        for r in range(args.repeats):
            for m in modes:
                if m == "per_edit" and n > 1000 and r >= args.per_edit_repeats:
                    continue
                # A pair of adjacent generations, base and edited, in alternating order so
                # that a drifting machine load favours neither.
                if r % 2 == 0:
                    base_rows[m].append(tokens_per_s(base.model, enc, tok.pad_token_id))
                    rows[m].append(edited(m))
                else:
                    rows[m].append(edited(m))
                    base_rows[m].append(tokens_per_s(base.model, enc, tok.pad_token_id))
        for m in modes:
            tps, btps = statistics.median(rows[m]), statistics.median(base_rows[m])
            paired = statistics.median(a / b for a, b in zip(rows[m], base_rows[m]))
            row = {"n_edits": n, "mode": m, "tokens_per_s": round(tps, 2),
                   "baseline_tokens_per_s": round(btps, 2), "ratio": round(paired, 3),
                   "ratio_of_medians": round(tps / btps, 3),
                   "repeats": len(rows[m]), "edited_layers": layers_used, "rank_per_edit": args.rank,
                   "threads": args.threads}
            row.update({"edits": "trained", "ledger": args.ledger, "rev": args.rev} if trained is not None else
                       {"edits": "synthetic", "gate_floor": args.gate_floor, "open_share": args.open_share})
            if m == "fused":
                row["goal_ratio_at_1000"] = 0.95
            row.update({k: float(f"{v:.3g}") for k, v in check.items()})
            print(json.dumps(row), flush=True)
        del blocks, sites, per_edit
        composed = ComposedModel(base)
        gc.collect()


if __name__ == "__main__":
    main()
