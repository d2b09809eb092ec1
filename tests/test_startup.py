"""The reading commands start without the model side: `ledger --help`, log, show, status, refs,
audit, diff, verify (and the other commands that never run a model) import neither torch nor
transformers, which cost every command a second or more. Each command runs in a fresh
interpreter, so what it imports is what a user's `ledger ...` imports. No wall-clock limits
here: bench/startup.py measures the time."""
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


def loaded_after(commands: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands), json.dumps(HEAVY)],
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
