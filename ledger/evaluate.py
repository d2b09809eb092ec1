"""Edit metrics, by EasyEdit's definitions (DESIGN.md section 7), so numbers compare.

- reliability:    teacher-forced token accuracy of target_new after the prompt
- generalization: the same on the rephrase prompts
- locality:       share of locality answer tokens (or, without an answer, the next token)
                  whose argmax is the same as before the edit (the parent model)
- efficacy_score / paraphrase_score: P(target_new) > P(target_true), as ROME's CounterFact
  scores, comparing mean per-token log-probabilities on the prompt / the rephrases
- neighborhood_score: P(target_true) > P(target_new) on the locality prompts

`measure` runs one model state over every sequence a fact needs, in one batch; `score` turns
the measurement after an edit (and the one before, for locality) into metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .facts import Fact
from .text import logits, make_batch


@dataclass
class Measurement:
    accuracy: dict[str, list[float]] = field(default_factory=dict)     # kind -> per prompt
    logprob: dict[str, list[float]] = field(default_factory=dict)      # kind -> per prompt
    argmax: list[list[int]] = field(default_factory=list)              # per locality prompt


def _pairs(fact: Fact) -> list[tuple[str, str, str | None]]:
    """(kind, prompt, target) for every sequence a fact is scored on."""
    out: list[tuple[str, str, str | None]] = [("rel", fact.prompt, fact.target_new)]
    out += [("gen", p, fact.target_new) for p in fact.rephrase_prompts]
    if fact.target_true:
        out.append(("eff_true", fact.prompt, fact.target_true))
        out += [("par_true", p, fact.target_true) for p in fact.rephrase_prompts]
        for lp in fact.locality_prompts:
            out.append(("nb_new", lp.prompt, fact.target_new))
            out.append(("nb_true", lp.prompt, fact.target_true))
    out += [("loc", lp.prompt, lp.answer) for lp in fact.locality_prompts]
    return out


@torch.no_grad()
def measure(model, tok, fact: Fact) -> Measurement:
    pairs = _pairs(fact)
    device = next(model.parameters()).device
    batch = make_batch(tok, [(p, t) for _, p, t in pairs], device=device)
    out = logits(model, batch).float()
    logp = torch.log_softmax(out, dim=-1)
    pred = out.argmax(-1)
    m = Measurement()
    for i, (kind, _, _) in enumerate(pairs):
        mask = batch.target_mask[i]
        if kind == "loc":
            m.argmax.append(pred[i][mask].tolist())
            continue
        want = batch.next_ids[i][mask]
        acc = (pred[i][mask] == want).float().mean().item()
        lp = logp[i][mask].gather(-1, want[:, None]).mean().item()
        m.accuracy.setdefault(kind, []).append(acc)
        m.logprob.setdefault(kind, []).append(lp)
    return m


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


def score(after: Measurement, before: Measurement | None) -> dict[str, float]:
    """Metrics of one fact; a metric the fact gives no prompts for is left out."""
    r: dict[str, float] = {"reliability": _mean(after.accuracy["rel"])}
    if after.accuracy.get("gen"):
        r["generalization"] = _mean(after.accuracy["gen"])
    if after.argmax and before is not None:
        same = total = 0
        for a, b in zip(after.argmax, before.argmax):
            same += sum(int(x == y) for x, y in zip(a, b))
            total += len(a)
        r["locality"] = same / total
    lp = after.logprob
    if "eff_true" in lp:
        r["efficacy_score"] = float(lp["rel"][0] > lp["eff_true"][0])
        if lp.get("par_true"):
            r["paraphrase_score"] = _mean([float(n > t) for n, t in zip(lp["gen"], lp["par_true"])])
        if lp.get("nb_true"):
            r["neighborhood_score"] = _mean([float(t > n) for n, t in zip(lp["nb_new"], lp["nb_true"])])
    return r


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: _mean([r[k] for r in rows if k in r]) for k in keys}
