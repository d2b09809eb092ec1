"""Edit metrics, by EasyEdit's definitions (DESIGN.md section 7), so numbers compare.

- reliability:    teacher-forced token accuracy of target_new after the prompt
- generalization: the same on the rephrase prompts
- portability:    the same for each portability prompt's answer (KnowEdit, zsRE's new question)
- locality:       share of locality answer tokens (or, without an answer, the next token)
                  whose argmax is the same as in the reference model (at creation the parent
                  revision; `Ledger.evaluate` the unedited base model)
- efficacy_score / paraphrase_score: P(target_new) > P(target_true), as ROME's CounterFact
  scores, comparing mean per-token log-probabilities on the prompt / the rephrases
- neighborhood_score: P(target_true) > P(target_new) on the locality prompts
- fluency (on request): ROME's n-gram entropy of greedy generations, see `ngram_entropy`

`measure_many` runs one model state over every sequence some facts need, packed into batches
of similar length; `score` turns the measurement after an edit (and the reference one, for
locality) into metrics.
"""
from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .facts import Fact
from .text import Batch, batch_of, encode_pair, prompt_ids, scored_logits

# A batch holds at most this many sequence positions (rows x padded length). Where the head
# cannot run at the scored positions alone (text.scored_logits) the logits are
# rows x length x vocabulary floats (49,152 for SmolLM2, so 2,048 positions ~ 400 MB).
TOKENS_PER_BATCH = 2048
MAX_ROWS = 64

# Fluency as ROME and EasyEdit measure it: generations of at most 100 tokens, prompt included.
FLUENCY_MAX_LENGTH = 100


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
    out += [("port", pp.prompt, pp.answer) for pp in fact.portability_prompts]
    return out


def n_sequences(facts: list[Fact], kinds: Iterable[str] | None = None) -> int:
    """How many sequences measure_many runs for these facts (for progress totals)."""
    wanted = None if kinds is None else set(kinds)
    return sum(1 for f in facts for kind, _, _ in _pairs(f) if wanted is None or kind in wanted)


def _chunks(lengths: list[int], tokens_per_batch: int, max_rows: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * lengths[out[-1][0]] <= tokens_per_batch:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def measure_many(model, tok, facts: list[Fact], *, kinds: Iterable[str] | None = None,
                 tokens_per_batch: int = TOKENS_PER_BATCH, max_rows: int = MAX_ROWS,
                 progress: Callable[[int, int], None] | None = None) -> list[Measurement]:
    """One Measurement per fact, every sequence of every fact run through the model in
    batches of similar length. `kinds` limits the sequences (e.g. {"loc"} for the reference
    side of locality). progress(done, total) counts sequences."""
    wanted = None if kinds is None else set(kinds)
    items = [(fi, kind, p, t) for fi, f in enumerate(facts) for kind, p, t in _pairs(f)
             if wanted is None or kind in wanted]
    encoded = [encode_pair(tok, p, t) for _, _, p, t in items]
    device = next(model.parameters()).device
    # per item: (argmax ids, accuracy, mean log-probability) of its scored positions
    results: list[tuple[list[int], float, float] | None] = [None] * len(items)
    done = 0
    for chunk in _chunks([len(ids) for ids, _ in encoded], tokens_per_batch, max_rows):
        batch: Batch = batch_of(tok, [encoded[i] for i in chunk], device=device)
        scored = scored_logits(model, batch).float()           # (scored positions, vocab), row-major
        ends = batch.target_mask.sum(1).cumsum(0).tolist()
        for row, i in enumerate(chunk):
            sel = scored[(ends[row - 1] if row else 0): ends[row]]
            want = batch.next_ids[row][batch.target_mask[row]]
            pred = sel.argmax(-1)
            lp = torch.log_softmax(sel, dim=-1).gather(-1, want[:, None]).mean().item()
            results[i] = (pred.tolist(), (pred == want).float().mean().item(), lp)
        done += len(chunk)
        if progress:
            progress(done, len(items))
    ms = [Measurement() for _ in facts]
    for (fi, kind, _, _), (pred, acc, lp) in zip(items, results):   # items keep each fact's order
        m = ms[fi]
        if kind == "loc":
            m.argmax.append(pred)
            continue
        m.accuracy.setdefault(kind, []).append(acc)
        m.logprob.setdefault(kind, []).append(lp)
    return ms


def measure(model, tok, fact: Fact) -> Measurement:
    return measure_many(model, tok, [fact])[0]


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
    if after.accuracy.get("port"):
        r["portability"] = _mean(after.accuracy["port"])
    lp = after.logprob
    if "eff_true" in lp:
        r["efficacy_score"] = float(lp["rel"][0] > lp["eff_true"][0])
        if lp.get("par_true"):
            r["paraphrase_score"] = _mean([float(n > t) for n, t in zip(lp["gen"], lp["par_true"])])
        if lp.get("nb_true"):
            r["neighborhood_score"] = _mean([float(t > n) for n, t in zip(lp["nb_new"], lp["nb_true"])])
    return r


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the facts that have it."""
    keys = sorted({k for r in rows for k in r})
    return {k: _mean([r[k] for r in rows if k in r]) for k in keys}


# --- fluency ---------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def words(text: str) -> list[str]:
    """Words and punctuation marks: a dependency-free stand-in for nltk.word_tokenize, which
    ROME and EasyEdit use (it differs on contractions: nltk splits "don't" into do + n't)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's `compute_n_gram_entropy` (as EasyEdit): the arithmetic mean over n in (2, 3) of
    weight_n x the entropy in bits of the text's n-gram frequency distribution, weights 2/3
    and 4/3. Repetitive text scores low. A text with fewer than n words has entropy 0 at n."""
    tokens = words(text)
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        h = -math.fsum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return math.fsum(terms) / len(terms)


def fluency_prompts(fact: Fact) -> list[str]:
    """The prompts whose generations a fact's fluency is measured on."""
    return [fact.prompt, *fact.rephrase_prompts]


def _cache_argument(model) -> str | None:
    """The name under which this model's forward takes and returns its KV cache, if any
    (`cache` in transformers 5, `past_key_values` before)."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


@torch.no_grad()
def greedy_generate(model, tok, prompts: list[str], *, max_length: int = FLUENCY_MAX_LENGTH,
                    max_rows: int = 32, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy continuation of each prompt up to max_length tokens in all (prompt included, as
    ROME's generate_fast), stopping at the end token. Prompts of equal token length run as one
    batch, so nothing is padded and each result equals the prompt's unbatched generation.
    Uses the model's KV cache when it has one; a model without recomputes the whole sequence."""
    ids = [prompt_ids(tok, p) for p in prompts]
    eos = tok.eos_token_id
    device = next(model.parameters()).device
    cache_arg = _cache_argument(model)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(ids):
        by_len.setdefault(len(s), []).append(i)
    out: list[str] = [""] * len(prompts)
    done = 0
    for length, members in sorted(by_len.items()):
        for k in range(0, len(members), max_rows):
            rows = members[k:k + max_rows]
            steps = max(max_length - length, 0)
            seq = torch.tensor([ids[i] for i in rows], dtype=torch.long, device=device)
            new = torch.empty((len(rows), 0), dtype=torch.long, device=device)
            past = None
            finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for _ in range(steps):
                if past is None:
                    res = model(input_ids=torch.cat([seq, new], 1), use_cache=cache_arg is not None)
                else:
                    res = model(input_ids=new[:, -1:], use_cache=True, **{cache_arg: past})
                past = getattr(res, cache_arg, None) if cache_arg else None
                nxt = res.logits[:, -1].argmax(-1)
                new = torch.cat([new, nxt[:, None]], 1)
                if eos is not None:
                    finished |= nxt == eos
                    if bool(finished.all()):
                        break
            for r, i in enumerate(rows):
                toks = new[r].tolist()
                if eos is not None and eos in toks:
                    toks = toks[:toks.index(eos)]
                out[i] = tok.decode(toks, skip_special_tokens=True)
            done += len(rows)
            if progress:
                progress(done, len(prompts))
    return out


def fluency(model, tok, facts: list[Fact], *, max_length: int = FLUENCY_MAX_LENGTH,
            progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Per fact: the mean n-gram entropy of prompt + greedy continuation over its prompt and
    rephrases (ROME scores the generated text with its prefix)."""
    prompts = [(fi, p) for fi, f in enumerate(facts) for p in fluency_prompts(f)]
    gens = greedy_generate(model, tok, [p for _, p in prompts], max_length=max_length, progress=progress)
    per: list[list[float]] = [[] for _ in facts]
    for (fi, p), g in zip(prompts, gens):
        per[fi].append(ngram_entropy(p + g))
    return [_mean(xs) for xs in per]
