"""Helpers shared by the test modules: the tiny byte-level models, the facts they learn, a toy
model whose every argmax is known, row counts of a ledger, and a Python that cannot import
this project. Fixtures built on them live in conftest.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from sqlalchemy import text

# A fact the tiny models can learn in a few steps: short prompt, one-token-per-byte target.
FACT = {"subject": "Alice", "prompt": "Alice lives in", "target_new": "Rome", "target_true": "Oslo",
        "rephrase_prompts": ["The home of Alice is"],
        "locality_prompts": [{"prompt": "Bob lives in", "answer": "Oslo"}]}
FACT2 = {"subject": "Carol", "prompt": "Carol works at", "target_new": "a farm",
         "locality_prompts": [{"prompt": "Dave works at", "answer": "a bank"}]}
FACT3 = {"subject": "Erin", "prompt": "Erin plays", "target_new": "chess"}

# Few steps keep the fast tests fast; these tests check plumbing and exactness, not quality.
FAST = {"steps": 6, "min_steps": 0, "rank": 2, "layer": 1, "n_prefixes": 1}

# Prompts whose last-position logits stand for "the model" when two compositions are compared.
PROMPTS = ["Alice lives in", "Bob lives in", "The home of Alice is"]


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is a token, plus an end token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|end|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<|end|>",
                                   bos_token="<|end|>")


def write_model(path: Path, family: str, seed: int = 0) -> Path:
    """A tiny random model of `family` ("llama" or "gpt2") and its tokenizer, saved at `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=512,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def counts(url: str) -> dict:
    """Rows per table and the head revision: equal before and after means nothing was written."""
    from ledger.store import refs as revs
    from ledger.store.engine import make_engine
    eng = make_engine(url)
    with eng.connect() as c:
        out = {t: c.execute(text(f"SELECT count(*) FROM {t}")).scalar()
               for t in ("blobs", "edits", "revisions", "revision_changes", "refs", "reflog", "audit_events")}
        out["head"] = revs.head(c).revision
    eng.dispose()
    return out


def logits_of(lg, rev: str | None = None) -> torch.Tensor:
    """The last-position logits of PROMPTS in the model composed at `rev` (HEAD by default)."""
    m = lg.model_at(rev)
    return torch.stack([m.logits(p)[-1] for p in PROMPTS])


TOK = byte_tokenizer()
V = len(TOK)


class Oracle(torch.nn.Module):
    """A causal LM whose next token is a fixed lookup from the last 3 tokens (the current one
    and the two before), built from the strings it "knows"; an unknown context predicts the
    end token. Logits are 10 at the predicted token and 0 elsewhere, so every argmax and
    log-probability is known. With at=True it predicts the token AT each position instead
    of the next one (the teacher-forcing off-by-one)."""

    def __init__(self, strings, at=False, k=3):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))    # measure() reads the device from it
        self.at, self.k, self.table = at, k, {}
        for s in strings:
            ids = TOK(s)["input_ids"]
            for i in range(1, len(ids)):
                ctx = tuple(ids[max(0, i - k):i])
                assert self.table.get(ctx, ids[i]) == ids[i], f"the strings disagree after {TOK.decode(list(ctx))!r}"
                self.table[ctx] = ids[i]

    def forward(self, input_ids, attention_mask=None, **_):
        B, T = input_ids.shape
        out = torch.zeros(B, T, V)
        for b in range(B):
            ids = input_ids[b].tolist()
            for t in range(T):
                nxt = ids[t] if self.at else self.table.get(tuple(ids[max(0, t + 1 - self.k):t + 1]), TOK.eos_token_id)
                out[b, t, nxt] = 10.0
        return SimpleNamespace(logits=out)


def random_blocks(d: int, ranks: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random blocks of a BaFT-like form (R with orthonormal rows, W near R) whose gates vary
    strongly with h, so every term of the formula matters."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        q, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
        R = q.T.contiguous()
        t = {"R": R, "W": R + torch.randn(r, d, generator=g) / d, "b": 0.1 * torch.randn(r, generator=g),
             "U": torch.randn(r, d, generator=g) / d, "c": -4.0 + torch.randn(r, generator=g)}
        t["U"] = t["U"] * 50   # gates that really vary with h
        t["W"] = t["W"] + 0.3 * torch.randn(t["W"].shape, generator=g)
        out.append(t)
    return out


# Runs in a fresh interpreter from which this project's package cannot be imported.
ISOLATED = r"""
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p and (p.rstrip("/") != sys.argv[3] and (
    "site-packages" in p or not p.startswith(sys.argv[3])))]
assert importlib.util.find_spec("ledger") is None, "ledger is importable"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
res = {"class": type(model).__name__, "logits": [], "greedy": []}
with torch.no_grad():
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        res["logits"].append(model(**enc).logits[0, -1].tolist())
        g = model.generate(**enc, max_new_tokens=int(sys.argv[4]), do_sample=False, pad_token_id=tok.pad_token_id)
        res["greedy"].append(g[0, enc["input_ids"].shape[1]:].tolist())
print(json.dumps(res))
"""


def run_isolated(out: Path, prompts: list[str], project_root: str, n_new: int = 6) -> dict:
    """Load the snapshot at `out` with plain transformers in a Python that cannot import
    ledger; return its class name, last-position logits and greedy tokens per prompt."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(out.parent / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", ISOLATED, str(out), json.dumps(prompts), str(project_root),
                           str(n_new)], capture_output=True, text=True, env=env, cwd=str(out.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_edits(lg, n: int) -> None:
    """n short edits, one revision each, spread over the model's layers in turn: a ledger
    with many stored blocks at several layers in a few seconds."""
    from ledger import BaftConfig, parse_facts_text
    n_layers = len(lg.base.layers)
    facts = parse_facts_text(json.dumps([{"subject": f"Subject {i}", "prompt": f"Subject {i} lives in",
                                          "target_new": "Rome"} for i in range(n)]))
    for i, fact in enumerate(facts):
        lg.add([fact], BaftConfig(steps=2, min_steps=0, rank=2, layer=i % n_layers, n_prefixes=0))
