"""Input a careful user gives the command line: audit time bounds, edits that do not exist,
database URLs the ledger does not run on, a database in a missing directory, and what an
export leaves on disk. Refused input is one line, `error: ...`, and nothing written."""
import json
import os
import stat
from datetime import date, datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from cli.main import cli

# Audit events of a probe command, at known UTC times around the day 2026-12-03.
TIMES = ["2026-12-02T23:59:59.999999Z", "2026-12-03T00:00:00.000000Z", "2026-12-03T19:48:30.000000Z",
         "2026-12-03T19:49:00.000000Z", "2026-12-03T23:59:59.500000Z", "2026-12-04T00:00:00.000000Z"]


def one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, (res.output, res.stderr)
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.output
    return res.stderr


@pytest.fixture
def probed(ledger):
    with ledger.engine.begin() as c:
        for t in TIMES:
            c.execute(text("INSERT INTO audit_events (created_at, actor, command, details_json) "
                           "VALUES (:t, 'tester', 'probe', '{}')"), {"t": t})
    return ledger


def _cli_times(db_url, *args):
    res = CliRunner().invoke(cli, ["--db", db_url, "audit", "--command", "probe", "--json", *args])
    assert res.exit_code == 0, (res.output, res.stderr)
    return sorted(r["time"] for r in json.loads(res.output))


@pytest.mark.parametrize("args, expected", [
    (["--until", "2026-12-03"], TIMES[:5]),                                # a date includes its whole day
    (["--since", "2026-12-03", "--until", "2026-12-03"], TIMES[1:5]),
    (["--since", "2026-12-03T20:49:00+01:00"], TIMES[3:]),                 # an offset: 19:49Z
    (["--since", "2026-12-03T20:49+01:00"], TIMES[3:]),
    (["--since", "2026-12-03 19:49"], TIMES[3:]),                          # a space, no seconds: not 19:48
    (["--since", "2026-12-03T19:49Z"], TIMES[3:]),
    (["--since", "2026-12-03T19:49:00", "--until", "2026-12-03T19:49:00"], TIMES[3:4]),
    (["--until", "2026-12-03T14:49:00-05:00"], TIMES[:4]),
])
def test_audit_since_until_compare_times(probed, db_url, args, expected):
    assert _cli_times(db_url, *args) == expected


def test_audit_bounds_in_the_python_api(probed):
    def times(**kw):
        return sorted(r["time"] for r in probed.audit(command="probe", **kw))
    plus1 = timezone(timedelta(hours=1))
    assert times(since=datetime(2026, 12, 3, 20, 49, tzinfo=plus1)) == TIMES[3:]
    assert times(since=datetime(2026, 12, 3, 19, 49)) == TIMES[3:]          # naive: UTC
    assert times(until=date(2026, 12, 3)) == TIMES[:5]
    assert times(since="2026-12-03 19:49", until="2026-12-03") == TIMES[3:5]


@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "garbage", "2026-13-01", "2026-12-03T25:00"])
def test_audit_refuses_times_that_do_not_parse(probed, db_url, option, value):
    res = CliRunner().invoke(cli, ["--db", db_url, "audit", option, value])
    err = one_line_error(res)
    assert option in err and value in err and "ISO-8601" in err
    from ledger import InputError
    with pytest.raises(InputError):
        probed.audit(**{option[2:]: value})


def test_audit_help_says_naive_times_are_utc():
    res = CliRunner().invoke(cli, ["audit", "--help"])
    assert res.exit_code == 0 and "UTC" in res.output and "whole day" in res.output


def test_revert_of_an_edit_that_does_not_exist(ledger, db_url):
    from ledger import BaftConfig, parse_facts_text
    from support import FACT, FAST, counts
    [res] = ledger.add(parse_facts_text(json.dumps(FACT)), BaftConfig(**FAST))
    ledger.revert(res.edit)
    before = counts(db_url)
    err = one_line_error(CliRunner().invoke(cli, ["--db", db_url, "revert", "edit-7"]))
    assert "no such edit: edit-7" in err and "not active" not in err
    err = one_line_error(CliRunner().invoke(cli, ["--db", db_url, "revert", res.edit]))
    assert f"{res.edit} is not active" in err
    assert counts(db_url) == before


@pytest.mark.parametrize("url, needs", [
    ("mysql://user:secret@localhost/ledger", "mysqlclient"),
    ("postgresql+psycopg2://user@localhost/ledger", "psycopg2"),
    ("postgresql+asyncpg://user@localhost/ledger", "asyncpg"),
    ("mssql://user@localhost/ledger", "pyodbc"),
    ("postgres://user@localhost/ledger", "write postgresql:// instead of postgres://"),
    ("nosuchdb://user@localhost/ledger", "unknown database scheme nosuchdb://"),
])
@pytest.mark.parametrize("through", ["--db", "LEDGER_DB"])
def test_unsupported_database_urls_are_one_line_errors(url, needs, through, monkeypatch):
    args = ["--db", url] if through == "--db" else []
    if through == "LEDGER_DB":
        monkeypatch.setenv("LEDGER_DB", url)
    for command in (["log"], ["status"], ["db", "current"]):
        err = one_line_error(CliRunner().invoke(cli, [*args, *command]))
        assert needs in err and "sqlite:///PATH, postgresql:// or postgresql+psycopg://" in err
        assert "secret" not in err


def test_init_makes_only_the_ledgers_own_directory(tiny_llama, tmp_path, monkeypatch):
    runner = CliRunner()
    for db in (tmp_path / "nonexistent" / "dir" / "x.db", tmp_path / "missing" / ".ledger" / "ledger.db"):
        err = one_line_error(runner.invoke(cli, ["--db", f"sqlite:///{db}", "init", "--model", str(tiny_llama)]))
        assert f"no directory {db.parent}" in err
        assert not (tmp_path / db.relative_to(tmp_path).parts[0]).exists()
    # A .ledger/ in an existing directory is made, as is the default URL's.
    (tmp_path / "proj").mkdir()
    res = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path}/proj/.ledger/ledger.db", "init", "--model", str(tiny_llama)])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "proj" / ".ledger" / "ledger.db").is_file()
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    res = runner.invoke(cli, ["init", "--model", str(tiny_llama)])
    assert res.exit_code == 0, res.stderr
    assert (here / ".ledger" / "ledger.db").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_follows_the_umask(ledger, db_url, tmp_path, umask):
    old = os.umask(umask)
    try:
        res = CliRunner().invoke(cli, ["--db", db_url, "export", "HEAD", str(tmp_path / "snap")])
    finally:
        os.umask(old)
    assert res.exit_code == 0, (res.output, res.stderr)
    out = tmp_path / "snap"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert {f.name for f in files} >= {"model.safetensors", "config.json", "ledger.json", "modeling_ledger.py"}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


_LOAD = r"""
import json, sys, torch
from ledger import load_snapshot
model, tok, _ = load_snapshot(sys.argv[1])
with torch.no_grad():
    print(json.dumps([model(**tok(p, return_tensors="pt")).logits[0, -1].tolist() for p in json.loads(sys.argv[2])]))
"""


def test_base_ref_snapshot_loads_without_a_report(db_url, tiny_llama, tmp_path):
    import shutil
    import subprocess
    import sys
    import torch
    from ledger import BaftConfig, Ledger, parse_facts_text
    from support import FACT, FAST, PROMPTS
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_llama, model_dir)
    with Ledger.init(db_url, model=str(model_dir), wordings=False) as lg:
        lg.add(parse_facts_text(json.dumps(FACT)), BaftConfig(**FAST))
        lg.export("HEAD", tmp_path / "snap", base_ref=True)
        expected = torch.stack([lg.model_at().logits(p)[-1] for p in PROMPTS])
        base = torch.stack([lg.model_at("rev-1").logits(p)[-1] for p in PROMPTS])
    # A fresh interpreter: transformers reports through a handler on the stderr of its start.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "snap"), json.dumps(PROMPTS)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOAD REPORT" not in proc.stderr and "MISSING" not in proc.stderr, proc.stderr
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (got - expected).abs().max() <= 1e-5 and (got - base).abs().max() > 1e-4
