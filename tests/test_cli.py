"""The command line through click's CliRunner: every command, --json output, exit codes, and
that refused input leaves the database unchanged."""
import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger

from support import FACT, counts

FAST_ARGS = ["--steps", "6", "--rank", "2", "--layer", "1"]


@pytest.fixture
def run(db_url):
    runner = CliRunner()

    def _run(*args, code=0):
        result = runner.invoke(cli, ["--db", db_url, *args], catch_exceptions=False)
        assert result.exit_code == code, (result.output, result.stderr if hasattr(result, "stderr") else "")
        return result
    return _run


@pytest.fixture
def initialised(run, tiny_llama):
    run("init", "--model", str(tiny_llama))
    return run


def test_init_and_status(initialised, db_url):
    out = json.loads(initialised("status", "--json").output)
    assert out["revision"] == "rev-1" and out["branch"] == "main" and len(out["base_fingerprint"]) == 64


def test_add_log_show_checkout_generate_verify(initialised, fact_file):
    run = initialised
    res = run("add", str(fact_file), *FAST_ARGS, "--json")
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["revision"] == "rev-2" and line["edit"] == "edit-1"
    assert {"reliability", "generalization", "locality"} <= set(line["metrics"])

    log = json.loads(run("log", "--json").output)
    assert [r["revision"] for r in log] == ["rev-2", "rev-1"] and log[0]["added"] == ["edit-1"]
    assert "rev-2 (HEAD -> main)" in run("log").output

    show = json.loads(run("show", "rev-2", "--json").output)
    assert show["edits"][0]["fact"]["target_new"] == "Rome" and show["parent"] == "rev-1"
    assert "edit-1" in run("show", "rev-2").output

    after = json.loads(run("generate", "Alice lives in", "--max-new-tokens", "4", "--json").output)
    before = json.loads(run("generate", "Alice lives in", "--rev", "rev-1", "--max-new-tokens", "4",
                            "--json").output)
    assert after["revision"] == "rev-2" and before["revision"] == "rev-1"

    assert json.loads(run("checkout", "rev-1", "--json").output)["detached"] is True
    assert run("checkout", "main").output.strip() == "HEAD -> main at rev-2"
    assert json.loads(run("verify", "--json").output) == {"ok": True, "problems": []}
    cur = json.loads(run("db", "current", "--json").output)
    assert cur["current"] == cur["head"] and "run `ledger db upgrade`" not in run("db", "current").output


def test_add_jsonl_prints_one_object_per_revision(initialised, facts_file):
    out = initialised("add", str(facts_file), *FAST_ARGS, "--json").stdout.strip().splitlines()
    assert [json.loads(l)["revision"] for l in out] == ["rev-2", "rev-3", "rev-4"]


def test_add_batch_prints_one_object_per_edit(initialised, facts_file):
    out = initialised("add", str(facts_file), *FAST_ARGS, "--batch", "2", "--json").stdout.strip().splitlines()
    rows = [json.loads(l) for l in out]
    assert [(r["revision"], r["edit"]) for r in rows] == [("rev-2", "edit-1"), ("rev-2", "edit-2"), ("rev-3", "edit-3")]


def test_add_stop_prob_is_stored_with_the_edit(initialised, db_url, fact_file):
    initialised("add", str(fact_file), *FAST_ARGS, "--stop-prob", "0.5", "--stop-prob-wordings", "0.25",
                "--target-focus", "0.5")
    with Ledger.open(db_url) as lg:
        config = lg.edit("edit-1").config
    assert (config["stop_prob"], config["stop_prob_wordings"], config["target_focus"]) == (0.5, 0.25, 0.5)


def test_add_neighbour_and_loop_options_are_stored_with_the_edit(initialised, db_url, fact_file):
    initialised("add", str(fact_file), *FAST_ARGS, "--other-relations", "2", "--after-target-wordings", "3",
                "--subject-variants", "4", "--other-relations-before", "1", "--start-negatives", "5",
                "--relation-negatives", "3")
    with Ledger.open(db_url) as lg:
        config = lg.edit("edit-1").config
    assert (config["other_relations"], config["after_target_wordings"], config["subject_variants"]) == (2, 3, 4)
    assert (config["other_relations_before"], config["start_negatives"], config["relation_negatives"]) == (1, 5, 3)


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not JSON"),
    (b'{"prompt": "Alice lives in"}', "missing required field 'target_new'"),
    (b'{"prompt": "Alice lives in", "target_new": ""}', "'target_new' is empty"),
    (b'[{"prompt": "a", "target_new": "b"}, {"prompt": 5, "target_new": "b"}]', "record 1"),
    (b'{"prompt": "\xc3\x28", "target_new": "b"}', "not valid UTF-8"),
    (json.dumps({"prompt": "x" * 1_000_000, "target_new": "y"}).encode(), "characters"),
    (json.dumps({"prompt": "word " * 300, "target_new": "y"}).encode(), "context"),
])
def test_malformed_fact_file_exit_2_and_nothing_written(initialised, db_url, tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    before = counts(db_url)
    res = initialised("add", str(bad), *FAST_ARGS, code=2)
    assert res.stderr.startswith("error: ") and needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert counts(db_url) == before


@pytest.mark.parametrize("args, code", [
    (["checkout", "rev-0"], 2), (["checkout", "rev-99999999"], 2), (["show", "rev-abc"], 2),
    (["checkout", "x;DROP TABLE refs"], 2), (["log", "--rev", "../../etc"], 2),
    (["add", "/nonexistent/fact.json"], 2), (["add", "f.json", "--rank", "0"], 2), (["add", "f.json", "--prefixes", "9"], 2),
    (["add", "f.json", "--stop-prob", "1"], 2), (["add", "f.json", "--stop-prob-wordings", "1.5"], 2),
    # experiment-only options are not on the command line (their config fields stay, for stored edits)
    (["add", "f.json", "--rotation-init", "gradient"], 2), (["add", "f.json", "--gate-weight", "1"], 2),
    (["add", "f.json", "--train-dtype", "bfloat16"], 2),
    (["add", "f.json", "--other-relations", "-1"], 2), (["add", "f.json", "--after-target-wordings", "33"], 2),
    (["generate", "   "], 2), (["--threads", "0", "log"], 2), (["wordings", "import"], 2),
])
def test_bad_arguments_are_one_line_errors(initialised, db_url, tmp_path, monkeypatch, args, code):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.json").write_text(json.dumps(FACT))
    before = counts(db_url)
    res = initialised(*args, code=code)
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert counts(db_url) == before


def test_missing_ledger_is_a_state_error(tmp_path):
    res = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path}/none.db", "log"])
    assert res.exit_code == 1 and "run `ledger init`" in res.stderr
    assert not (tmp_path / "none.db").exists()


def test_gpt2_family_model(tmp_path, tiny_gpt2, fact_file):
    runner = CliRunner()
    db = f"sqlite:///{tmp_path}/g.db"
    assert runner.invoke(cli, ["--db", db, "init", "--model", str(tiny_gpt2)]).exit_code == 0
    res = runner.invoke(cli, ["--db", db, "add", str(fact_file), *FAST_ARGS, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["revision"] == "rev-2"



def test_state_errors_are_one_line_exit_1(initialised, db_url, fact_file, tiny_llama, tiny_llama_other, tmp_path):
    from sqlalchemy import select, update
    from ledger.store.engine import make_engine
    from ledger.store.schema import Blob
    initialised("add", str(fact_file), *FAST_ARGS)
    eng = make_engine(db_url)
    with eng.begin() as c:
        address, data = c.execute(select(Blob.sha256, Blob.data)).one()
        c.execute(update(Blob).values(data=bytes(data[:-1]) + bytes([data[-1] ^ 1])))
    eng.dispose()
    before = counts(db_url)
    for args in (["generate", "Alice lives in"], ["export", "HEAD", str(tmp_path / "out")], ["verify"]):
        res = initialised(*args, code=1)
        assert len(res.stderr.strip().splitlines()) <= 1
        assert address[:12] in (res.stderr + res.stdout)
    assert counts(db_url) == before
    assert not (tmp_path / "out").exists()


def test_unreachable_db_and_other_base_through_the_cli(tmp_path, tiny_llama, tiny_llama_other, fact_file):
    import shutil
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", "postgresql+psycopg://nobody@127.0.0.1:1/none", "log"])
    assert res.exit_code == 1 and res.stderr.startswith("error: cannot reach the database")
    res = runner.invoke(cli, ["--db", "::nonsense::", "log"])
    assert res.exit_code == 2 and "not a database URL" in res.stderr
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    db = f"sqlite:///{tmp_path}/l.db"
    assert runner.invoke(cli, ["--db", db, "init", "--model", str(model)]).exit_code == 0
    assert runner.invoke(cli, ["--db", db, "add", str(fact_file), *FAST_ARGS]).exit_code == 0
    shutil.copy(tiny_llama_other / "model.safetensors", model / "model.safetensors")
    before = counts(db)
    for args in (["generate", "Alice lives in"], ["add", str(fact_file), *FAST_ARGS]):
        res = runner.invoke(cli, ["--db", db, *args])
        assert res.exit_code == 1 and "fingerprint" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert counts(db) == before


def test_add_skip_bad_limit_offset(initialised, db_url, tmp_path):
    f = tmp_path / "mixed.json"
    f.write_text(json.dumps([FACT, {"prompt": "broken"}, dict(FACT, subject="Bea", prompt="Bea lives in")]))
    before = counts(db_url)
    res = initialised("add", str(f), *FAST_ARGS, code=2)
    assert "record 1" in res.stderr and counts(db_url) == before
    res = initialised("add", str(f), *FAST_ARGS, "--skip-bad", "--json")
    assert "skipped record 1: missing required field 'target_new'" in res.stderr
    assert [json.loads(l)["revision"] for l in res.stdout.strip().splitlines()] == ["rev-2", "rev-3"]
    res = initialised("add", str(f), *FAST_ARGS, "--offset", "2", "--limit", "1", "--json")
    assert json.loads(res.stdout.strip())["fact"]["prompt"] == "Bea lives in"


@pytest.mark.parametrize("device", ["cuda", "tpu9", "cuda:7"])
def test_a_device_this_machine_lacks_is_a_one_line_error(db_url, tiny_llama, device):
    import torch
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that CUDA device")
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", db_url, "--device", device, "init", "--model", str(tiny_llama)])
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and f"--device {device}" in res.stderr


def test_add_warns_when_the_edit_does_not_give_its_target_on_its_own_prompt(initialised, fact_file):
    """An edit that misses its own prompt is stored (its revision can be reverted), and the
    command says so on stderr (tests/test_smollm2.py checks that an edit reaching its prompt
    gets no warning)."""
    run = initialised
    missed = run("add", str(fact_file), "--steps", "8", "--rank", "2", "--layer", "1", "--lr", "1e-9", "--json")
    line = json.loads(missed.stdout.strip().splitlines()[-1])
    assert line["metrics"]["reliability"] < 1.0
    assert (f'warning: {line["edit"]} does not give "Rome" on its own prompt' in missed.stderr
            and f"`ledger revert {line['revision']}` undoes it" in missed.stderr)
