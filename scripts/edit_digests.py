"""Print the sha256 of every tensor blob a fixed set of edits stores, as JSON lines.

A change that should leave the method alone (a refactor, a faster path) must leave these
digests unchanged: run the script before and after and compare the output.

    .venv/bin/python scripts/edit_digests.py [--facts ../shared/data/counterfact/counterfact-val.json] [--n 10]

Two ledgers on the default model, each with the built-in wordings a new ledger holds and the
default edit settings: the first n facts each edited alone on rev-1 ("single"), then the
same facts added one after another ("sequential"). One torch thread, so the arithmetic is
the same from run to run on one machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=Path, default=ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json",
                    help="fact file (any format `ledger add` reads)")
    ap.add_argument("--n", type=int, default=10, help="facts from the start of the file (default 10)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from ledger import Ledger
    from ledger.facts import load_facts

    facts = load_facts(args.facts, limit=args.n)
    with tempfile.TemporaryDirectory() as tmp:
        single = Ledger.init(f"sqlite:///{tmp}/single.db")
        for fact in facts:
            single.checkout("rev-1")
            for r in single.add([fact]):
                print(json.dumps({"setting": "single", "subject": fact.subject, "edit": r.edit,
                                  "blob": single.edit(r.edit).blob}), flush=True)
        sequential = Ledger.init(f"sqlite:///{tmp}/sequential.db")
        for fact in facts:
            for r in sequential.add([fact]):
                print(json.dumps({"setting": "sequential", "subject": fact.subject, "edit": r.edit,
                                  "blob": sequential.edit(r.edit).blob}), flush=True)
        single.close()
        sequential.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
