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

from support import FACT, FACT2, FACT3, write_model

# Tiny models: a second thread costs more in synchronisation than it gives.
torch.set_num_threads(1)

PG_ADMIN_URL = os.environ.get("LEDGER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_other(tmp_path_factory) -> Path:
    """Same architecture, other weights: a different base model."""
    return write_model(tmp_path_factory.mktemp("tiny-llama-other"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


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
