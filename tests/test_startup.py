"""The reading commands start without the model side: `ledger --help`, log, show, status, refs,
audit, diff, verify (and the other commands that never run a model) import neither torch nor
transformers, which cost every command a second or more; and they read through a plain
driver connection, without SQLAlchemy, whose import alone costs more than `ledger log` may
(store/database.py). Each command runs in a fresh interpreter, so what it imports is what a
user's `ledger ...` imports. No wall-clock limits here: bench/startup.py measures the time."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import add_edits

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")

# Runs each command through click in a new interpreter and reports, after each one, which of
# the heavy modules are loaded.
RUN_COMMANDS = r"""
import json, sys
from click.testing import CliRunner
from cli.main import cli
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli, args)
    out.append({"args": args, "exit_code": r.exit_code, "output": r.output[-400:],
                "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]})
print(json.dumps(out))
"""


def loaded_after(commands: list[list[str]], modules: tuple[str, ...] = HEAVY) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands), json.dumps(modules)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_no_model_side():
    [r] = loaded_after([["--help"]])
    assert r["exit_code"] == 0 and "verify" in r["output"]
    assert r["loaded"] == []


READING = [["log"], ["show"], ["show", "rev-2"], ["status"], ["refs"], ["reflog"], ["audit"],
           ["diff", "rev-1", "HEAD"], ["verify"], ["wordings", "list"], ["db", "current"], ["log", "--help"]]


def test_reading_commands_import_no_model_side(ledger, db_url):
    add_edits(ledger, 2)
    ledger.tag("v1", "rev-2")
    results = loaded_after([["--db", db_url, *args] for args in READING])
    for args, r in zip(READING, results):
        assert r["exit_code"] == 0, (args, r["output"])
        assert r["loaded"] == [], f"`ledger {' '.join(args)}` imported {r['loaded']}"
    assert "rev-3" in results[0]["output"] and "ok" in results[8]["output"]


def test_commands_that_move_refs_import_no_model_side(ledger, db_url):
    add_edits(ledger, 1)
    commands = [["branch", "side", "rev-1"], ["tag", "t1", "rev-2"], ["checkout", "side"], ["checkout", "main"]]
    for args, r in zip(commands, loaded_after([["--db", db_url, *args] for args in commands])):
        assert r["exit_code"] == 0, (args, r["output"])
        assert r["loaded"] == [], f"`ledger {' '.join(args)}` imported {r['loaded']}"


def test_the_library_imports_light_and_loads_the_rest_on_use():
    code = ("import sys, ledger; from ledger import BaftConfig, load_facts, InputError, Fact; "
            "light = [m for m in ('torch', 'transformers', 'sqlalchemy') if m in sys.modules]; "
            "from ledger import Ledger, load_snapshot; from ledger.baft import FusedIntervention; "
            "print(light, Ledger.__module__, load_snapshot.__module__, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "ledger.api", "ledger.export", "True"]


def test_the_migration_head_read_from_the_files_is_alembics():
    from alembic.script import ScriptDirectory
    from ledger.store.engine import alembic_config, head_revision
    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()


# --- blobs checked and measured without torch (verify, diff) ---------------------------------------

def test_check_and_norm_agree_with_decode_and_tensor_norm():
    from ledger.records import tensor_norm
    from ledger.store import blobs
    t = {"R": torch.randn(2, 8), "W": torch.randn(2, 8), "c": torch.randn(2)}
    data = blobs.encode(t)
    blobs.check(data, blobs.sha256(data))
    assert math.isclose(blobs.norm(data, blobs.sha256(data)), tensor_norm(blobs.decode(data)), rel_tol=1e-12)


def _with_value(data: bytes, value: float) -> bytes:
    """The blob with its first float32 value replaced (the header is left as it is)."""
    (n,) = struct.unpack("<Q", data[:8])
    return data[: 8 + n] + struct.pack("<f", value) + data[8 + n + 4:]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_refuses_non_finite_values_as_decode_does(value):
    from ledger.errors import IntegrityError
    from ledger.store import blobs
    bad = _with_value(blobs.encode({"a": torch.zeros(3), "b": torch.ones(2)}), value)
    for read in (blobs.check, blobs.decode, blobs.norm):
        with pytest.raises(IntegrityError, match="tensor 'a' holds non-finite values"):
            read(bad)


def test_check_refuses_a_changed_blob():
    from ledger.errors import IntegrityError
    from ledger.store import blobs
    data = blobs.encode({"a": torch.zeros(3)})
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        blobs.check(_with_value(data, 1.0), blobs.sha256(data))


def test_threads_are_set_for_commands_that_run_the_model_and_load_nothing_for_the_others(ledger, db_url):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom cli.main import cli\n"
            f"r = CliRunner().invoke(cli, ['--db', {db_url!r}, '--threads', '3', 'log'])\n"
            "assert r.exit_code == 0, r.output\nprint('torch' in sys.modules)\n"
            f"r = CliRunner().invoke(cli, ['--db', {db_url!r}, '--threads', '3', 'generate', 'Alice lives in',"
            " '--max-new-tokens', '1'])\n"
            "assert r.exit_code == 0, r.output\nimport torch\nprint(torch.get_num_threads())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "3"]


# --- reading without SQLAlchemy --------------------------------------------------------------------

PLAIN = [["log"], ["show"], ["show", "rev-2"], ["log", "--json"], ["show", "--json"], ["status"], ["refs"],
         ["reflog"], ["audit"], ["diff", "rev-1", "HEAD"], ["verify"]]


def test_reading_commands_import_no_sqlalchemy(ledger, db_url):
    add_edits(ledger, 2)
    ledger.tag("v1", "rev-2")
    results = loaded_after([["--db", db_url, *args] for args in PLAIN], ("sqlalchemy", *HEAVY))
    for args, r in zip(PLAIN, results):
        assert r["exit_code"] == 0, (args, r["output"])
        assert r["loaded"] == [], f"`ledger {' '.join(args)}` imported {r['loaded']}"
    assert "rev-3" in results[0]["output"] and "ok" in results[10]["output"]


def _rich_history(lg) -> None:
    """Edits on two branches, a tag, a revert that re-measures, an evaluation: every table
    the reading commands read has rows."""
    from ledger import parse_facts_text
    add_edits(lg, 3)
    lg.tag("v1", "rev-3")
    lg.branch("side", "rev-2")
    lg.revert("rev-2")
    lg.evaluate(parse_facts_text(json.dumps({"subject": "Subject 0", "prompt": "Subject 0 lives in",
                                             "target_new": "Rome"})), generation=False, label="probe")


def _reads(lg) -> dict:
    """What every reading function of the library gives, as JSON."""
    as_dicts = lambda xs: [x.to_dict() for x in xs]  # noqa: E731
    return {"head": lg.head(), "log": as_dicts(lg.log(limit=50)), "log_side": as_dicts(lg.log("side")),
            "show": [lg.show(f"rev-{i}").to_dict() for i in range(1, lg.resolve() + 1)],
            "active": as_dicts(lg.active_edits()), "edit": lg.edit("edit-1").to_dict(),
            "refs": lg.refs(), "reflog": lg.reflog(), "audit": lg.audit(), "audit_add": lg.audit(command="add"),
            "verify": lg.verify(), "diff": lg.diff("rev-1", "HEAD").to_dict(), "settings": lg.settings(),
            "database": lg.database_url}


def test_plain_and_sqlalchemy_connections_read_alike(ledger, db_url):
    """The same SQL text on a plain driver connection (Ledger.open) and on a SQLAlchemy
    Connection (a Ledger on an engine) gives the same results, on both databases."""
    from ledger import Ledger
    from ledger.store.engine import make_engine
    _rich_history(ledger)
    with Ledger.open(db_url) as plain, Ledger(make_engine(db_url)) as engine:
        got = _reads(plain)
        assert plain.handle.db.reads_plain, "a read made the plain ledger create its engine"
        assert not engine.handle.db.reads_plain
        assert got == _reads(engine)
    assert got["show"][-1]["evaluations"] and got["diff"]["metric_deltas"] is not None and got["reflog"]


def test_store_reads_alike_on_either_connection(ledger, db_url):
    """Row by row, the store's read functions give the same on both kinds of connection."""
    from ledger.store import blobs, edits, evaluations, refs, revisions, settings
    from ledger.store.database import Database
    _rich_history(ledger)
    reads = {
        "revision": lambda c: revisions.get(c, 3), "ancestors": lambda c: revisions.ancestors(c, 5, 10),
        "active": lambda c: revisions.active_set(c, 5), "changes": lambda c: revisions.changes_of(c, 5),
        "is_ancestor": lambda c: (revisions.is_ancestor(c, 2, 5), revisions.is_ancestor(c, 5, 2)),
        "edits": lambda c: edits.rows(c, [1, 2, 3]), "hashes": lambda c: edits.content_hashes(c, [1, 2]),
        "layers": lambda c: sorted(edits.layer_totals(c, [1, 2, 3])), "evals": lambda c: evaluations.of_revision(
            c, 5, per_fact=True), "remeasures": lambda c: evaluations.remeasures_of(c, [1, 3]),
        "head": lambda c: refs.head(c), "named": lambda c: refs.named(c), "reflog": lambda c: refs.reflog(c, None, 9),
        "resolve": lambda c: [refs.resolve(c, n) for n in ("HEAD", "HEAD~2", "v1", "side", "rev-4")],
        "settings": lambda c: settings.read(c), "orphans": lambda c: blobs.orphans(c),
        "blobs": lambda c: sorted(blobs.get_many(c, [e.blob_sha256 for e in edits.rows(c, [1, 2])])),
    }
    plain, engine = Database.open(db_url), Database(engine=ledger.engine)
    try:
        with plain.reading() as p, engine.reading() as e:
            assert type(p).__name__ == "DriverConn" and type(e).__name__ == "AlchemyConn"
            for name, read in reads.items():
                assert read(p) == read(e), name
    finally:
        plain.close()


def test_an_old_schema_is_one_line_without_sqlalchemy(db_url, tiny_llama):
    from ledger import Ledger
    from ledger.store.engine import downgrade, make_engine
    Ledger.init(db_url, model=str(tiny_llama), wordings=False).close()
    eng = make_engine(db_url)
    downgrade(eng, "-1")
    eng.dispose()
    [r] = loaded_after([["--db", db_url, "log"]], ("sqlalchemy", *HEAVY))
    assert r["exit_code"] == 1 and r["loaded"] == []
    assert r["output"].startswith("error: the database schema is at ") and r["output"].endswith(
        "run `ledger db upgrade`\n") and r["output"].count("\n") == 1


def test_a_file_that_is_no_database_is_one_line(tmp_path):
    bad = tmp_path / "ledger.db"
    bad.write_bytes(b"not a database, " * 100)
    [r] = loaded_after([["--db", f"sqlite:///{bad}", "log"]], ())
    assert (r["exit_code"], r["output"]) == (1, "error: database: file is not a database\n")


URLS = ["sqlite:///ledger.db", "sqlite:////tmp/x/ledger.db", "sqlite+pysqlite:///a%20b/l.db", "sqlite:///dir/l+1.db",
        "postgresql://postgres@127.0.0.1:5432/test", "postgresql+psycopg://u:p%40ss@h/db",
        "postgresql://u@[::1]:5432/db?sslmode=require&application_name=a+b", "postgresql:///db?sslmode=disable",
        "postgresql://@h/db", "postgresql://h:5/"]
DECLINED = ["sqlite://", "sqlite:///:memory:", "sqlite:///l.db?mode=ro", "sqlite://user@/l.db", "mysql://h/db",
            "postgres://h/db", "postgresql+psycopg2://h/db", "postgresql://h/db?host=a&host=b", "postgresql://h:x/db",
            "not a url", ""]


@pytest.mark.parametrize("url", URLS)
def test_urls_read_and_shown_as_sqlalchemy_does(url):
    from sqlalchemy.engine import make_url
    from ledger.store.database import parse
    u, sa = parse(url), make_url(url)
    assert u is not None and u.render() == sa.render_as_string(hide_password=True)
    if u.backend == "postgresql":
        _, args = sa.get_dialect()().create_connect_args(sa)
        args.pop("context", None)
        assert u.psycopg_args() == args


@pytest.mark.parametrize("url", DECLINED)
def test_other_urls_are_left_to_sqlalchemy(url):
    from ledger.store.database import parse
    assert parse(url) is None
