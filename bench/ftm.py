"""FT-M, the fine-tuning baseline of the quality benchmark (EasyEdit's FT-M recipe).

FT-M (Zhang et al., 2024, "A Comprehensive Study of Knowledge Editing for Large Language
Models"; EasyEdit `FT` with `objective_optimization: target_new`) fine-tunes ONE weight
matrix, the MLP down-projection of one decoder block, on the cross-entropy of the target
tokens only (the prompt tokens are masked), with Adam. EasyEdit's defaults: lr 5e-4, up to 25
steps, stopping once the loss is below 1e-2, weight decay 0, no norm constraint.

Here the block is the one the BaFT default edits (`ledger.baft.config.default_layer`), so the
two methods change the same depth of the network. Prompt and target are tokenised by
`ledger.text.make_batch`, exactly as the metrics score them (the target behind a space).

It is a baseline for the benchmark, not a ledger method: it changes the base weights in place.
`FTMEditor.restore()` puts the original weight back (bit for bit); what one would have to
store per edit is the whole weight delta, `FTMEditor.delta_bytes` (float32).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ledger.baft.config import default_layer
from ledger.facts import Fact
from ledger.models import decoder_layers
from ledger.text import logits, make_batch


@dataclass(frozen=True)
class FTMConfig:
    layer: int | None = None          # None: default_layer(n_layers), the layer BaFT edits
    lr: float = 5e-4
    steps: int = 25                   # upper bound
    stop_loss: float = 1e-2           # stop once the loss is below this (EasyEdit: 1e-2)
    weight_decay: float = 0.0
    norm_constraint: float | None = None   # EasyEdit's elementwise clamp around the original; off

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def down_proj(model: nn.Module, layer: int) -> nn.Parameter:
    """The MLP down-projection weight of decoder block `layer` (Llama family: mlp.down_proj,
    GPT-2 family: mlp.c_proj)."""
    mlp = decoder_layers(model)[layer].mlp
    for name in ("down_proj", "c_proj"):
        mod = getattr(mlp, name, None)
        if mod is not None:
            return mod.weight
    raise ValueError(f"no MLP down-projection found in block {layer} ({type(mlp).__name__})")


class FTMEditor:
    """Edits a model in place with FT-M; keeps the original weight to restore."""

    def __init__(self, model: nn.Module, tok, cfg: FTMConfig | None = None):
        self.model, self.tok = model, tok
        cfg = cfg or FTMConfig()
        n_layers = len(decoder_layers(model))
        self.layer = cfg.layer if cfg.layer is not None else default_layer(n_layers)
        self.cfg = FTMConfig(**{**cfg.to_dict(), "layer": self.layer})
        self.weight = down_proj(model, self.layer)
        self.original = self.weight.detach().clone()

    @property
    def delta_bytes(self) -> int:
        """Bytes one edit would need stored: the full weight delta in float32."""
        return self.weight.numel() * 4

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)

    def edit(self, facts: Fact | Sequence[Fact]) -> dict[str, Any]:
        """Fine-tune the weight on one fact (or several together, as one batch) from its
        current value; returns training statistics."""
        facts = [facts] if isinstance(facts, Fact) else list(facts)
        cfg, w = self.cfg, self.weight
        started = time.perf_counter()
        device = w.device
        batch = make_batch(self.tok, [(f.prompt, f.target_new) for f in facts], device=device)
        mask = batch.target_mask
        # EasyEdit: mean over each sequence's target tokens, then mean over the sequences.
        per_row = mask.sum(1).clamp(min=1).float()
        anchor = w.detach().clone() if cfg.norm_constraint is not None else None
        was_training, needed_grad = self.model.training, w.requires_grad
        self.model.train(False)
        w.requires_grad_(True)
        opt = torch.optim.Adam([w], lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps, loss_value = 0, float("nan")
        try:
            for _ in range(cfg.steps):
                logp = torch.log_softmax(logits(self.model, batch).float(), -1)
                tok_logp = logp.gather(-1, batch.next_ids[..., None]).squeeze(-1) * mask
                loss = (-(tok_logp.sum(1) / per_row)).mean()
                loss_value = loss.item()
                if loss_value < cfg.stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if anchor is not None:
                    with torch.no_grad():
                        w.copy_(torch.clamp(w, anchor - cfg.norm_constraint, anchor + cfg.norm_constraint))
        finally:
            w.requires_grad_(needed_grad)
            w.grad = None
            self.model.train(was_training)
        if not torch.isfinite(w).all():
            raise RuntimeError("FT-M diverged (non-finite weights)")
        return {"steps": steps, "final_loss": round(loss_value, 6),
                "reached_target": loss_value < cfg.stop_loss,
                "seconds": round(time.perf_counter() - started, 3)}
