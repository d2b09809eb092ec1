"""Put interventions on a Hugging Face model's decoder blocks.

A site is one decoder block's output. Its change is the frozen fused stack of the active
edits plus, while an edit is trained, the new trainable block; both read the same h, which is
exactly the composition the edit will be deployed in. Forward hooks leave the model's own
modules untouched, so detaching restores the base model bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import FusedIntervention


class InterventionSite(nn.Module):
    def __init__(self, layer: int, fused: FusedIntervention):
        super().__init__()
        self.layer = layer
        self.fused = fused
        self.trainable = nn.ModuleList()
        self._handle = None

    def delta(self, h: torch.Tensor) -> torch.Tensor | None:
        """The change to h; None when it is exactly zero (an empty stack, or every gate shut)."""
        if torch.is_autocast_enabled(h.device.type):
            # The blocks around run in lower precision (training with train_dtype bfloat16):
            # the edits' own arithmetic, and so the trained block's gradient, stays float32.
            with torch.autocast(h.device.type, enabled=False):
                return self._delta(h.float())
        return self._delta(h)

    def opens(self, h: torch.Tensor) -> torch.Tensor:
        """(..., T) bool: where the site may change h (a block in training: everywhere)."""
        if len(self.trainable):
            return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)
        return self.fused.opens(h.float() if torch.is_autocast_enabled(h.device.type) else h)

    def _delta(self, h: torch.Tensor) -> torch.Tensor | None:
        out = self.fused.change(h)
        for block in self.trainable:
            out = block.add_change(out, h)
        return out

    def _hook(self, module, args, output):
        if isinstance(output, tuple):  # older or GPT-2 style blocks return (hidden, ...)
            h = output[0]
            d = self.delta(h)
            return None if d is None else (h + d,) + tuple(output[1:])
        d = self.delta(output)
        return None if d is None else output + d

    def attach(self, block_module: nn.Module) -> None:
        self.detach()
        self._handle = block_module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def attach_sites(layers: nn.ModuleList, sites: dict[int, InterventionSite]) -> None:
    for idx, site in sites.items():
        if not 0 <= idx < len(layers):
            raise ValueError(f"layer {idx} out of range for a model of {len(layers)} blocks")
        site.attach(layers[idx])


def detach_sites(sites: dict[int, InterventionSite]) -> None:
    for site in sites.values():
        site.detach()
