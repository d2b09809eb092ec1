"""The FT-M baseline of bench/quality.py (bench/ftm.py) on the tiny random models: it edits
only the MLP down-projection of the BaFT default layer, makes the target the argmax, and
restores the original weights bit for bit in single mode."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftm import FTMConfig, FTMEditor, down_proj
from ledger.baft.config import default_layer
from ledger.evaluate import measure
from ledger.facts import fact_from_record
from ledger.models import load_base
from support import FACT, FACT2, write_model

# EasyEdit's lr (5e-4) is tuned for 7B models; the tiny random model needs a larger step to
# move its near-uniform logits within 25 steps.
TINY = FTMConfig(lr=1e-2, steps=25)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_ftm_single_edit_reaches_target_and_restores(family, request):
    base = load_base(str(request.getfixturevalue(family)))
    model, tok = base.model, base.tokenizer
    fact = fact_from_record(FACT)
    before = snapshot(model)
    logits_before = base.model(**tok(fact.prompt, return_tensors="pt")).logits
    assert measure(model, tok, fact).accuracy["rel"][0] < 1.0

    editor = FTMEditor(model, tok, TINY)
    layer = default_layer(len(base.layers))
    assert editor.layer == layer and editor.cfg.layer == layer
    w = down_proj(model, layer)
    assert editor.delta_bytes == w.numel() * 4
    stats = editor.edit(fact)
    assert stats["steps"] >= 1
    assert measure(model, tok, fact).accuracy["rel"][0] == 1.0     # every target token is the argmax
    after = snapshot(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1 and changed[0].startswith(f"{'model.layers' if family == 'tiny_llama' else 'transformer.h'}.{layer}.mlp.")
    assert not w.requires_grad and w.grad is None                  # the base stays frozen

    editor.restore()
    restored = snapshot(model)
    assert all(torch.equal(before[k], restored[k]) for k in before)
    assert torch.equal(base.model(**tok(fact.prompt, return_tensors="pt")).logits, logits_before)


def test_ftm_sequential_keeps_training_and_early_stop(tiny_llama):
    base = load_base(str(tiny_llama))
    model, tok = base.model, base.tokenizer
    f1, f2 = fact_from_record(FACT), fact_from_record(FACT2)
    editor = FTMEditor(model, tok, TINY)
    editor.edit(f1)
    after_one = editor.weight.detach().clone()
    lp_before = measure(model, tok, f2).logprob["rel"][0]
    editor.edit(f2)                                     # from the edited weight, not the original
    assert not torch.equal(editor.weight, after_one)
    assert measure(model, tok, f2).logprob["rel"][0] > lp_before
    editor.restore()
    assert torch.equal(editor.weight, editor.original)

    # A loss already under the stop threshold trains nothing (EasyEdit stops on loss < 1e-2).
    lazy = FTMEditor(model, tok, FTMConfig(stop_loss=1e3))
    assert lazy.edit(f1)["steps"] == 0 and torch.equal(lazy.weight, lazy.original)
