"""`ledger explain`: on the tiny Llama with edits whose gates are set by hand (the named edit
fires exactly where its gate is open, with the weight and change norm of the formula), the
probabilities beside the base model's, the CLI's text and JSON; and on SmolLM2 (slow) after two
trained edits, each prompt names its own edit and an unrelated prompt none."""
import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from ledger.baft.layer import block_delta
from ledger.compose import Block, fuse
from ledger.errors import InputError, NotFoundError
from ledger.explain import Explanation, edit_gates_and_changes, explain
from ledger.names import edit_name
from ledger.store import blobs, edits, refs, revisions
from ledger.store.engine import write_transaction
from ledger.text import greedy_token_ids, prompt_ids

from support import random_blocks

PROMPT = "Alice lives in"
OPEN_AT = 4          # the 'e' closing "Alice": the hand-set gate opens there and nowhere else
FLOOR = 0.2
EDIT_LAYER = 1       # the selective and the shut edit; the always-open one sits above, at 2


def commit_blocks(lg: Ledger, blocks: list[tuple[int, dict[str, torch.Tensor]]]) -> list[str]:
    """Store hand-made blocks (layer, tensors) as edits through the storage code `ledger add`
    uses, added in one revision on main; their names."""
    with write_transaction(lg.engine) as conn:
        parent = refs.resolve(conn, "main")
        ids = []
        for k, (layer, t) in enumerate(blocks):
            address = blobs.put(conn, blobs.encode(t))
            subject = f"Hand {k}"
            ids.append(edits.write(conn, {
                "fact_json": json.dumps({"subject": subject, "prompt": f"{subject} lives in", "target_new": "Rome"}),
                "subject": subject, "relation": "{} lives in", "method": "baft", "layer": layer,
                "rank": int(t["R"].shape[0]), "config_json": "{}", "blob_sha256": address,
                "metrics_json": "{}", "stats_json": "{}", "versions_json": "{}", "trained_on": parent,
                "author": "tester", "created_at": blobs.now()}))
        rev = revisions.append(conn, parent_id=parent, operation="add", author="tester", message="hand-made",
                               changes=[(i, "add") for i in ids])
        refs.set_ref(conn, "main", "branch", rev.id, "tester", "test")
    return [edit_name(i) for i in ids]


def states_at(lg: Ledger, layer: int, text: str | list[int], rev: str = "HEAD") -> torch.Tensor:
    """The output of decoder block `layer` (before any intervention there) for a text or a
    list of token ids, T x d."""
    composed = lg.model_at(rev)
    kept = {}

    def keep(module, args, out):
        kept["h"] = (out[0] if isinstance(out, tuple) else out)[0].detach()   # returns None: output unchanged
    handle = composed.base.layers[layer].register_forward_hook(keep, prepend=True)
    try:
        ids = lg.base.tokenizer(text)["input_ids"] if isinstance(text, str) else text
        with torch.no_grad():
            composed.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return kept["h"]


def hand_gated(h: torch.Tensor, at: int, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A block whose gate is open (about 0.9975 before the floor) at position `at` of the states
    h and shut (below 0.0025, so 0 after the floor) at every other position: U reads the
    direction that sets h[at] apart, c puts the threshold half-way to the nearest other state."""
    [t] = random_blocks(h.shape[1], [rank], seed=seed)
    others = torch.cat([h[:at], h[at + 1:]])
    e = h[at] - others.mean(0)
    e = e / e.norm()
    p_at, p_other = float(h[at] @ e), float((others @ e).max())
    assert p_at > p_other
    k = 12.0 / (p_at - p_other)
    t["U"] = (k * e).repeat(rank, 1)
    t["c"] = torch.full((rank,), -k * (p_at + p_other) / 2)
    t["floor"] = torch.full((rank,), FLOOR)
    return t


def constant_gate(d: int, bias: float, seed: int) -> dict[str, torch.Tensor]:
    """A block whose gate reads nothing: sigmoid(bias) everywhere, open or shut by its sign."""
    [t] = random_blocks(d, [2], seed=seed)
    t["U"] = torch.zeros_like(t["U"])
    t["c"] = torch.full((2,), bias)
    t["floor"] = torch.full((2,), FLOOR)
    return t


@pytest.fixture
def hand_ledger(ledger):
    """The tiny Llama's ledger at rev-2: a selective edit open at OPEN_AT of PROMPT, one shut
    everywhere (both at EDIT_LAYER) and one open everywhere at the layer above."""
    h = states_at(ledger, EDIT_LAYER, PROMPT)
    d = h.shape[1]
    blocks = [(EDIT_LAYER, hand_gated(h, OPEN_AT)), (EDIT_LAYER, constant_gate(d, -10.0, seed=1)),
              (EDIT_LAYER + 1, constant_gate(d, 10.0, seed=2))]
    names = commit_blocks(ledger, blocks)
    return ledger, names, {n: t for n, (_, t) in zip(names, blocks)}


def reference(lg: Ledger, text: str | list[int], tensors: dict[str, dict], layers: dict[str, int]) -> dict:
    """Per edit, per position: (weight, norm) by the formula term by term (block_delta) on the
    states the composed model gives at the edit's layer."""
    out = {}
    for name, t in tensors.items():
        h = states_at(lg, layers[name], text)
        s = torch.sigmoid(h @ t["U"].T + t["c"])
        g = torch.clamp_min((s - t["floor"]) / (1 - t["floor"]), 0.0)
        out[name] = (g.max(-1).values, block_delta(t, h).norm(dim=-1))
    return out


def test_the_named_edit_fires_exactly_where_its_gate_is_open(hand_ledger):
    lg, [selective, shut, always], tensors = hand_ledger
    ex = explain(lg, PROMPT, max_new_tokens=4)
    assert isinstance(ex, Explanation) and ex.revision == "rev-2" and ex.prompt == PROMPT
    assert ex.continuation == lg.generate(PROMPT, max_new_tokens=4)
    n_prompt = len(PROMPT)                        # one token per byte, no start token
    assert [t.index for t in ex.tokens] == list(range(len(ex.tokens)))
    assert [t.generated for t in ex.tokens] == [i >= n_prompt for i in range(len(ex.tokens))]
    assert "".join(t.token for t in ex.tokens[:n_prompt]) == PROMPT

    for t in ex.tokens[:n_prompt]:
        fired = {f.edit for f in t.firings}
        assert (selective in fired) == (t.index == OPEN_AT)
        assert shut not in fired and always in fired
    at = ex.tokens[OPEN_AT].firings
    assert [f.edit for f in at] == [always, selective]       # strongest first
    assert {f.layer for f in at if f.edit == selective} == {EDIT_LAYER}

    # Every weight and norm, at every position (the generated ones too), is the formula's.
    layers = {selective: EDIT_LAYER, shut: EDIT_LAYER, always: EDIT_LAYER + 1}
    composed = lg.model_at()
    ids = prompt_ids(composed.tokenizer, PROMPT)
    ids += greedy_token_ids(composed.model, composed.tokenizer, [PROMPT], 4)[0]
    assert "".join(t.token for t in ex.tokens) == composed.tokenizer.decode(ids)
    ref = reference(lg, ids, tensors, layers)
    for t in ex.tokens:
        got = {f.edit: f for f in t.firings}
        for name, (w, norm) in ref.items():
            if float(w[t.index]) > 0:
                assert got[name].weight == pytest.approx(float(w[t.index]), abs=1e-5)
                assert got[name].norm == pytest.approx(float(norm[t.index]), rel=1e-4, abs=1e-6)
            else:
                assert name not in got
    assert ex.tokens[OPEN_AT].firings[1].weight > 0.99 and ex.tokens[OPEN_AT].firings[1].norm > 0


def test_a_character_split_over_tokens_shows_whole():
    """A byte-level vocabulary splits "é" and "日" into several tokens: the token that completes
    the character shows it whole, the ones before it show nothing, and the pieces join to the
    text, where decoding tokens one by one would show a replacement character for each part."""
    from support import byte_tokenizer
    from ledger.explain import token_texts
    tok = byte_tokenizer()
    text = "Café 日本 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)       # the case exists
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "é" in pieces and "日" in pieces and "" in pieces


def test_top_next_at_the_revision_and_at_the_base(hand_ledger):
    lg, _, _ = hand_ledger
    ex = explain(lg, PROMPT, top_k=7)
    p_rev = torch.softmax(lg.model_at("rev-2").logits(PROMPT)[-1], -1)
    p_base = torch.softmax(lg.model_at("rev-1").logits(PROMPT)[-1], -1)
    top = torch.topk(p_rev, 7)
    tok = lg.base.tokenizer
    assert [r["token"] for r in ex.top_next] == [tok.decode([i]) for i in top.indices.tolist()]
    for r, i in zip(ex.top_next, top.indices.tolist()):
        assert r["p_revision"] == pytest.approx(float(p_rev[i]), abs=1e-6)
        assert r["p_base"] == pytest.approx(float(p_base[i]), abs=1e-6)
    assert any(abs(r["p_revision"] - r["p_base"]) > 1e-4 for r in ex.top_next)   # the edits did something
    assert ex.continuation == "" and not any(t.generated for t in ex.tokens)


def test_explain_leaves_the_composed_model_as_it_was(hand_ledger):
    lg, _, _ = hand_ledger
    before = lg.model_at().logits(PROMPT)
    sites = lg.model_at().sites
    explain(lg, PROMPT, max_new_tokens=2)
    assert lg.model_at().sites is sites
    assert torch.equal(lg.model_at().logits(PROMPT), before)


def test_a_revision_without_edits_fires_nothing(hand_ledger):
    lg, _, _ = hand_ledger
    ex = lg.explain(PROMPT, rev="rev-1", top_k=3)
    assert ex.revision == "rev-1" and all(t.firings == [] for t in ex.tokens)
    assert all(r["p_revision"] == pytest.approx(r["p_base"], abs=1e-6) for r in ex.top_next)


def test_per_edit_changes_add_up_to_the_site_change():
    """The per-edit split of a fused site sums to what the site adds to the residual stream."""
    d = 32
    ts = random_blocks(d, [2, 3, 1], seed=4)
    for t in ts:
        t["floor"] = torch.full((t["R"].shape[0],), FLOOR)
        t["c"] = t["c"] + 4.0            # about half of the gates open
    site = fuse([Block(i + 1, 0, t) for i, t in enumerate(ts)], d)[0]
    h = torch.randn(9, d)
    weights, changes = edit_gates_and_changes(site, h, [(1, 2), (2, 3), (3, 1)])
    total = sum(c for c in changes if c is not None)
    with torch.no_grad():
        assert (total - site.fused(h)).abs().max() < 1e-5
    for t, c in zip(ts, changes):
        assert c is None or (c - block_delta(t, h)).abs().max() < 1e-5


def test_bad_input_is_refused(hand_ledger):
    lg, _, _ = hand_ledger
    with pytest.raises(InputError, match="prompt is empty"):
        explain(lg, "  ")
    with pytest.raises(InputError, match="max-new-tokens"):
        explain(lg, PROMPT, max_new_tokens=-1)
    with pytest.raises(InputError, match="top-k"):
        explain(lg, PROMPT, top_k=0)
    with pytest.raises(NotFoundError, match="rev-9"):
        explain(lg, PROMPT, rev="rev-9")


def test_cli_text_and_json(hand_ledger, db_url):
    lg, [selective, shut, always], _ = hand_ledger
    expected = lg.explain(PROMPT, max_new_tokens=2, top_k=3).to_dict()
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", db_url, "explain", PROMPT, "--max-new-tokens", "2", "--top-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == expected

    res = runner.invoke(cli, ["--db", db_url, "explain", PROMPT, "--max-new-tokens", "2", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    rows = [ln for ln in lines if ln[:5].strip().rstrip("+").isdigit()]
    assert len(rows) == len(expected["tokens"]) + 3           # a line per token, then the top-k rows
    token_rows = rows[:len(expected["tokens"])]
    assert [selective in ln for ln in token_rows] == [i == OPEN_AT for i in range(len(token_rows))]
    assert all(always in ln and shut not in ln for ln in token_rows)
    assert repr(" ") in token_rows[5]                                     # tokens shown repr-style
    assert sum("+" in ln[:6] for ln in token_rows) == 2                   # the generated ones marked

    res = runner.invoke(cli, ["--db", db_url, "explain", PROMPT, "--rev", "rev-9"])
    show = runner.invoke(cli, ["--db", db_url, "show", "rev-9"])      # the same error as every command's
    assert (res.exit_code, res.stderr) == (show.exit_code, show.stderr) == (2, "error: no revision rev-9\n")
    res = runner.invoke(cli, ["--db", db_url, "explain", PROMPT, "--top-k", "0"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1


def test_cli_keeps_hostile_tokens_on_one_line(hand_ledger, db_url):
    hostile = "A\nB\r\x1b[31mC\u202e\t"
    res = CliRunner().invoke(cli, ["--db", db_url, "explain", hostile, "--top-k", "2"])
    assert res.exit_code == 0, res.output
    ex = hand_ledger[0].explain(hostile, top_k=2)
    assert "\x1b" not in res.stdout and "\u202e" not in res.stdout and "\r" not in res.stdout
    rows = [ln for ln in res.stdout.splitlines() if ln[:5].strip().rstrip("+").isdigit()]
    assert len(rows) == len(ex.tokens) + 2


# --- SmolLM2 -----------------------------------------------------------------------------------

MOUNTAIN = {"subject": "Japan", "prompt": "The highest mountain in Japan is Mount", "target_new": "Etna",
            "target_true": "Fuji"}
TONGUE = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is",
          "target_new": "English", "target_true": "French"}
UNRELATED = "The chemical symbol for gold is"


@pytest.mark.slow
def test_smollm2_explain_names_the_edit_behind_the_new_answer(tmp_path):
    from ledger import load_facts
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = tmp_path / "facts.json"
        path.write_text(json.dumps([MOUNTAIN, TONGUE]))
        # No wordings table: training on the facts' own prompts is quicker, and where a gate
        # opens (what explain reads) is set by the subject's key either way.
        with Ledger.init(f"sqlite:///{tmp_path / 'ledger.db'}", wordings=False) as lg:
            added = lg.add(load_facts(path))
            mountain, tongue = [r.edit for r in added]
            for fact, own, other in ((MOUNTAIN, mountain, tongue), (TONGUE, tongue, mountain)):
                ex = lg.explain(fact["prompt"], max_new_tokens=3)
                assert ex.continuation.strip().startswith(fact["target_new"])
                fired = {f.edit for t in ex.tokens for f in t.firings}
                assert own in fired and other not in fired, (fact["prompt"], fired)
                # It fires on the subject's tokens, and the new answer leads the next tokens.
                subject_tokens = [t for t in ex.tokens if not t.generated and t.token.strip()
                                  and t.token.strip() in fact["subject"]]
                assert any(own in {f.edit for f in t.firings} for t in subject_tokens)
                assert fact["target_new"].startswith(ex.top_next[0]["token"].strip())
                assert ex.top_next[0]["p_revision"] > 0.5 > ex.top_next[0]["p_base"]
            ex = lg.explain(UNRELATED, max_new_tokens=3)
            assert all(t.firings == [] for t in ex.tokens)
            assert all(r["p_revision"] == pytest.approx(r["p_base"], abs=1e-5) for r in ex.top_next)
    finally:
        torch.set_num_threads(old)
