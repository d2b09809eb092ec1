"""bench/gate_keys.py's gate: the product's ramp, ~0.95 at the key and shut (below the floor)
at the closest negative, along the difference of means or Fisher's direction."""
from __future__ import annotations

import torch

import gate_keys


def _points(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    negatives = torch.randn(200, 16, generator=g)
    key = torch.zeros(16)
    key[0] = 8.0                 # far along one axis from every negative
    positives = key + 0.1 * torch.randn(5, 16, generator=g)
    return key, negatives, positives


def test_the_gate_opens_at_the_key_and_is_shut_at_every_negative():
    key, negatives, positives = _points()
    for gate in (gate_keys.ramp_gate(key, negatives),
                 gate_keys.ramp_gate(key, negatives, positives=positives)):
        assert abs(float(gate(key[None])[0]) - 0.9526) < 1e-3   # sigmoid(3): the ramp's top
        assert float(gate(negatives).max()) == 0.0               # 0.05 at the closest: below the floor


def test_a_ramp_only_state_closer_to_the_key_moves_the_ramp_up():
    key, negatives, _ = _points()
    close = (0.8 * key)[None]
    plain, steeper = gate_keys.ramp_gate(key, negatives), gate_keys.ramp_gate(key, negatives, ramp_only=close)
    assert float(plain(close)[0]) > gate_keys.FIRES
    assert float(steeper(close)[0]) == 0.0
    assert float(steeper(key[None])[0]) > gate_keys.FIRES
