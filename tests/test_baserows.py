"""Reusing the base model's rows (ledger/baft/baserows.py): a gate shut by its floor changes
nothing, `shut_rows` says exactly where the composed model computes the base's states, and
the continuations and references handed out equal the ones computed on the composed model,
to 1e-6. The edits trained with them are the same edits."""
import json
import os

import pytest
import torch

from ledger import Ledger
from ledger.baft import BaftConfig, FusedIntervention, InterventionSite
from ledger.baft.baserows import BaseRows, shut_rows
from ledger.baft.fast import FastLogits
from ledger.baft.objective import EditProblem
from ledger.facts import parse_facts_text
from ledger.models import load_base
from ledger.text import continue_greedily, prompt_ids

from support import FACT, FACT2

PROMPTS = ["Alice lives in", "Bob lives in", "The home of Alice is", "Carol works at", "Dave works at",
           "Erin plays", "Rome is the capital of", "A cat is"]


def _floored_block(d: int, floor: float, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, 2, generator=g)).Q.T.contiguous()
    return {"R": q, "W": q + 0.5 * torch.randn(2, d, generator=g), "b": torch.randn(2, generator=g),
            "U": 0.5 * torch.randn(2, d, generator=g), "c": torch.randn(2, generator=g),
            "floor": torch.full((2,), floor)}


def _gates(base, layer: int, tensors, seqs):
    """Per sequence, the largest raw gate of the block over its positions, on the base's states."""
    out = []
    for s in seqs:
        hs = base.model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[layer + 1]
        out.append(float(torch.sigmoid(hs @ tensors["U"].T + tensors["c"]).max()))
    return out


def _site_between(base, layer: int, seqs, seed: int = 3) -> tuple[InterventionSite, float]:
    """A site at `layer` whose floor lies between the sequences' largest gates, so that some
    are shut along their whole length and some open somewhere."""
    probe = _floored_block(base.hidden_size, 0.0, seed)
    with torch.no_grad():
        top = sorted(_gates(base, layer, probe, seqs))
    floor = (top[len(top) // 2 - 1] + top[len(top) // 2]) / 2
    return InterventionSite(layer, FusedIntervention([_floored_block(base.hidden_size, floor, seed)],
                                                     base.hidden_size)), floor


def test_opens_is_where_the_fused_change_is_not_zero():
    d = 32
    h = torch.randn(4, 9, d) * 2
    fused = FusedIntervention([_floored_block(d, 0.6, s) for s in (1, 2)], d)
    opens = fused.opens(h)
    change = fused(h)
    assert torch.equal(opens, change.ne(0).any(-1))
    assert opens.any() and not opens.all()          # the test sees both
    assert not FusedIntervention([], d).opens(h).any()
    no_floor = {k: v for k, v in _floored_block(d, 0.6).items() if k != "floor"}
    assert FusedIntervention([no_floor], d).opens(h).all()


def test_shut_rows_says_where_the_composed_model_is_the_base(tiny_llama):
    base = load_base(str(tiny_llama))
    tok = base.tokenizer
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    assert shut_rows(base.model, tok, base.layers, {}, seqs) == [True] * len(seqs)
    site, _ = _site_between(base, 1, seqs)
    with torch.no_grad():
        plain = [base.model(input_ids=torch.tensor([s])).logits for s in seqs]
        site.attach(base.layers[1])
        try:
            shut = shut_rows(base.model, tok, base.layers, {1: site}, seqs)
            composed = [base.model(input_ids=torch.tensor([s])).logits for s in seqs]
        finally:
            site.detach()
    assert any(shut) and not all(shut)
    for ok, a, b in zip(shut, plain, composed):
        assert torch.equal(a, b) == ok


def test_reused_continuations_equal_the_composed_models(tiny_llama):
    base = load_base(str(tiny_llama))
    model, tok, layers = base.model, base.tokenizer, base.layers
    cache = BaseRows()
    first = cache.continue_greedily(model, tok, layers, {}, PROMPTS, 6)
    assert first == continue_greedily(model, tok, PROMPTS, 6)
    assert cache.hits["continuations"] == 0
    gens = [prompt_ids(tok, t) for t in first]
    site, _ = _site_between(base, 1, gens)
    site.attach(layers[1])
    try:
        reused = cache.continue_greedily(model, tok, layers, {1: site}, PROMPTS, 6)
        assert reused == continue_greedily(model, tok, PROMPTS, 6)     # the composed model's own
        hits = cache.hits["continuations"]
        assert 0 < hits < len(PROMPTS)
    finally:
        site.detach()


def _problem(base, sites, cache):
    facts = parse_facts_text(json.dumps([FACT, FACT2]))
    cfg = BaftConfig(rank=2, n_prefixes=1, layer=1)
    return EditProblem(base.model, base.tokenizer, sites, base.layers, facts, cfg, layer=1,
                       retention=[("Paris is in", "France")], base_rows=cache)


@pytest.mark.parametrize("parent_layer", [None, 1, 0])
def test_reused_references_equal_the_computed_ones(tiny_llama, parent_layer):
    """The parent's log-probabilities handed out from the cache equal those a problem computes
    without it, to 1e-6: on a ledger with no edit, and under a parent edit at the trained
    layer shut on some rows (reused there only). A parent edit at another layer turns reuse
    off."""
    base = load_base(str(tiny_llama))
    sites = {}
    if parent_layer is not None:
        probe = _problem(base, {}, None)
        b = probe.rows.batch
        seqs = [b.input_ids[r, : b.lengths[r]].tolist() for r in range(probe.rows.n_edit, b.input_ids.shape[0])]
        probe.close()
        site, _ = _site_between(base, parent_layer, seqs)
        site.attach(base.layers[parent_layer])
        sites = {parent_layer: site}
    cache = BaseRows()
    out = {}
    try:
        for name, c in (("fill", cache), ("reuse", cache), ("anew", None)):
            problem = _problem(base, sites, c)
            try:
                with FastLogits(problem) as path:
                    out[name] = problem.reference(path)
                if name == "reuse":
                    shut = problem._shut
            finally:
                problem.close()
    finally:
        for s in sites.values():
            s.detach()
    if parent_layer == 0:
        assert not any(shut) and cache.hits["references"] == 0
    else:
        assert cache.hits["references"] == sum(shut) > 0
        assert (parent_layer is None) == all(shut)
    for name in ("fill", "reuse"):
        assert out[name].shape == out["anew"].shape
        assert (out[name] - out["anew"]).abs().max() <= 1e-6, name


def test_a_ledger_reusing_rows_trains_the_same_edits(tmp_path, tiny_llama):
    """Three facts in a row (two of one relation, so their negatives repeat), twice: the ledger that reuses the base's rows stores the same
    blobs as one that computes every row anew."""
    carol = {"subject": "Carol", "prompt": "Carol lives in", "target_new": "Paris"}
    facts = parse_facts_text(json.dumps([FACT, carol, FACT2]))    # two of one relation
    cfg = BaftConfig(steps=6, min_steps=0, rank=2, layer=1, n_prefixes=1, gate_floor=0.3)
    blobs = {}
    for name in ("reuse", "anew"):
        with Ledger.init(f"sqlite:///{tmp_path / name}.db", model=str(tiny_llama)) as lg:
            composed = lg.model_at()
            if name == "anew":
                composed.base_rows = None
            lg.add(facts, cfg)
            blobs[name] = [lg.handle.blocks[i].tensors for i in (1, 2, 3)]
            if name == "reuse":
                assert composed.base_rows.hits["continuations"] > 0
    for a, b in zip(blobs["reuse"], blobs["anew"]):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_smollm2_edits_are_the_same_with_reused_rows(tmp_path):
    """On SmolLM2: the same fact added on a fresh ledger twice (the second add reuses every row
    the first computed) and once computing every row anew gives the same blob. The default
    rows, with fewer steps and no loop check to keep the test short: it compares, it does
    not measure quality."""
    from ledger import load_facts
    from pathlib import Path
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LEDGER_THREADS") or min(2, os.cpu_count() or 1)))
    try:
        fact = load_facts(Path(__file__).resolve().parents[1] / "bench" / "data" / "everyday-dev.json")[1]
        cfg = BaftConfig(steps=10, loop_check=0)
        with Ledger.init(f"sqlite:///{tmp_path / 'a'}.db") as lg:
            tensors = []
            for mode in ("fill", "reuse", "anew"):
                lg.checkout("rev-1")
                composed = lg.model_at()
                if mode == "anew":
                    composed.base_rows = None
                [res] = lg.add([fact], cfg)
                tensors.append(lg.handle.blocks[int(res.edit.split("-")[1])].tensors)
                if mode == "reuse":
                    assert composed.base_rows.hits["continuations"] > 0
        for other in tensors[1:]:
            for k in tensors[0]:
                assert torch.equal(tensors[0][k], other[k]), k
    finally:
        torch.set_num_threads(old)
