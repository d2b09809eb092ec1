"""Which ledger a command opens, and what `status` and `diff` tell about it: like git with
`.git/`, a command run in a subdirectory opens the `.ledger/` of the nearest parent that has
one; `init` always creates its ledger in the working directory."""
import json

import pytest

from click.testing import CliRunner

from cli.main import cli


def test_a_subdirectory_opens_the_ledger_of_its_parent(tiny_llama, tmp_path, monkeypatch):
    runner = CliRunner()
    top = tmp_path / "project"
    deep = top / "src" / "pkg"
    deep.mkdir(parents=True)
    monkeypatch.chdir(top)
    assert runner.invoke(cli, ["init", "--model", str(tiny_llama)]).exit_code == 0
    monkeypatch.chdir(deep)
    res = runner.invoke(cli, ["status", "--json"])
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.output)
    assert info["revision"] == "rev-1"
    assert info["database"] == f"sqlite:///{top / '.ledger' / 'ledger.db'}"
    assert not (deep / ".ledger").exists()                     # opening created nothing here
    res = runner.invoke(cli, ["status"])
    assert f"ledger sqlite:///{top / '.ledger' / 'ledger.db'}" in res.output


def test_without_a_ledger_above_a_command_says_so(tmp_path, monkeypatch):
    if any((d / ".ledger" / "ledger.db").is_file() for d in tmp_path.parents):
        pytest.skip("a directory above the test's own holds a ledger")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["log"])
    assert res.exit_code != 0 and res.stderr.startswith("error: ") and "init" in res.stderr
    assert not (tmp_path / ".ledger").exists()


def test_init_in_a_subdirectory_makes_its_own_ledger(tiny_llama, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(cli, ["init", "--model", str(tiny_llama)]).exit_code == 0
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert runner.invoke(cli, ["init", "--model", str(tiny_llama)]).exit_code == 0
    assert (sub / ".ledger" / "ledger.db").is_file()
    info = json.loads(runner.invoke(cli, ["status", "--json"]).output)
    assert info["database"] == f"sqlite:///{sub / '.ledger' / 'ledger.db'}"


def test_diff_text_says_what_its_signs_and_norms_mean(ledger, db_url, fact_file):
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "add", str(fact_file), "--steps", "2", "--rank", "2",
                               "--layer", "1"]).exit_code == 0
    res = runner.invoke(cli, ["--db", db_url, "diff", "rev-1", "HEAD"])
    assert res.exit_code == 0, res.stderr
    lines = res.output.splitlines()
    assert lines[1].startswith("+ edit-1")
    assert any("tensor norm of the edits added" in x and "removed 0.000" in x for x in lines)
    assert lines[-1] == "(+ edit added)"
