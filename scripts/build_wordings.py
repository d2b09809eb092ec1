"""Build ledger/data/wordings-counterfact.json, the relation wordings every new ledger starts
with, from CounterFact's train split (ROME's CounterFact, Meng et al. 2022, MIT licence).

Only templates are kept ("{} is a native speaker of"): each training record's prompt and
rephrase with the subject replaced by "{}", as `ledger wordings import` reads them
(ledger.wordings.pairs_of_records). No fact, subject or answer is copied. The val and
edit-1k splits are not read: tuning and reporting stay on wordings this table was not built
from. Run from the repository root, with ../shared/data beside it:

    .venv/bin/python scripts/build_wordings.py [--data PATH]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _strip_debris(template: str) -> str | None:
    """None where the wording, its context sentences dropped (wordings.template_of), still
    starts with debris of that context: a category line, a stray word, a number."""
    head = template.partition("{}")[0]
    if "category:" in head.lower() or (head and not head[0].isupper()):
        return None
    return template


def main() -> None:
    import sys
    sys.path.insert(0, str(ROOT))
    from ledger.wordings import pairs_of_records

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/counterfact/counterfact-train.json")
    ap.add_argument("--out", type=Path, default=ROOT / "ledger/data/wordings-counterfact.json")
    args = ap.parse_args()
    pairs, skipped = pairs_of_records(json.loads(args.data.read_text()))
    grouped: dict[str, list[str]] = {}
    for relation, wording in pairs:
        relation, wording = _strip_debris(relation), _strip_debris(wording)
        if relation is None or wording is None:
            continue
        ws = grouped.setdefault(relation, [])
        if wording != relation and wording not in ws:
            ws.append(wording)
    grouped = {r: ws for r, ws in grouped.items() if ws}
    n_pairs = sum(len(ws) for ws in grouped.values())
    records = [{"relation": r, "wordings": ws} for r, ws in grouped.items()]
    args.out.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
    print(f"{args.out.relative_to(ROOT)}: {len(records)} relations, {n_pairs} wordings "
          f"({len(skipped)} records gave none)")


if __name__ == "__main__":
    main()
