"""Packed rows and rows run from a recorded prefix give the hidden states of the padded rows."""
import pytest
import torch

from ledger.baft.packing import PrefixKV, packed_inputs, packing_works, prefix_split_works, split_inputs
from ledger.text import cache_keyword


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [512, 8])
def test_packed_rows_give_the_padded_hidden_states(tiny_llama, attn, max_tokens):
    """Packed rows give the padded rows' hidden states, with SDPA's boolean mask and with the
    additive mask of eager attention, in one sequence or spread over several (max_tokens 8:
    rows of 6, 3 and 2 tokens in two sequences, the second with pads)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn).eval()
    assert packing_works(model)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25], [7, 11, 15, 0, 0, 0], [3, 4, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    inputs, pk = packed_inputs(model, ids, mask, max_tokens=max_tokens)
    assert pk.valid.shape[0] == (1 if max_tokens == 512 else 2)
    with torch.no_grad():
        padded = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = model.model(**inputs).last_hidden_state
    assert (packed[pk.valid] - padded[mask.bool()]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [512, 8])
def test_rows_run_from_a_recorded_prefix_give_the_packed_hidden_states(family, attn, max_tokens, request):
    """Rows cut at a start position (0, 2, 1: one row without a prefix) and run from there over
    the recorded keys and values of their prefixes give the hidden states of the whole packed
    rows at every live position, in one sequence or in two; without the record the live
    tokens see no prefix, and the states differ (the record is what carries them)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(family), attn_implementation=attn).eval()
    assert prefix_split_works(model)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25], [7, 11, 15, 0, 0, 0], [3, 4, 6, 8, 0, 0]])
    mask = (ids > 0).long()
    inputs, pk = packed_inputs(model, ids, mask, max_tokens=max_tokens)
    pre, live, sp = split_inputs(model, ids, mask, [0, 2, 1], max_tokens=max_tokens)
    assert sp.live.valid.shape[0] == sp.prefix.valid.shape[0] == (1 if max_tokens == 512 else 2)
    assert int(sp.live.valid.sum()) == int(mask.sum()) - 3 and int(sp.prefix.valid.sum()) == 3
    kw = cache_keyword(model.base_model)
    with torch.no_grad():
        whole = model.base_model(**inputs).last_hidden_state[pk.valid]
        kv = PrefixKV()
        model.base_model(**pre, **{kw: kv})
        assert sorted(kv.kv) == list(range(model.config.num_hidden_layers))
        kv.recording = False
        out = model.base_model(**live, **{kw: kv}).last_hidden_state[sp.live.valid]
        at = sp.live.index[sp.live.valid]
        assert (out - whole[at]).abs().max() <= 1e-5
        blind = PrefixKV()        # recording: each layer's own keys only, no prefix in front
        unseen = model.base_model(**{**live, "attention_mask": live["attention_mask"][..., pre["input_ids"].shape[1]:]},
                             **{kw: blind}).last_hidden_state[sp.live.valid]
        assert (unseen - whole[at]).abs().max() > 1e-3
