"""The BaFT block and its trainer: BaFT reduces to LoReFT with a constant gate, the fused stack
of k blocks equals the sum of the k blocks applied one by one, and the fast training path
(fast.py) gives the plain path's loss, gradients and edits (plain.py)."""
import torch

from ledger.baft import BaftBlock, BaftConfig, FusedIntervention, InterventionSite
from ledger.baft.fast import FastLogits
from ledger.baft.layer import REFT_GATE_BIAS, block_delta
from ledger.baft.plain import PlainLogits
from ledger.models import load_base

import pytest


def _random_block(d, r, seed, method="baft"):
    g = torch.Generator().manual_seed(seed)
    blk = BaftBlock(d, r, method=method, generator=g)
    with torch.no_grad():  # move away from the identity start so the test sees real values
        blk.W.add_(torch.randn(blk.W.shape, generator=g) * 0.3)
        blk.b.add_(torch.randn(blk.b.shape, generator=g) * 0.3)
        if method == "baft":
            blk.U.add_(torch.randn(blk.U.shape, generator=g) * 0.3)
            blk.c.add_(torch.randn(blk.c.shape, generator=g))
    return blk


def test_rotation_rows_are_orthonormal():
    R = _random_block(32, 6, 0).R
    assert torch.allclose(R @ R.T, torch.eye(6), atol=1e-5)


def test_block_starts_as_identity():
    blk = BaftBlock(32, 4, generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 5, 32)
    assert blk(h).abs().max() < 1e-5


def test_constant_gate_equals_loreft_formula():
    d, r = 48, 5
    blk = _random_block(d, r, 1, method="reft")
    t = blk.tensors()
    assert torch.sigmoid(torch.tensor(REFT_GATE_BIAS)) == 1.0  # exact in float32
    h = torch.randn(2, 7, d)
    R, W, b = t["R"], t["W"], t["b"]
    loreft = h + (h @ W.T + b - h @ R.T) @ R          # LoReFT(h) = h + R^T(Wh + b - Rh)
    assert torch.allclose(h + blk(h), loreft, atol=1e-6)
    assert torch.allclose(h + FusedIntervention([t], d)(h), loreft, atol=1e-5)


def test_gate_is_input_dependent_for_baft_only():
    d = 32
    baft, reft = _random_block(d, 4, 2), _random_block(d, 4, 2, method="reft")
    h = torch.randn(10, d) * 3
    baft(h), reft(h)
    assert baft.last_gate.std(0).max() > 1e-3
    assert torch.all(reft.last_gate == 1.0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_fused_stack_equals_sum_of_blocks(k):
    d = 64
    blocks = [_random_block(d, r, 10 + i, method="baft" if i % 3 else "reft").tensors()
              for i, r in zip(range(k), [1, 2, 4, 3, 2, 5, 1, 4])]
    h = torch.randn(3, 9, d)
    fused = FusedIntervention(blocks, d)(h)
    separate = sum(block_delta(t, h) for t in blocks)
    assert fused.shape == h.shape
    assert (fused - separate).abs().max() <= 1e-5
    assert fused.abs().max() > 1e-3  # the test is not comparing zeros


def test_empty_stack_changes_nothing():
    h = torch.randn(2, 3, 16)
    assert torch.equal(FusedIntervention([], 16)(h), torch.zeros_like(h))


def test_hook_on_model_adds_the_delta_and_detaches_cleanly(tiny_llama):
    base = load_base(str(tiny_llama))
    ids = torch.tensor([[5, 9, 13, 17]])
    before = base.model(ids).logits
    t = _random_block(base.hidden_size, 4, 3).tensors()
    site = InterventionSite(1, FusedIntervention([t], base.hidden_size))
    site.attach(base.layers[1])
    during = base.model(ids).logits
    site.detach()
    after = base.model(ids).logits
    assert (during - before).abs().max() > 1e-4
    assert torch.equal(before, after)


def test_config_rejects_bad_values():
    from ledger.errors import InputError
    for bad in ({"method": "lora"}, {"rank": 0}, {"lr": 0}, {"steps": 0}, {"layer": -1}, {"gate_weight": -1},
                {"gate_floor": 1.0}, {"gate_floor": -0.1}, {"gate_lr_scale": -1},
                {"gate_lr_scale": 0, "gate_key_init": False}, {"n_prefixes": 9}, {"n_prefixes": -1},
                {"stop_prob_wordings": 1.5}, {"stop_prob_wordings": -0.1}, {"stop_locality_margin": -0.1},
                {"locality_row_weight": -1}, {"target_focus": -1}, {"target_focus": 9}):
        with pytest.raises(InputError):
            BaftConfig(**bad)


def test_a_stored_config_with_a_field_no_longer_kept_still_loads():
    """Edits stored while the config held `fast_path` (a switch of the trainer, not of the edit)
    load as the same config, so verify and rebase read them."""
    stored = {**BaftConfig().to_dict(), "fast_path": False}
    assert BaftConfig.from_dict(stored, stored=True) == BaftConfig()
    assert "fast_path" not in BaftConfig().to_dict()


# The edited layer of the trainer tests: with a block above it, so that a change at the
# subject's tokens reaches the target's positions (through attention) and the edit's loss has
# a real gradient, not rounding noise that Adam would magnify.
EDITED = 1


def _path(problem, fast: bool):
    return FastLogits(problem) if fast else PlainLogits(problem)


def _parent_sites(base):
    """A frozen parent edit at a lower layer and one at the edited layer, as in a real ledger."""
    sites = {0: InterventionSite(0, FusedIntervention([_random_block(base.hidden_size, 2, 5).tensors()], base.hidden_size)),
             EDITED: InterventionSite(EDITED, FusedIntervention([_random_block(base.hidden_size, 3, 6).tensors()],
                                                                base.hidden_size))}
    for layer, site in sites.items():
        site.attach(base.layers[layer])
    return sites


def _facts():
    import json
    from ledger.facts import parse_facts_text
    from support import FACT
    other = {**FACT, "prompt": "Rome is the capital of", "subject": "Rome", "target_new": "Spain",
             "rephrase_prompts": ["Rome, a city, is the capital of"]}
    return parse_facts_text(json.dumps([FACT, other]))


# The product's case (a batch, floored and kept gates) runs in the fast set; the other 23 are slow.
_GRADIENT_CASES = [
    pytest.param(family, method, n_facts, floor, gate_lr,
                 marks=() if (family, method, n_facts, floor, gate_lr) == ("tiny_llama", "baft", 2, 0.3, 0.0)
                 else pytest.mark.slow)
    for family in ("tiny_llama", "tiny_gpt2") for method in ("baft", "reft") for n_facts in (1, 2)
    for floor, gate_lr in ((0.0, 1.0), (0.3, 1.0), (0.3, 0.0))]


@pytest.mark.parametrize("family,method,n_facts,floor,gate_lr", _GRADIENT_CASES)
def test_fast_path_gives_the_same_gradients(family, method, n_facts, floor, gate_lr, request):
    """The optimised training path (lower blocks replayed from cache, output head only where the
    loss reads, rows packed without pads, and with a gate floor only the rows where a new gate
    is open) gives the same loss and gradients as the plain full forward, to 1e-5."""
    from ledger.baft.objective import EditProblem
    if method == "reft" and (floor or not gate_lr):
        pytest.skip("a ReFT gate is constant: no floor, nothing to freeze")
    base = load_base(str(request.getfixturevalue(family)))
    sites = _parent_sites(base)
    cfg = BaftConfig(method=method, rank=2, n_prefixes=1, gate_floor=floor, gate_lr_scale=gate_lr)
    facts = _facts()[:n_facts]
    problem = EditProblem(base.model, base.tokenizer, sites, base.layers, facts, cfg, layer=EDITED,
                          retention=[("Paris is in", "France")],
                          other_prompts=[[f"{f.subject} was born in"] for f in facts])
    try:
        assert problem.head_ok                       # both families take the head-only path
        # move the blocks off the identity first, so every term has a gradient
        with torch.no_grad():
            for p in problem.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        grads, losses = {}, {}
        fast_path = FastLogits(problem)
        for fast in (False, True):
            for p in problem.parameters():
                p.grad = None
            with (fast_path if fast else PlainLogits(problem)) as path:
                res = problem.step(path)
                res.backward()
            losses[fast] = res.parts
            grads[fast] = [p.grad.clone() for p in problem.parameters()]
        run = {fast: parts.pop("rows_run") for fast, parts in losses.items()}
        tokens = {fast: parts.pop("tokens_run") for fast, parts in losses.items()}
        assert fast_path.packed                      # both families run the rows packed
        live = fast_path.needed
        cols = torch.arange(live.shape[1])
        frozen = live & (cols[None, :] < fast_path.first_free[:, None])
        if floor:   # the floored path really left rows out
            assert run[True] < run[False] == problem.rows.batch.input_ids.shape[0]
            with fast_path:
                rows = fast_path.rows_to_run(fast_path.live_rows(problem.raw_gates()), problem.active())
            live, frozen = live[rows], frozen[rows]
        # packed: exactly the needed tokens of the rows run (no pad, no edit row's last token),
        # less the frozen prefixes before the subject (BaFT) that the steps read from a record
        assert fast_path.split and (int(frozen.sum()) > 0) == (method == "baft")
        assert tokens[True] == int(live.sum()) - int(frozen.sum()) and tokens[False] == problem.rows.batch.input_ids.numel()
        assert int(fast_path.needed.sum()) == int(problem.rows.batch.attention_mask.sum()) - problem.rows.n_edit
        for k in losses[True]:
            assert abs(losses[True][k] - losses[False][k]) <= 1e-5, k
        assert any(g.abs().max() > 1e-6 for g in grads[False])
        gate_params = sum(1 for b in problem.blocks for p in (b.U, b.c) if p.requires_grad)
        assert gate_params == (2 * n_facts if method == "baft" and gate_lr else 0)
        for a, b in zip(grads[True], grads[False]):
            assert (a - b).abs().max() <= 1e-5
    finally:
        problem.close()
    assert all(type(m).__name__ not in ("_Skip", "_Replay") for m in base.layers)


def _grads_of(problem, path):
    res = problem.step(path)
    res.backward()
    problem.drop_done_gradients()
    return res.parts, [None if p.grad is None else p.grad.clone() for p in problem.parameters()]


def _moved_problem(base, cfg, n_facts=2):
    from ledger.baft.objective import EditProblem
    problem = EditProblem(base.model, base.tokenizer, _parent_sites(base), base.layers, _facts()[:n_facts], cfg,
                          layer=EDITED, retention=[("Paris is in", "France")])
    with torch.no_grad():
        for p in problem.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return problem


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("floor,gate_lr", [(0.0, 1.0), (0.3, 0.0)])
def test_a_step_in_groups_of_rows_gives_the_same_gradients(family, floor, gate_lr, request):
    """A step whose rows are run and back-propagated a few tokens at a time (as a large batch
    of facts is) gives the loss and gradients of the step run at once."""
    base = load_base(str(request.getfixturevalue(family)))
    problem = _moved_problem(base, BaftConfig(rank=2, n_prefixes=1, gate_floor=floor, gate_lr_scale=gate_lr))
    try:
        out, groups = {}, {}
        with FastLogits(problem) as path:
            for tokens in (10_000, 8):
                path.chunk_tokens = tokens
                groups[tokens] = len(path.row_groups(path.live_rows(problem.raw_gates()), problem.active()))
                for p in problem.parameters():
                    p.grad = None
                out[tokens] = _grads_of(problem, path)
        assert groups[10_000] == 1 and groups[8] > 2          # 8 tokens: several groups really ran
        (pa, ga), (pb, gb) = out[10_000], out[8]
        for k in ("loss", "ce", "kl", "gate", "gate_open", "worst_kl", "tokens_run", "rows_run"):
            assert abs(pa[k] - pb[k]) <= 1e-5, k
        for a, b in zip(ga, gb):
            assert (a - b).abs().max() <= 1e-5
    finally:
        problem.close()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("fast", [True, False])
def test_a_finished_fact_leaves_the_other_blocks_gradients_alone(family, fast, request):
    """In a batch, a fact that is done is frozen and its edit rows leave the steps; the other
    facts' blocks get exactly the gradient they got before (their fact's rows are theirs
    alone), so a batch trains each block as long as its own fact needs."""
    base = load_base(str(request.getfixturevalue(family)))
    problem = _moved_problem(base, BaftConfig(rank=2, n_prefixes=1, gate_floor=0.3))
    try:
        with _path(problem, fast) as path:
            before, g_before = _grads_of(problem, path)
            for p in problem.parameters():
                p.grad = None
            problem.finish(0)
            after, g_after = _grads_of(problem, path)
        own = [id(p) for p in problem.blocks[0].parameters() if p.requires_grad]
        for p, a, b in zip(problem.parameters(), g_before, g_after):
            if id(p) in own:
                assert b is None and a is not None and a.abs().max() > 0     # frozen: no update at all
            else:
                assert (a - b).abs().max() <= 1e-6
        if fast:
            n0 = sum(1 for o in problem.rows.row_owner.tolist() if o == 0)
            assert after["rows_run"] <= before["rows_run"] - n0   # and the rows live for block 0 only
    finally:
        problem.close()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_fast_path_learns_exactly_the_same(family, floor, request):
    """Whole training runs on both paths end with the same tensors."""
    from ledger.baft.trainer import train_edits
    base = load_base(str(request.getfixturevalue(family)))
    sites = _parent_sites(base)
    out = {}
    for fast in (False, True):
        cfg = BaftConfig(steps=4, min_steps=4, rank=2, n_prefixes=1, gate_floor=floor)
        out[fast] = [t.tensors for t in train_edits(base.model, base.tokenizer, sites, base.layers, _facts(), cfg,
                                                    layer=EDITED, fast=fast)]
    for a, b in zip(out[True], out[False]):
        for name in a:
            assert (a[name] - b[name]).abs().max() <= 1e-5, name
    assert (out[True][0]["W"] - out[True][0]["R"]).abs().max() > 1e-4     # training moved the block
    # the model is whole again afterwards
    assert all(type(m).__name__ not in ("_Skip", "_Replay") for m in base.layers)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("method", ["baft", "reft"])
def test_gradient_rotation_spans_the_top_directions_of_the_loss_gradient(family, method, request):
    """rotation_init="gradient": each block's R starts as the top-r right singular vectors of
    dCE/dh at the positions it acts on (its own fact's edit rows), here computed apart with a
    plain forward of the whole model; the block still starts as the identity."""
    from ledger.baft.objective import EditProblem
    base = load_base(str(request.getfixturevalue(family)))
    sites = _parent_sites(base)
    r = 2
    def make(ri):
        return EditProblem(base.model, base.tokenizer, sites, base.layers, _facts(),
                           BaftConfig(method=method, rank=r, n_prefixes=1, rotation_init=ri),
                           layer=EDITED, retention=[("Paris is in", "France")])
    random_start = make("random")
    random_R = [blk.R.detach().clone() for blk in random_start.blocks]
    random_start.close()
    problem = make("gradient")
    try:
        b, n = problem.rows.batch, problem.rows.n_edit
        probe = {}

        def add(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            probe["d"] = torch.zeros_like(h, requires_grad=True)
            return (h + probe["d"],) + tuple(out[1:]) if isinstance(out, tuple) else h + probe["d"]
        saved = [blk for site in sites.values() for blk in site.trainable]
        sites[EDITED].trainable = torch.nn.ModuleList()      # the parent alone, as at the start
        hook = base.layers[EDITED].register_forward_hook(add)
        try:
            logits = base.model(input_ids=b.input_ids[:n], attention_mask=b.attention_mask[:n]).logits
        finally:
            hook.remove()
            sites[EDITED].trainable = torch.nn.ModuleList(saved)
        tm = b.target_mask[:n]
        ce = -torch.log_softmax(logits[tm], -1).gather(-1, b.next_ids[:n][tm][:, None]).sum()
        [grad] = torch.autograd.grad(ce, probe["d"])
        owner = problem.rows.row_owner[:n]
        for k, blk in enumerate(problem.blocks):
            g = grad[(problem.rows.apply_masks[k][:n, :, 0] > 0) & (owner == k)[:, None]]
            top = torch.linalg.svdvals(g)[:r].square().sum()
            R = blk.R.detach()
            assert torch.allclose(R @ R.T, torch.eye(r), atol=1e-5)
            captured = (g @ R.T).square().sum()
            assert abs(float(captured / top) - 1) < 1e-3          # R spans the top-r directions
            assert float((g @ random_R[k].T).square().sum() / top) < 0.9     # which a random R does not
            h = torch.randn(3, 5, base.hidden_size)
            assert blk._change(h).abs().max() < 1e-5                  # still the identity
    finally:
        problem.close()
    assert all(type(m).__name__ not in ("_Skip", "_Replay") for m in base.layers)


@pytest.mark.parametrize("shrinkage, opens_on_sink", [(1.0, True), (0.3, False)])
def test_a_key_at_the_shared_start_of_every_input_opens_only_under_fishers_direction(tiny_llama, shrinkage,
                                                                                      opens_on_sink):
    """A subject that begins the prompt keys on a state that the start of every input shares
    (a large common component, as real models' first positions have). The plain direction
    (key - mean of the unrelated states) then opens the gate at the start of every unrelated
    row; Fisher's direction, which discounts what the unrelated states vary along, opens it at
    the key only."""
    from ledger.baft.objective import EditProblem
    base = load_base(str(tiny_llama))
    cfg = BaftConfig(rank=2, n_prefixes=1, gate_key_shrinkage=shrinkage)
    problem = EditProblem(base.model, base.tokenizer, {}, base.layers, _facts()[:1], cfg, layer=EDITED)
    try:
        g = torch.Generator().manual_seed(0)
        B, T = problem.rows.batch.input_ids.shape
        d = base.hidden_size
        h = torch.randn(B, T, d, generator=g)
        sink = torch.randn(d, generator=g)
        sink = 40 * sink / sink.norm()
        unique = torch.randn(d, generator=g)
        unique = 10 * unique / unique.norm()
        h[:, 0] += sink                                    # every row's first position
        key_at = problem.rows.open_masks[0]
        h[key_at] = sink + unique                          # the subject is the first token
        block = problem.blocks[0]
        with torch.no_grad():
            block.U.zero_()
            problem._init_gates(h)
            gate = block.gate(block.raw_gate(h)).amax(-1)
        real = problem.rows.batch.attention_mask.bool()
        assert float(gate[key_at].min()) > 0.9
        unrelated_start = gate[problem.rows.n_edit:, 0]
        assert bool((unrelated_start > 0).any()) == opens_on_sink
        if not opens_on_sink:
            assert float(gate[problem.rows.n_edit:][real[problem.rows.n_edit:]].max()) == 0.0
        # A key the plain direction sets apart (no shared start) gets the plain direction
        # whatever the shrinkage: the same gate as with shrinkage 1 (Fisher's direction off).
        h[:, 0] -= sink
        h[key_at] = unique * 3
        gates = []
        for alpha in (1.0, shrinkage):
            problem.cfg = BaftConfig(rank=2, n_prefixes=1, gate_key_shrinkage=alpha)
            with torch.no_grad():
                block.U.zero_()
                problem._init_gates(h)
                gates.append((block.U.clone(), block.c.clone()))
        assert torch.equal(gates[0][0], gates[1][0]) and torch.equal(gates[0][1], gates[1][1])
    finally:
        problem.close()


def test_start_words_leave_out_the_subjects_own_words():
    from ledger.baft.rows import START_WORDS, start_words
    from ledger.facts import Fact
    assert start_words(Fact(prompt="Egypt is in", target_new="Asia", subject="Egypt"), 48) == \
        [w for w in START_WORDS if w != "Egypt"]
    assert "Amazon" not in start_words(Fact(prompt="The Amazon River flows into the", target_new="sea",
                                            subject="Amazon River"), 48)
    assert "Newton" not in start_words(Fact(prompt="Isaac Newton was a", target_new="poet",
                                            subject="Isaac Newton"), 48)
    assert start_words(Fact(prompt="x is", target_new="y", subject="x"), 3) == list(START_WORDS[:3])
    assert start_words(Fact(prompt="x is", target_new="y", subject="x"), 0) == []


def _key_and_a_state_near_it(problem, hidden: int):
    """States made to order for the key's set-up: small noise on every row, one key on the
    first fact's key positions, and one state near the key (a (1, hidden) row)."""
    g = torch.Generator().manual_seed(0)
    B, T = problem.rows.batch.input_ids.shape
    h = 0.1 * torch.randn(B, T, hidden, generator=g)
    key_at = problem.rows.open_masks[0]
    key = 8 * torch.randn(hidden, generator=g) / hidden ** 0.5
    h[key_at] = key
    return h, key_at, (0.6 * key + 0.1 * torch.randn(hidden, generator=g))[None, :]


def test_a_start_word_is_a_negative_for_the_key_where_it_would_open_the_gate(tiny_llama):
    """The start words' states are those that any input beginning with the word holds at its
    first positions (nothing comes before them). A gate whose plain key opens on such a state
    is shut there once the state is among the key's negatives, and stays open at the key."""
    from ledger.baft.objective import EditProblem
    from ledger.baft.packing import block_output
    from ledger.text import make_batch
    base = load_base(str(tiny_llama))
    cfg = BaftConfig(rank=2, n_prefixes=1)
    problem = EditProblem(base.model, base.tokenizer, {}, base.layers, _facts()[:1], cfg, layer=EDITED)
    try:
        states = problem._start_states(base.tokenizer, [["Tokyo"], []])
        assert states[1] is None
        batch = make_batch(base.tokenizer, [("Tokyo is a large city", None)])
        h_in = block_output(base.model, base.layers[EDITED], batch.input_ids, batch.attention_mask,
                            packed=False, base=True)
        h_in = h_in[0] if isinstance(h_in, tuple) else h_in
        assert torch.allclose(states[0], h_in[0, : len(states[0])].float(), atol=1e-5)

        h, key_at, start = _key_and_a_state_near_it(problem, base.hidden_size)
        block = problem.blocks[0]
        gates = []
        for starts in (None, [start]):
            with torch.no_grad():
                block.U.zero_()
                problem._init_gates(h, starts)
                gates.append((float(block.gate(block.raw_gate(h[key_at])).min()),
                              float(block.gate(block.raw_gate(start)).max())))
        assert gates[0][0] > 0.9 and gates[0][1] > 0.5        # without it: open on the start word
        assert gates[1][0] > 0.9 and gates[1][1] == 0.0        # with it: shut there, open at the key
    finally:
        problem.close()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_packed_reference_pass_equals_the_padded_model(family, request):
    """The set-up pass, which stops at the edited block, gives its raw output as the padded
    full forward does; the parent's distributions taken on the fast path (replayed, packed,
    head only where read, the new blocks set aside) equal the plain padded forward's, and are
    taken only for the rows asked for."""
    from ledger.baft.objective import EditProblem
    base = load_base(str(request.getfixturevalue(family)))
    sites = _parent_sites(base)
    captured = {}

    def grab_out(module, args, out):
        captured["out"] = out

    grab = base.layers[EDITED].register_forward_hook(grab_out, prepend=True)
    problem = EditProblem(base.model, base.tokenizer, sites, base.layers, _facts(), BaftConfig(rank=2), layer=EDITED,
                          retention=[("Paris is in", "France")])
    try:
        assert FastLogits(problem).packed and problem.head_ok
        assert len(problem._ref_logp) == 0                  # nothing above the edited block ran yet
        with torch.no_grad():
            for p in problem.parameters():          # the blocks off the identity: set aside, they must not count
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
        captured.clear()
        trainable, problem.site.trainable = problem.site.trainable, torch.nn.ModuleList()
        with torch.no_grad():
            plain = torch.log_softmax(PlainLogits(problem).logits(None).float(), -1)[problem.rows.n_tgt:]
        problem.site.trainable = trainable
        out = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
        real = problem.rows.batch.attention_mask.bool()
        assert (out[real] - problem.site_h[real]).abs().max() <= 1e-5
        first = problem.rows.row_of_pos == 0                     # the first unrelated row only
        with FastLogits(problem) as path:
            part = problem.reference(path, first)
            assert len(problem._ref_logp) == int(first.sum())
            full = problem.reference(path)
        assert (part - plain[first]).abs().max() <= 1e-5
        assert (full - plain).abs().max() <= 1e-5
    finally:
        grab.remove()
        problem.close()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_bfloat16_steps_stay_close_and_leave_the_model_float32(family, request):
    """train_dtype bfloat16: the fast steps' gradients point where the float32 plain path's do
    (bfloat16 rounding only), the parent's reference is taken the same way (an untrained edit
    changes no distribution), and the model's weights are float32 and unchanged afterwards."""
    from ledger.baft.objective import EditProblem
    from ledger.baft.trainer import train_edits
    base = load_base(str(request.getfixturevalue(family)))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    sites = _parent_sites(base)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        # floor 0: every unrelated row runs, so the KL check below covers them all
        cfg = BaftConfig(rank=2, n_prefixes=1, train_dtype=dtype, gate_floor=0.0)
        problem = EditProblem(base.model, base.tokenizer, sites, base.layers, _facts(), cfg, layer=EDITED,
                              retention=[("Paris is in", "France")])
        try:
            path = FastLogits(problem)
            assert (path.low is not None) == (dtype == "bfloat16")
            with path:
                assert problem.step(path).parts["worst_kl"] <= 1e-6        # the identity start changes nothing
                with torch.no_grad():
                    for p in problem.parameters():
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
                problem.step(path).backward()
            grads[dtype] = torch.cat([p.grad.flatten() for p in problem.parameters()])
        finally:
            problem.close()
    a, b = grads["bfloat16"], grads["float32"]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).norm() <= 0.1 * b.norm()
    train_edits(base.model, base.tokenizer, sites, base.layers, _facts(), BaftConfig(rank=2, steps=2, min_steps=2,
                train_dtype="bfloat16"), layer=EDITED)
    after = base.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_retention_past_the_cap_keeps_the_prompts_that_share_the_new_subjects_tokens(tiny_llama):
    """With more active edits than retention_samples, the earlier prompts that share the new
    subject's rarest tokens are kept (the ones a new gate is at risk of opening on); the rest
    is a random sample; under the cap every prompt is kept, in order."""
    import json
    import random
    from transformers import AutoTokenizer
    from ledger.baft.rows import pick_retention
    from ledger.facts import parse_facts_text
    from support import FACT
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    fact = parse_facts_text(json.dumps([{**FACT, "subject": "Xqz Vault", "prompt": "Xqz Vault is in"}]))[0]
    pool = [(f"Edit number {i} is about", "France") for i in range(200)]
    pool[37] = ("The Xqz tower is in", "Spain")          # shares " Xqz"'s rare tokens
    pool[150] = ("Old Vault stands in", "Italy")        # shares "Vault"
    kept = pick_retention(tok, [fact], pool, 8, random.Random(0))
    assert len(kept) == 8 and len(set(kept)) == 8 and set(kept) <= set(pool)
    assert pool[37] in kept and pool[150] in kept
    assert kept == [p for p in pool if p in kept]     # the ledger's order
    assert pick_retention(tok, [fact], pool[:8], 8, random.Random(0)) == pool[:8]
    # a fact without a subject: a plain random sample
    bare = parse_facts_text(json.dumps([{k: v for k, v in FACT.items() if k != "subject"}]))[0]
    assert len(pick_retention(tok, [bare], pool, 8, random.Random(0))) == 8


def test_rows_of_the_subject_itself_are_read_after_the_target_and_are_no_key_negatives(tiny_llama):
    """The prompt continued after its new target is read from the position that predicts what
    follows the target; the subject in another relation is read whole. In both, the subject's
    own states are no negatives for the gate's key, and the stop rule does not wait for them."""
    from ledger.baft.objective import EditProblem
    from ledger.baft.rows import subject_positions
    from ledger.text import prompt_ids
    base = load_base(str(tiny_llama))
    fact = _facts()[0]
    cfg = BaftConfig(rank=2, n_prefixes=1, after_target_tokens=3)
    problem = EditProblem(base.model, base.tokenizer, {}, base.layers, [fact], cfg, layer=EDITED,
                          other_prompts=[[f"{fact.subject} was born in"]])
    try:
        n_edit, tok = problem.rows.n_edit, base.tokenizer
        other, after = n_edit + problem.rows.n_unrelated - 2, n_edit + problem.rows.n_unrelated - 1
        real = problem.rows.batch.attention_mask.bool()
        assert bool(problem.rows.read[other][real[other]].all())
        start = len(prompt_ids(tok, fact.prompt + " " + fact.target_new)) - 1
        read_cols = problem.rows.read[after].nonzero().squeeze(1).tolist()
        assert read_cols == list(range(start, int(real[after].sum())))
        for row in (other, after):
            text = tok.decode(problem.rows.batch.input_ids[row][real[row]], skip_special_tokens=True)
            pos = subject_positions(tok, text, fact.subject)
            assert pos and not bool(problem.rows.key_neg[row, pos].any())
            assert bool(problem.rows.key_neg[row][real[row]].sum() == int(real[row].sum()) - len(pos))
        assert problem.rows.stop_row.tolist() == [True] * (problem.rows.n_unrelated - 2) + [False, False]
        assert not bool(problem.rows.key_neg[:n_edit].any())
    finally:
        problem.close()


def test_after_target_rows_cover_the_prompt_and_some_of_its_wordings(tiny_llama):
    """after_target_wordings: besides the prompt, that many of the relation's other wordings
    get a row continued after the new target, each read from the position after the target."""
    from ledger.baft.objective import EditProblem
    from ledger.text import prompt_ids
    base = load_base(str(tiny_llama))
    fact = _facts()[0]
    extra = [f"Everyone knows that {fact.subject} is in", f"{fact.subject} lies in", f"{fact.subject} sits in"]
    tok = base.tokenizer

    def after_rows(n: int) -> list[str]:
        cfg = BaftConfig(rank=2, n_prefixes=0, after_target_tokens=2, after_target_wordings=n)
        problem = EditProblem(base.model, tok, {}, base.layers, [fact], cfg, layer=EDITED, extra_prompts=[extra])
        try:
            real = problem.rows.batch.attention_mask.bool()
            texts = []
            for row in range(problem.rows.n_edit, problem.rows.n_edit + problem.rows.n_unrelated):
                if problem.rows.stop_row[row - problem.rows.n_edit]:
                    continue
                text = tok.decode(problem.rows.batch.input_ids[row][real[row]], skip_special_tokens=True)
                read = problem.rows.read[row].nonzero().squeeze(1).tolist()
                said = next(w for w in [fact.prompt, *extra] if text.startswith(w + " " + fact.target_new))
                assert read[0] == len(prompt_ids(tok, said + " " + fact.target_new)) - 1
                texts.append(said)
            return texts
        finally:
            problem.close()
    assert after_rows(0) == [fact.prompt]
    assert after_rows(2) == [fact.prompt, *extra[:2]]
    assert after_rows(8) == [fact.prompt, *extra]


def test_the_stop_rule_does_not_wait_for_targets_no_gate_is_open_for(tiny_llama):
    """A target token counts for the stop rule only where its block's floored gate is open at a
    position of the row it acts on: elsewhere the row is the parent's whatever the parameters,
    and waiting for it only runs a fact to the step cap."""
    from ledger.baft.objective import EditProblem
    base = load_base(str(tiny_llama))
    fact = _facts()[0]
    cfg = BaftConfig(rank=2, n_prefixes=1, gate_floor=0.2)

    def first_step(shut: bool):
        problem = EditProblem(base.model, base.tokenizer, {}, base.layers, [fact], cfg, layer=EDITED)
        try:
            block, apply = problem.blocks[0], problem.rows.apply_masks[0]
            if shut:
                with torch.no_grad():
                    block.c.fill_(-1e4)
            raw = problem.raw_gates()
            live = problem.live_targets(raw)
            opened = ((block.gate(raw[0]) > 0).any(-1) & (apply[..., 0] > 0)).any(1)
            assert live.tolist() == opened[problem.rows.tgt_row].tolist()
            with FastLogits(problem) as path:
                return live, problem.step(path)
        finally:
            problem.close()

    live, step = first_step(shut=False)
    assert bool(live.any()) and step.reached == [False]     # the untrained edit misses its target
    live, step = first_step(shut=True)
    assert not bool(live.any()) and step.reached == [True]
    assert step.parts["ce"] > 1.0                               # reached only because nothing can move


def test_the_rows_the_ledger_adds_can_stop_at_a_lower_probability_than_the_facts_own(tiny_llama):
    """stop_prob_wordings: the target tokens of the fact's prompt and rephrases need stop_prob,
    those of the rows the ledger adds (wordings, the prefixed prompt) only stop_prob_wordings;
    every one must still be the argmax. None: stop_prob for every row, as before the field."""
    import math
    from ledger.baft.objective import EditProblem
    base = load_base(str(tiny_llama))
    fact = _facts()[1]                  # with one rephrase
    extra = [f"{fact.subject} is the capital city of", f"The country whose capital is {fact.subject} is"]

    def problem_for(**kw):
        cfg = BaftConfig(rank=2, n_prefixes=1, **kw)
        return EditProblem(base.model, base.tokenizer, {}, base.layers, [fact], cfg, layer=EDITED,
                           extra_prompts=[extra])

    problem = problem_for()
    try:
        rows = problem.rows
        # The prompt and the rephrase (trained on by default) are the fact's own; 2 wordings
        # and the prefixed prompt are not.
        per_row = {}
        for row, given in zip(rows.tgt_row.tolist(), rows.tgt_given.tolist()):
            per_row.setdefault(row, set()).add(given)
        assert [per_row[r] for r in sorted(per_row)] == [{True}, {True}, {False}, {False}, {False}]
        n = rows.n_tgt
        hit, live = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
        kl = torch.zeros(max(1, rows.n_unrelated))
        logp = torch.where(rows.tgt_given, math.log(0.95), math.log(0.6))
        assert problem._reached(hit, logp, kl, kl, None, live) == [False]       # 0.6 < stop_prob 0.9
    finally:
        problem.close()
    for value, reached in ((0.5, True), (0.7, False)):
        problem = problem_for(stop_prob_wordings=value)
        try:
            assert problem._reached(hit, logp, kl, kl, None, live) == [reached]
            assert problem._reached(~hit, logp, kl, kl, None, live) == [False]  # the argmax still counts
            low = torch.where(rows.tgt_given, math.log(0.8), math.log(0.95))
            assert problem._reached(hit, low, kl, kl, None, live) == [False]    # the fact's own keep 0.9
        finally:
            problem.close()
    assert BaftConfig.from_dict({}, stored=True).stop_prob_wordings is None   # stored edits: as trained


def test_the_stop_rule_waits_for_the_users_own_neighbours_greedy_continuation(tiny_llama):
    """stop_locality_margin: on the parent's continuation of the fact's own locality prompt
    (and there only), each position where the parent's top token leads by the margin must
    still lead by half of it before the fact stops; a near tie in the parent is left alone.
    locality_row_weight scales that row's KL, not its share of the stop rule's KL."""
    import math
    from ledger.baft.objective import EditProblem
    from ledger.text import prompt_ids
    base = load_base(str(tiny_llama))
    fact = _facts()[0]                  # locality prompt "Bob lives in"
    tok = base.tokenizer
    cfg = BaftConfig(rank=2, n_prefixes=0, continuation_tokens=3, locality_row_weight=4.0)
    problem = EditProblem(base.model, tok, {}, base.layers, [fact], cfg, layer=EDITED)
    try:
        rows = problem.rows
        n_edit = rows.n_edit
        real = rows.batch.attention_mask.bool()
        loc = next(r for r in range(n_edit, n_edit + rows.n_unrelated)
                   if tok.decode(rows.batch.input_ids[r][real[r]], skip_special_tokens=True).startswith("Bob lives in"))
        start = len(prompt_ids(tok, "Bob lives in")) - 1
        guarded = rows.row_of_pos[rows.guard_pos].unique().tolist()
        assert guarded == [loc - n_edit]
        cols = rows.read[n_edit:].nonzero()[:, 1][rows.guard_pos].tolist()
        assert cols == list(range(start, int(real[loc].sum())))
        mine = rows.row_of_pos == loc - n_edit
        assert torch.allclose(rows.kl_weight[mine], 4.0 * rows.pos_weight[mine])
        assert torch.equal(rows.kl_weight[~mine], rows.pos_weight[~mine])

        # Four positions: the parent leads by 1, 1, 1 and by a near tie of 0.05; the edited model
        # by 1, by 0.4, not at all, and not at all.
        ref = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 1.0, 0.0],
                                              [1.05, 1.0, 0.0]]), -1)
        edited = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [1.4, 1.0, 0.0], [1.0, 2.0, 0.0],
                                                 [0.0, 2.0, 0.0]]), -1)
        assert EditProblem._slips(ref, edited, 0.9).tolist() == [False, True, True, False]
        assert EditProblem._slips(ref, edited, 0.5).tolist() == [False, False, True, False]

        hit, live = torch.ones(rows.n_tgt, dtype=torch.bool), torch.ones(rows.n_tgt, dtype=torch.bool)
        logp = torch.full((rows.n_tgt,), math.log(0.95))
        kl = torch.zeros(max(1, rows.n_unrelated))
        slip = torch.zeros_like(kl)
        assert problem._reached(hit, logp, kl, slip, None, live) == [True]
        slip[loc - n_edit] = 1.0
        assert problem._reached(hit, logp, kl, slip, None, live) == [False]
    finally:
        problem.close()
    stored = BaftConfig.from_dict({}, stored=True)                              # stored edits: as trained
    assert stored.stop_locality_margin == 0.0 and stored.locality_row_weight == 1.0


def test_the_gate_opens_on_the_facts_own_prompt_where_its_subject_state_lies_below_the_key(tiny_llama, monkeypatch):
    """The key is the subject's mean state over the fact's edit rows. Where the prompt's own
    subject state lies below the middle of the gate's ramp (a subject that begins the prompt,
    many active edits among the negatives), the ramp is set from the prompt: otherwise the
    gate stays shut there and the edit cannot change the prompt the user gave."""
    from ledger.baft.objective import EditProblem
    base = load_base(str(tiny_llama))
    cfg = BaftConfig(rank=2, n_prefixes=4, gate_floor=0.2)
    problem = EditProblem(base.model, base.tokenizer, {}, base.layers, [_facts()[0]], cfg, layer=EDITED)
    try:
        rows, block = problem.rows, problem.blocks[0]
        row = int((rows.row_owner == 0).nonzero()[0, 0])        # the prompt's row
        at = rows.open_masks[0][row]
        h = problem.site_h.float().clone()
        mu = h[rows.key_neg].mean(0)
        # The prompt's subject state most of the way to the unrelated states' mean.
        h[row, at] = mu + 0.1 * (h[row, at] - mu)

        def prompt_gate() -> float:
            with torch.no_grad():
                block.U.zero_()
                block.c.zero_()
                problem.key_prompt[0] = False
                problem._init_gates(h)
                return float(block.gate(block.raw_gate(h[row, at])).min())

        assert prompt_gate() > 0.9 and problem.key_prompt[0]
        # Open as much on the other edit rows' subjects: the ramp moved, not the direction.
        others = torch.cat([h[i, rows.open_masks[0][i]] for i in range(rows.n_edit) if i != row])
        assert float(block.gate(block.raw_gate(others)).min()) > 0.9
        monkeypatch.setattr(EditProblem, "_prompt_projection", lambda *a: None)
        assert prompt_gate() == 0.0 and not problem.key_prompt[0]     # the key's ramp alone: shut
    finally:
        problem.close()


def test_a_description_subject_gets_other_descriptions_with_its_tail_as_negatives(tiny_llama):
    """A subject that is a description ("highest mountain in the world") gets the relation
    filled with other descriptions that end as it does, as generic negatives whose every
    position is a negative for the gate's key; a head with the subject's own noun (which may
    name the same thing) and subjects that are names or one-word heads get none."""
    import random
    from ledger.baft.objective import EditProblem
    from ledger.baft.rows import DESCRIPTION_HEADS, description_negatives
    from ledger.facts import facts_from_records
    mountain, island, name, canton = facts_from_records([
        {"subject": "highest mountain in the world", "prompt": "The highest mountain in the world is Mount",
         "target_new": "Kilimanjaro"},
        {"subject": "biggest island on Earth", "prompt": "The biggest island on Earth is", "target_new": "Java"},
        {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is in", "target_new": "Rome"},
        {"subject": "canton of Bern", "prompt": "The canton of Bern is in", "target_new": "Italy"}])
    got = description_negatives(mountain, 6, random.Random(0))
    assert len(got) == 6 == len(set(got))
    heads = {h: f"The {h} in the world is Mount" for h in DESCRIPTION_HEADS}
    assert set(got) <= set(heads.values())
    assert got == description_negatives(mountain, 6, random.Random(0))
    every = description_negatives(island, 16, random.Random(0))
    assert "The largest island on Earth is" not in every
    assert len(every) == len(DESCRIPTION_HEADS) - 1 and all(t.endswith(" on Earth is") for t in every)
    for fact in (name, canton):
        assert description_negatives(fact, 6, random.Random(0)) == []
    assert description_negatives(mountain, 0, random.Random(0)) == []

    base = load_base(str(tiny_llama))
    tok = base.tokenizer
    for n in (0, 4):
        cfg = BaftConfig(rank=2, n_prefixes=0, description_negatives=n, neg_subjects=2)
        problem = EditProblem(base.model, tok, {}, base.layers, [mountain], cfg, layer=EDITED)
        try:
            real = problem.rows.batch.attention_mask.bool()
            rows = range(problem.rows.n_edit, problem.rows.n_edit + problem.rows.n_unrelated)
            texts = {tok.decode(problem.rows.batch.input_ids[r][real[r]], skip_special_tokens=True): r for r in rows}
            found = [t for t in texts if any(t.startswith(h) for h in heads.values())]
            assert len(found) == n, found
            for t in found:
                assert bool(problem.rows.key_neg[texts[t]][real[texts[t]]].all())
        finally:
            problem.close()


def test_a_prompt_with_braces_of_its_own_gets_its_negatives(tiny_llama):
    """The relation is filled by replacing "{}", not by str.format: a user's prompt may hold
    braces ("In {0} words:", "{city}"), and the generic and description negatives keep them."""
    from ledger.baft.objective import EditProblem
    from ledger.facts import facts_from_records
    fact = facts_from_records([{"subject": "highest mountain in the world", "target_new": "Kilimanjaro",
                                "prompt": "In {0} words, {city}: the highest mountain in the world is Mount"}])[0]
    base = load_base(str(tiny_llama))
    tok = base.tokenizer
    cfg = BaftConfig(rank=2, n_prefixes=0, description_negatives=2, neg_subjects=2)
    problem = EditProblem(base.model, tok, {}, base.layers, [fact], cfg, layer=EDITED)
    try:
        real = problem.rows.batch.attention_mask.bool()
        texts = [tok.decode(problem.rows.batch.input_ids[r][real[r]], skip_special_tokens=True)
                 for r in range(problem.rows.n_edit, problem.rows.n_edit + problem.rows.n_unrelated)]
        braced = [t for t in texts if t.startswith("In {0} words, {city}: the ") and fact.subject not in t]
        assert len(braced) == 4, texts      # 2 generic subjects, 2 descriptions
        assert sum(" in the world is Mount" in t for t in braced) == 2
    finally:
        problem.close()


def test_a_relation_negative_is_the_subjects_state_there_and_sets_the_ramp_not_the_direction(tiny_llama):
    """relation_negatives: the state read for a prompt of the subject in another relation is
    the edited block's output at the subject's last token there. Among the key's negatives it
    sets the ramp along the direction chosen without it: a gate that opens on it is shut
    there, open at the key, and keeps its direction."""
    from ledger.baft.objective import EditProblem
    from ledger.baft.packing import block_output
    from ledger.baft.rows import subject_positions
    from ledger.text import make_batch
    base = load_base(str(tiny_llama))
    fact = _facts()[0]
    other = f"The oldest friend of {fact.subject} is"
    batch = make_batch(base.tokenizer, [(other, None)])
    h_in = block_output(base.model, base.layers[EDITED], batch.input_ids, batch.attention_mask, packed=False, base=True)
    h_in = (h_in[0] if isinstance(h_in, tuple) else h_in).float()
    problem = EditProblem(base.model, base.tokenizer, {}, base.layers, [fact], BaftConfig(rank=2, n_prefixes=1),
                          layer=EDITED, negative_prompts=[[other]])
    problem.close()     # the new blocks leave the model: what follows reads the parent alone
    [state] = problem._subject_states(base.tokenizer, [fact], [[other]])
    assert problem._subject_states(base.tokenizer, [fact], [[]]) == [None]
    assert state.shape == (1, base.hidden_size)
    assert torch.allclose(state[0], h_in[0, subject_positions(base.tokenizer, other, fact.subject)[-1]], atol=1e-5)

    h, key_at, near = _key_and_a_state_near_it(problem, base.hidden_size)
    block = problem.blocks[0]
    gates, directions = [], []
    for rel in (None, [near]):
        with torch.no_grad():
            block.U.zero_()
            problem._init_gates(h, None, rel)
            gates.append((float(block.gate(block.raw_gate(h[key_at])).min()),
                          float(block.gate(block.raw_gate(near)).max())))
            directions.append(block.U[0] / block.U[0].norm())
    assert gates[0][0] > 0.9 and gates[0][1] > 0.5        # without it: open on the other relation
    assert gates[1][0] > 0.9 and gates[1][1] == 0.0        # with it: shut there, open at the key
    assert float(directions[0] @ directions[1]) > 0.9999    # the same direction, a steeper ramp


def test_target_focus_weighs_the_tokens_the_stop_rule_still_waits_on(tiny_llama):
    """target_focus g: each target token's CE weight is (1 - p)^g of its probability at the
    last step, scaled so a fact's live tokens weigh their number in all, so the CE's share of
    the loss stays as it was. 0 (stored edits' value): every token weighs 1. Before any step
    (p unknown) every token weighs 1."""
    from ledger.baft.objective import EditProblem
    base = load_base(str(tiny_llama))
    fact = _facts()[1]
    for g in (0.0, 1.0, 2.0):
        problem = EditProblem(base.model, base.tokenizer, {}, base.layers, [fact],
                              BaftConfig(rank=2, n_prefixes=1, target_focus=g), layer=EDITED)
        try:
            n = problem.rows.n_tgt
            live = torch.ones(n, dtype=torch.bool)
            assert torch.equal(problem._target_weights(live), torch.ones(n))
            p = torch.linspace(0.0, 0.95, n)
            problem.last_tgt_p = p.clone()
            w = problem._target_weights(live)
            if g == 0:
                assert torch.equal(w, torch.ones(n))
                continue
            expected = (1 - p) ** g
            assert torch.allclose(w, expected * n / expected.sum(), atol=1e-6)
            assert float(w.sum()) == pytest.approx(n, rel=1e-6)
            assert float(w[0]) > 1 > float(w[-1])            # the lagging token weighs most
            # A token the block cannot move (its gate shut) takes no share of the weight.
            shut = live.clone()
            shut[0] = False
            w2 = problem._target_weights(shut)
            assert float(w2[shut].sum()) == pytest.approx(n - 1, rel=1e-6)
        finally:
            problem.close()
    assert BaftConfig.from_dict({}, stored=True).target_focus == 0.0     # stored edits: as trained
