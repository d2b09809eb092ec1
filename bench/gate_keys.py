"""Where a gate's key can tell a fact's relation from its subject's other relations.

A BaFT edit acts at its subject's tokens, gated by a match on the subject's key (the mean
state at the subject's last token of the edit's rows; docs/design.md, "The gate"). A
neighbour that asks another question about the same subject ("Kenya's capital is" after an
edit of "Kenya is a country in") has the same state there, so no gate at the subject can shut
on it. A gate that reads the query position instead, the prompt's last token, where the
model has read both the subject and the question, could in principle match the pair. This
script measures, on the base model's states alone (no training), whether such a key reaches
the unseen rephrases of a fact and stays shut on its neighbours:

- `subject`: the key at the subject's last token, fires where the gate is >= 0.5 at any
  position of the prompt (what the composed edit does);
- `query`: the key at the last token of the edit's rows, read at the prompt's last token;
- `query_fisher`: the same with Fisher's direction (scatter shrunk 0.3 towards the identity);
- `both`, `both_fisher`: a conjunction, the subject gate open before the last token and the
  query gate open at it.

Each key follows the product's recipe in its simplest form: the direction from the mean of the
negatives to the key, a ramp with the match about 0.95 at the key and 0.05 at the closest
negative (or a quarter of the key's projection below it). A gate fires where its match is at
least 0.5; a match below the floor (0.2) is reported as 0, as the product shuts it (the
product's `floored_gate` also rescales what is above the floor, which the 0.5 threshold on the
match does not need). The subject key leaves
out the product's start-word negatives, its Fisher fallback and its ramp from the prompt.
Positive rows: the fact's prompt, the wordings a new ledger trains it on
(`editing.wording_prompts`, with quality.py's `--held-out strict` table) and the prompt
behind two prefixes. Negatives: the prompt's template filled with eight generic subjects and
the neutral sentences (every position), and for the query keys also the subject in six other
relations (`wordings.relation_negatives`) and the positive rows' positions before their
last; the subject key gets those six only for its ramp, as the product does. Evaluated on each
fact's rephrase prompts (want: fires) and locality prompts (want: shut), the latter split by
whether they name the fact's subject. The first position of every input is left out of the
query keys: from block 12 of SmolLM2-135M on, its state is the attention sink, its norm about
22,700 against about 150 elsewhere. The subject key keeps it (a subject can be the first
token), so past block 11 that state opens the subject gate on every prompt and its rows, and
the conjunction's, measure nothing.

    .venv/bin/python bench/gate_keys.py [--dataset everyday-check|everyday|counterfact] [--split val|train]
        [--n 32] [--layers 10] [--threads 2]

Prints one JSON line per (layer, key): the share of rephrases and neighbours the gate fires on.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
from ledger import BaftConfig  # noqa: E402
from ledger import wordings as wd  # noqa: E402
from ledger.baft.objective import KEY_MARGIN  # noqa: E402
from ledger.baft.rows import GENERIC_SUBJECTS, NEUTRAL, PREFIXES, subject_positions  # noqa: E402
from ledger.facts import Fact, fill  # noqa: E402
from ledger.text import prompt_ids  # noqa: E402

KEYS = ("subject", "query", "query_fisher", "both", "both_fisher")
FLOOR = 0.2
FIRES = 0.5


def ramp_gate(key: torch.Tensor, negatives: torch.Tensor, *, ramp_only: torch.Tensor | None = None,
              positives: torch.Tensor | None = None, shrinkage: float = 0.3):
    """A floored gate matching `key` against `negatives`: along the difference of their means
    (or, given `positives`, Fisher's direction), sigmoid = ~0.95 at the key and ~0.05 at the
    closest negative or the closest of `ramp_only`, whichever projects higher. Returns h -> gate."""
    mu = negatives.mean(0)
    direction = key - mu
    if positives is not None:
        centred = negatives - mu
        scatter = (centred.T @ centred + (positives - key).T @ (positives - key)) \
            / max(1, len(negatives) + len(positives) - 2)
        eye = torch.eye(len(key), dtype=key.dtype)
        direction = torch.linalg.solve((1 - shrinkage) * scatter + shrinkage * float(scatter.diagonal().mean()) * eye,
                                       key - mu)
    e = direction / direction.norm()
    p_key = float((key - mu) @ e)
    p_neg = float(((negatives - mu) @ e).max())
    if ramp_only is not None and len(ramp_only):
        p_neg = max(p_neg, float(((ramp_only - mu) @ e).max()))
    width = max(p_key - p_neg, KEY_MARGIN * p_key)
    beta, mid = 6.0 / width, p_key - width / 2

    def gate(h: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(beta * ((h - mu) @ e - mid))
        return torch.where(g < FLOOR, torch.zeros_like(g), g)
    return gate


class States:
    """The base model's states after given blocks, per text, computed once."""

    def __init__(self, model, tok, layers: list[int]):
        self.model, self.tok, self.layers, self.cache = model, tok, layers, {}

    @torch.no_grad()
    def __call__(self, text: str, layer: int) -> torch.Tensor:
        if text not in self.cache:
            ids = torch.tensor([prompt_ids(self.tok, text)])
            out = self.model(input_ids=ids, output_hidden_states=True)
            self.cache[text] = {L: out.hidden_states[L + 1][0].float() for L in self.layers}
        return self.cache[text][layer]


def fact_gates(fact: Fact, wordings: list[str], S: States, tok, layer: int, cfg: BaftConfig) -> dict[str, object]:
    """The five gates of one fact at one layer, with the rows cfg gives a new edit: key -> a
    function of a prompt's states, its gate value."""
    template = wd.template_of(fact.prompt, fact.subject)
    positives = [fact.prompt, *wordings, *(p + fact.prompt for p in PREFIXES[:cfg.n_prefixes])]
    generic = [fill(template, s) for s in GENERIC_SUBJECTS[:cfg.neg_subjects] if s.lower() not in fact.subject.lower()] \
        if template else []
    others = wd.relation_negatives(fact, wordings, cfg.relation_negatives, cfg.seed)

    def at_subject(texts):
        found = ((t, subject_positions(tok, t, fact.subject)) for t in texts)
        out = [S(t, layer)[at[-1]] for t, at in found if at]
        return torch.stack(out) if out else None

    neg_all = torch.cat([S(t, layer) for t in generic + list(NEUTRAL)])
    subject = ramp_gate(at_subject(positives).mean(0), neg_all, ramp_only=at_subject(others))
    last = torch.stack([S(t, layer)[-1] for t in positives])
    query_neg = torch.cat([S(t, layer)[1:] for t in generic + list(NEUTRAL) + others]
                          + [S(t, layer)[1:-1] for t in positives])
    query = ramp_gate(last.mean(0), query_neg)
    fisher = ramp_gate(last.mean(0), query_neg, positives=last)

    def before_last(h):
        return float(subject(h[:-1]).max()) if len(h) > 1 else 0.0

    return {
        "subject": lambda h: float(subject(h).max()),
        "query": lambda h: float(query(h[-1:]).max()),
        "query_fisher": lambda h: float(fisher(h[-1:]).max()),
        "both": lambda h: min(before_last(h), float(query(h[-1:]).max())),
        "both_fisher": lambda h: min(before_last(h), float(fisher(h[-1:]).max())),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="everyday-check", choices=["everyday-check", "everyday", "counterfact"])
    ap.add_argument("--split", default="val", choices=[k for k in quality.CF_SPLITS if k != "edit-1k"],
                    help="counterfact's split (the test split, edit-1k, is for reporting, not for this)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--layers", default="10", help="comma-separated block indices")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    if args.dataset == "counterfact":
        quality.DATASETS["counterfact"] = (quality.CF_SPLITS[args.split], "counterfact")
    facts = [f for _, f in quality.load_dataset(args.data_dir, args.dataset, args.offset, args.n)]
    cfg = BaftConfig()
    paths = [wd.DATA_DIR / name for name in wd.BUILTIN]
    held_out = quality.held_out_pairs(paths, facts, cfg)

    fires: dict[tuple[int, str], dict[str, list[float]]] = {(L, key): {} for L in layers for key in KEYS}
    with tempfile.TemporaryDirectory(prefix="bench-gate-keys-") as tmp:
        # A new ledger's wordings table without the held-out pairs, as quality.py's runs get it.
        ledgers = quality.Ledgers(Path(tmp), None, paths, held_out)
        with ledgers.fresh() as lg, lg.engine.connect() as conn:
            wordings, _ = quality.wording_prompts(conn, facts, cfg)
        tok = ledgers.base.tokenizer
        S = States(ledgers.base.model, tok, layers)
        for k, fact in enumerate(facts):
            kind = quality.rephrase_kind(fact) if args.dataset == "counterfact" else None
            for layer in layers:
                gates = fact_gates(fact, wordings[k], S, tok, layer, cfg)
                for key, gate in gates.items():
                    parts = fires[(layer, key)]
                    for p in fact.rephrase_prompts:
                        v = gate(S(p, layer))
                        for part in ("rephrases", f"rephrases_{kind}") if kind else ("rephrases",):
                            parts.setdefault(part, []).append(v)
                    for loc in fact.locality_prompts:
                        named = fact.subject.lower() in loc.prompt.lower()
                        v = gate(S(loc.prompt, layer))
                        for part in ("neighbours", "neighbours_naming_subject" if named else "neighbours_other"):
                            parts.setdefault(part, []).append(v)
            print(f"{k + 1}/{len(facts)} {fact.prompt}", file=sys.stderr, flush=True)

    dataset = args.dataset if args.dataset != "counterfact" else f"counterfact-{args.split}"
    commit = quality.git_state()["git_commit"]
    for (layer, key), parts in fires.items():
        row = {"dataset": dataset, "n": len(facts), "offset": args.offset, "layer": layer, "key": key,
               "git_commit": commit}
        for part, vs in parts.items():
            row[f"{part}_fires"] = round(sum(v >= FIRES for v in vs) / len(vs), 3)
            row[f"{part}_n"] = len(vs)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
