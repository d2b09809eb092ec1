"""Migrations in the style of pytest-alembic, on both engines: one head, empty -> head,
down and up again, models equal to the migrated schema, and old schemas refused until
`ledger db upgrade`."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import inspect

from cli.main import cli
from ledger import Ledger
from ledger.errors import SchemaError
from ledger.store.engine import alembic_config, current_revision, downgrade, head_revision, make_engine, upgrade
from ledger.store.schema import Base


def test_single_head():
    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1


def _revisions():
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def test_upgrade_downgrade_round_trip_and_models_match(db_url):
    eng = make_engine(db_url, create_dir=True)
    steps = _revisions()
    for rev in steps:                          # up one step at a time
        upgrade(eng, rev)
        assert current_revision(eng) == rev
    tables = set(inspect(eng).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with eng.connect() as conn:                # `alembic check`: no difference left
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    for rev in reversed(steps[:-1]):           # down one step at a time
        downgrade(eng, rev)
        assert current_revision(eng) == rev
    downgrade(eng, "base")
    assert current_revision(eng) is None
    upgrade(eng)
    assert current_revision(eng) == head_revision()
    eng.dispose()


def test_old_schema_is_refused_and_unchanged_until_upgrade(db_url, tiny_llama):
    Ledger.init(db_url, model=str(tiny_llama)).close()
    eng = make_engine(db_url)
    previous = _revisions()[-2]
    downgrade(eng, previous)
    tables = set(inspect(eng).get_table_names())
    with pytest.raises(SchemaError, match=f"schema is at {previous}.*run `ledger db upgrade`"):
        Ledger.open(db_url)
    res = CliRunner().invoke(cli, ["--db", db_url, "log"])
    assert res.exit_code == 1 and "run `ledger db upgrade`" in res.stderr
    assert set(inspect(eng).get_table_names()) == tables and current_revision(eng) == previous
    res = CliRunner().invoke(cli, ["--db", db_url, "db", "upgrade"])
    assert res.exit_code == 0 and f"{previous} -> {head_revision()}" in res.stdout
    with Ledger.open(db_url) as lg:
        assert lg.head()["revision"] == "rev-1" and lg.verify() == []
    eng.dispose()
