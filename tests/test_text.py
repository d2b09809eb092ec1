"""Tokenising and batching for teacher forcing: where a target's tokens start, which positions
are scored, the padded batch, the logits at the scored positions only, and the batched greedy
continuation."""
import pytest
import torch

from ledger.models import load_base
from ledger.text import (cache_keyword, continue_greedily, encode_pair, greedy_token_ids, head_matches_logits, logits,
                         make_batch, prompt_ids, scored_logits, target_ids)

from support import TOK


def test_the_target_takes_a_leading_space_unless_the_prompt_ends_in_one():
    assert TOK.decode(target_ids(TOK, "Ann is in", "NY")) == " NY"
    assert TOK.decode(target_ids(TOK, "Ann is in", "  NY ")) == " NY"
    assert TOK.decode(target_ids(TOK, "Ann is in ", "NY")) == "NY"
    with pytest.raises(ValueError, match="tokenises to nothing"):
        target_ids(TOK, "Ann is in ", "")


def test_positions_scored_are_those_whose_next_token_is_the_target():
    p = prompt_ids(TOK, "Ann is in")
    ids, mask = encode_pair(TOK, "Ann is in", "NY")
    assert ids == p + target_ids(TOK, "Ann is in", "NY") and len(ids) == len(p) + 3
    # the prompt's last position predicts the first target token; the last token predicts nothing
    assert mask == [False] * (len(p) - 1) + [True] * 3 + [False]
    alone, m = encode_pair(TOK, "Ann is in", None)
    assert alone == p and m == [False] * (len(p) - 1) + [True]


def test_a_batch_is_right_padded_with_each_positions_next_token():
    b = make_batch(TOK, [("Ann is in", "NY"), ("Bo", None)])
    long_ids, long_mask = encode_pair(TOK, "Ann is in", "NY")
    short_ids, _ = encode_pair(TOK, "Bo", None)
    T = len(long_ids)
    assert b.input_ids.shape == (2, T) and b.lengths == [T, len(short_ids)]
    assert b.input_ids[0].tolist() == long_ids and b.target_mask[0].tolist() == long_mask
    assert b.input_ids[1, len(short_ids):].eq(TOK.pad_token_id).all()
    assert b.attention_mask.sum(1).tolist() == b.lengths
    assert b.next_ids[0, :-1].tolist() == long_ids[1:] and b.next_ids[1, len(short_ids) - 1:].eq(0).all()
    assert int(b.target_mask.sum()) == 3 + 1


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_scored_logits_are_the_full_logits_at_the_scored_positions(family, request):
    base = load_base(str(request.getfixturevalue(family)))
    b = make_batch(base.tokenizer, [("Alice lives in", "Rome"), ("Bob", None), ("Carol works at", "a farm")])
    assert head_matches_logits(base.model)                  # both families: the head runs at the scored positions only
    with torch.no_grad():
        full = logits(base.model, b)[b.target_mask]
        scored = scored_logits(base.model, b)
    assert scored.shape == (int(b.target_mask.sum()), full.shape[-1])
    assert (scored - full).abs().max() <= 1e-5


def test_continue_greedily_equals_one_generate_per_prompt(tiny_llama):
    base = load_base(str(tiny_llama))
    model, tok = base.model, base.tokenizer
    assert cache_keyword(model) in ("cache", "past_key_values")
    prompts, counts = ["Alice lives in", "Bob", "The weather is"], [3, 5, 0]
    side = tok.padding_side
    got = continue_greedily(model, tok, prompts, counts)
    assert tok.padding_side == side
    for p, k, text in zip(prompts, counts, got):
        if k == 0:
            assert text == p
            continue
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == p + tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert continue_greedily(model, tok, prompts, 0) == prompts


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_padded_greedy_generation_equals_the_one_group_per_length(family, request):
    """padded=True runs prompts of different lengths as one left-padded batch: each row's
    continuation is the one its own length group gives."""
    base = load_base(str(request.getfixturevalue(family)))
    prompts = ["Alice lives in", "Bob", "The weather is mild today and", "A", "Bob"]
    exact = greedy_token_ids(base.model, base.tokenizer, prompts, [6, 4, 6, 6, 2])
    padded = greedy_token_ids(base.model, base.tokenizer, prompts, [6, 4, 6, 6, 2], padded=True)
    assert padded == exact
    assert [len(x) for x in padded] == [6, 4, 6, 6, 2]
