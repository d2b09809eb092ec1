"""Fixtures: tiny random models written to disk (no file from a hub, no network), and a fresh
database per test on SQLite and, where the server runs, PostgreSQL.

On a machine without PostgreSQL the PostgreSQL cases skip with the reason shown; under CI
(CI=true) they fail instead, so CI can never pass without exercising PostgreSQL.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

# Tiny models: a second thread costs more in synchronisation than it gives.
torch.set_num_threads(1)

PG_ADMIN_URL = os.environ.get("LEDGER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _byte_tokenizer():
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


def _write_model(path: Path, family: str, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    tok = _byte_tokenizer()
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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _write_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_other(tmp_path_factory) -> Path:
    """Same architecture, other weights: a different base model."""
    return _write_model(tmp_path_factory.mktemp("tiny-llama-other"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _write_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(autouse=True)
def _test_env(monkeypatch):
    # A fixed author, and no ledger URL leaking in from the caller's shell.
    monkeypatch.setenv("LEDGER_AUTHOR", "tester")
    monkeypatch.delenv("LEDGER_DB", raising=False)


def _pg_available() -> str | None:
    from sqlalchemy import create_engine, text
    try:
        eng = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "no server here"
        return str(e).splitlines()[0]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A URL of a fresh, empty database on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    reason = _pg_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required in CI and not reachable: {reason}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {reason}")
    from sqlalchemy import create_engine, text
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# A fact the tiny models can learn in a few steps: short prompt, one-token-per-byte target.
FACT = {"subject": "Alice", "prompt": "Alice lives in", "target_new": "Rome", "target_true": "Oslo",
        "rephrase_prompts": ["The home of Alice is"],
        "locality_prompts": [{"prompt": "Bob lives in", "answer": "Oslo"}]}
FACT2 = {"subject": "Carol", "prompt": "Carol works at", "target_new": "a farm",
         "locality_prompts": [{"prompt": "Dave works at", "answer": "a bank"}]}
FACT3 = {"subject": "Erin", "prompt": "Erin plays", "target_new": "chess"}

# Few steps keep the fast tests fast; these tests check plumbing and exactness, not quality.
FAST = {"steps": 6, "min_steps": 0, "rank": 2, "layer": 1, "n_prefixes": 1}


@pytest.fixture
def ledger(db_url, tiny_llama):
    """A new ledger on the tiny Llama, on each engine, with an empty wordings table (the
    built-in tables are tested in test_wordings.py; elsewhere they would only add rows)."""
    from ledger import Ledger
    lg = Ledger.init(db_url, model=str(tiny_llama), wordings=False)
    yield lg
    lg.close()


@pytest.fixture
def fact_file(tmp_path) -> Path:
    p = tmp_path / "fact.json"
    p.write_text(json.dumps(FACT))
    return p


@pytest.fixture
def facts_file(tmp_path) -> Path:
    p = tmp_path / "facts.jsonl"
    p.write_text("\n".join(json.dumps(f) for f in (FACT, FACT2, FACT3)))
    return p
