"""The BaFT intervention on a hidden state h (d wide), docs/design.md "The BaFT block":

    s(h)    = sigmoid(U h + c)                       one weight per basis
    BaFT(h) = h + R^T [ s(h) * (W h + b - R h) ]     R: r x d with orthonormal rows

with one addition to the paper's formula, the gate floor f (per basis, 0 <= f < 1, stored
with the block): the weight used is g = max(0, (s - f) / (1 - f)). It is continuous, equals s
when f = 0 (an edit stored without a floor composes bit for bit by the paper's formula), and
is exactly 0 where s < f. A sigmoid gate is never 0, so without a floor a thousand edits each leak a few percent
onto every token; with it, an edit whose gate is shut changes nothing at all, and the serving
path skips its bases (docs/design.md, "gate_floor").

`BaftBlock` is one trainable edit. `FusedIntervention` is the frozen sum of many edits of one
layer: stacking their (R, W, b, U, c) row-wise gives one intervention of rank sum(r_k) whose
output is exactly the sum of the blocks' outputs, because each basis only ever multiplies its
own gate and its own rows.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import orthogonal

TENSOR_NAMES = ("R", "W", "b", "U", "c")   # and "floor" where a block has a gate floor
# sigmoid(30) rounds to exactly 1.0 in float32, so a ReFT block stored as U = 0, c = 30 is the
# LoReFT formula bit for bit, and needs no special case in the fused path.
REFT_GATE_BIAS = 30.0


def check_floor(floor: torch.Tensor) -> None:
    if floor.numel() and not bool(((floor >= 0) & (floor < 1)).all()):
        raise ValueError("a gate floor must lie in [0, 1)")


def floored_gate(s: torch.Tensor, floor: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """max(0, (s - f) / (1 - f)), with scale = 1 / (1 - f) precomputed; s itself when there
    is no floor."""
    if floor is None:
        return s
    return torch.clamp_min((s - floor) * scale, 0.0)


class BaftBlock(nn.Module):
    """One edit's trainable intervention of rank r."""

    def __init__(self, d: int, rank: int, *, method: str = "baft", gate_bias_init: float = 0.0,
                 gate_floor: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.method = method
        rot = nn.Linear(d, rank, bias=False)
        with torch.no_grad():
            rot.weight.copy_(torch.randn(rank, d, generator=generator) / d ** 0.5)
        # The orthogonal parametrisation keeps R's rows orthonormal through every step.
        self.rotation = orthogonal(rot)
        # W starts equal to R and b at 0, so the block starts as the identity: training begins
        # from the parent model's exact behaviour.
        self.W = nn.Parameter(self.rotation.weight.detach().clone())
        self.b = nn.Parameter(torch.zeros(rank))
        if method == "baft":
            # A small U: the gate starts near sigmoid(c) everywhere and learns what to read.
            self.U = nn.Parameter(torch.randn(rank, d, generator=generator) * (1e-3 / d ** 0.5))
            self.c = nn.Parameter(torch.full((rank,), float(gate_bias_init)))
        else:
            self.register_buffer("U", torch.zeros(rank, d))
            self.register_buffer("c", torch.full((rank,), REFT_GATE_BIAS))
        floor = torch.full((rank,), float(gate_floor) if method == "baft" else 0.0)
        check_floor(floor)
        # Fixed for the block's life: decided once, not on every forward.
        self.has_floor = bool((floor > 0).any())
        self.register_buffer("floor", floor)
        self.register_buffer("floor_scale", 1.0 / (1.0 - floor))
        self.last_gate: torch.Tensor | None = None  # the last forward's gate, for inspection
        # Set by the trainer only: where (batch, position) this block may act while training,
        # as a 0/1 mask, or (the fast steps) as the flat indices of those positions, so that a
        # block of a batch of 100 facts computes only on its own fact's tokens.
        self.train_mask: torch.Tensor | None = None
        self.train_index: torch.Tensor | None = None

    @property
    def R(self) -> torch.Tensor:
        return self.rotation.weight

    @torch.no_grad()
    def start_rotation(self, q: torch.Tensor) -> None:
        """Start R at q (r x d, orthonormal rows) and W at R: the block stays the identity."""
        self.rotation.weight = q.to(self.W.dtype)
        self.W.copy_(self.rotation.weight)

    def raw_gate(self, h: torch.Tensor) -> torch.Tensor:
        """s(h), before the floor."""
        return torch.sigmoid(F.linear(h, self.U, self.c))

    def gate(self, s: torch.Tensor) -> torch.Tensor:
        """The weight used, from s(h)."""
        return floored_gate(s, self.floor, self.floor_scale) if self.has_floor else s

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The additive change R^T [g * (W h + b - R h)] (not h plus it)."""
        out = self._change(h)
        return out if self.train_mask is None else out * self.train_mask

    def _change(self, h: torch.Tensor) -> torch.Tensor:
        R = self.R
        gate = self.gate(self.raw_gate(h))
        self.last_gate = gate
        value = F.linear(h, self.W, self.b) - F.linear(h, R)
        return (gate * value) @ R

    def add_change(self, out: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        """out (None: zero) plus this block's change to h. With a train_index, the change is
        computed at those positions only and is exactly 0 elsewhere, as the mask makes it."""
        if self.train_index is None:
            d = self(h)
            return d if out is None else out + d
        flat = h.reshape(-1, h.shape[-1])
        base = flat.new_zeros(flat.shape) if out is None else out.reshape(flat.shape)
        return base.index_add(0, self.train_index, self._change(flat[self.train_index])).reshape(h.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"R": self.R.detach().clone().contiguous(), "W": self.W.detach().clone(),
               "b": self.b.detach().clone(), "U": self.U.detach().clone(),
               "c": self.c.detach().clone()}
        if self.has_floor:   # no floor: the blob holds the formula's five tensors only
            out["floor"] = self.floor.detach().clone()
        return out


def block_delta(t: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The change one stored block makes to h, by the formula, term by term (the reference
    the fused path is tested against)."""
    gate = torch.sigmoid(h @ t["U"].T + t["c"])
    if "floor" in t:
        gate = torch.clamp_min((gate - t["floor"]) / (1 - t["floor"]), 0.0)
    return (gate * (h @ t["W"].T + t["b"] - h @ t["R"].T)) @ t["R"]


class FusedIntervention(nn.Module):
    """The frozen sum of any number of blocks of one layer, as one rank-sum(r_k) intervention.

    Per token it costs one (2n x d) matmul for gate and value together and one (d x n) matmul
    back, where n = sum(r_k); the number of edits does not change the number of calls.
    The tensors are stacked straight into their final buffers (no intermediate copies), and R
    is kept transposed (d x n, contiguous), the layout the projection back reads fastest.

    Where blocks have gate floors, the gates are computed first, and when few bases are open
    (the normal case: an edit's gate opens on its own subject only) the value and the
    projection back run over the open bases alone. A shut basis contributes exactly 0 either
    way, so the result is the same sum of blocks.
    """

    # Use the open bases alone when at most this share of them is open.
    SPARSE_SHARE = 0.5

    def __init__(self, blocks: list[dict[str, torch.Tensor]], d: int):
        super().__init__()
        self.n_blocks = len(blocks)
        n = sum(int(t["R"].shape[0]) for t in blocks)
        self.rank = n
        # Gate and value read the same h: one matmul for both, split afterwards.
        # in_weight = [U; W - R], in_bias = [c; b].
        in_weight = torch.empty(2 * n, d)
        in_bias = torch.empty(2 * n)
        R = torch.empty(n, d)
        floor = torch.zeros(n)
        if blocks:
            torch.cat([t["U"].float() for t in blocks], out=in_weight[:n])
            torch.cat([t["W"].float() for t in blocks], out=in_weight[n:])
            torch.cat([t["R"].float() for t in blocks], out=R)
            torch.cat([t["c"].float() for t in blocks], out=in_bias[:n])
            torch.cat([t["b"].float() for t in blocks], out=in_bias[n:])
            in_weight[n:].sub_(R)
            if any("floor" in t for t in blocks):
                torch.cat([t["floor"].float() if "floor" in t else torch.zeros(t["R"].shape[0])
                           for t in blocks], out=floor)
                check_floor(floor)
        self.has_floor = bool((floor > 0).any())
        self.register_buffer("in_weight", in_weight, persistent=False)
        self.register_buffer("in_bias", in_bias, persistent=False)
        self.register_buffer("R_t", R.T.contiguous(), persistent=False)
        self.register_buffer("floor", floor, persistent=False)
        self.register_buffer("floor_scale", 1.0 / (1.0 - floor), persistent=False)

    @property
    def R(self) -> torch.Tensor:
        """The stacked rotations, n x d (a view of the transposed buffer)."""
        return self.R_t.T

    def open_bases(self, h: torch.Tensor) -> torch.Tensor:
        """(..., T, rank) bool: which bases' gates are open (no floor at all: every one, a
        sigmoid is never 0). The same gate arithmetic as `change`."""
        if not self.has_floor or self.rank == 0:
            return torch.ones((*h.shape[:-1], self.rank), dtype=torch.bool, device=h.device)
        w, bias, _ = self._weights(h.dtype)
        return self._floored_gate(h, w, bias) > 0

    def opens(self, h: torch.Tensor) -> torch.Tensor:
        """(..., T) bool: where some basis's gate is open, so the change may be non-zero (no
        stacked block: nowhere), so "shut" here is exactly "no change" in `change`."""
        return self.open_bases(h).any(-1)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_weight, in_bias and R_t in h's dtype."""
        w, bias, r_t = self.in_weight, self.in_bias, self.R_t
        if w.dtype != dtype:
            w, bias, r_t = w.to(dtype), bias.to(dtype), r_t.to(dtype)
        return w, bias, r_t

    def _floored_gate(self, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The gates after their floors (0 where shut), from weights in h's dtype."""
        n = self.rank
        return floored_gate(torch.sigmoid(F.linear(h, w[:n], bias[:n])), self.floor.to(h.dtype),
                            self.floor_scale.to(h.dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The additive change (sum over blocks), shaped like h."""
        out = self.change(h)
        return torch.zeros_like(h) if out is None else out

    def change(self, h: torch.Tensor) -> torch.Tensor | None:
        """As forward, but None where the change is exactly zero (every gate shut), so the
        caller can skip the addition."""
        if self.rank == 0:
            return None
        w, bias, r_t = self._weights(h.dtype)
        n = self.rank
        serving = not (torch.is_grad_enabled() and h.requires_grad)
        if self.has_floor:
            gate = self._floored_gate(h, w, bias)
            if serving:
                open_ = (gate > 0).reshape(-1, n).any(0)
                k = int(open_.sum())
                if k == 0:
                    return None
                if k <= self.SPARSE_SHARE * n:
                    idx = open_.nonzero().squeeze(1)
                    value = F.linear(h, w[n:].index_select(0, idx), bias[n:].index_select(0, idx))
                    return F.linear(gate.index_select(-1, idx).mul_(value), r_t.index_select(1, idx))
            value = F.linear(h, w[n:], bias[n:])
            return F.linear(gate * value, r_t)
        gv = F.linear(h, w, bias)
        gate, value = gv.split(n, dim=-1)
        if not serving:
            return F.linear(torch.sigmoid(gate) * value, r_t)
        # Serving: no graph to keep, so gate and product reuse gv's memory.
        return F.linear(gate.sigmoid_().mul_(value), r_t)
