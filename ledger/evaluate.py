"""Edit metrics, by EasyEdit's definitions (docs/design.md, "Evaluation"), so numbers compare.

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
- gen_reliability / gen_generalization / gen_locality / repetition / gen_entropy: free greedy generation
  (see `generation_scores`): teacher forcing feeds the model the target's own tokens, which
  overstates what an edited model says on its own ("The Mirage of Model Editing",
  arXiv 2502.11177)

`measure_many` runs one model state over every sequence some facts need, packed into batches
of similar length; `score` turns the measurement after an edit (and the reference one, for
locality) into metrics. `generate_many` and `generation_metrics` do the same for free
generation.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .facts import Fact
from .text import Batch, batch_of, encode_pair, greedy_token_ids, prompt_ids, scored_logits, target_ids

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


def answers(m: Measurement) -> bool:
    """The model already gives the fact's new target on its prompt (every target token is the
    argmax): there is nothing to edit, so `ledger add` skips the fact (--strict: refuses the file)."""
    return m.accuracy["rel"][0] == 1.0


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


def greedy_generate(model, tok, prompts: list[str], *, max_length: int = FLUENCY_MAX_LENGTH,
                    max_new_tokens: int | list[int] | None = None, max_rows: int = 32,
                    progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The text of each prompt's greedy continuation, cut at the end token (text.greedy_token_ids):
    up to max_length tokens in all (prompt included, as ROME's generate_fast), or, where
    max_new_tokens is given (one number, or one per prompt), that many new tokens."""
    if max_new_tokens is None:
        max_new_tokens = [max(max_length - len(prompt_ids(tok, p)), 0) for p in prompts]
    gens = greedy_token_ids(model, tok, prompts, max_new_tokens, max_rows=max_rows, progress=progress)
    return [tok.decode(g, skip_special_tokens=True) for g in gens]


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


# --- free generation ---------------------------------------------------------------------------

# New tokens generated greedily per prompt; a prompt whose target is longer gets the target's
# token count + 2, so gen_reliability can always see the whole target.
GEN_NEW_TOKENS = 20
# gen_locality: how many leading generated tokens of a locality prompt must equal the base's.
GEN_LOCALITY_TOKENS = 6
# repetition: the same word this many times in a row.
REPEAT_RUN = 3

_IS_WORD = re.compile(r"\w")


@dataclass
class Generations:
    """One fact's greedy continuations (the new text only, cut at the end token): of its
    prompt, its rephrases and its locality prompts, the latter also as token ids."""
    prompt: str
    rephrases: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)
    locality_ids: list[list[int]] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [self.prompt, *self.rephrases, *self.locality]


def generation_prompts(fact: Fact) -> list[tuple[str, str]]:
    """(kind, prompt) for every prompt a fact's free-generation metrics generate from."""
    return ([("prompt", fact.prompt)] + [("rephrase", p) for p in fact.rephrase_prompts]
            + [("locality", lp.prompt) for lp in fact.locality_prompts])


def n_generations(facts: list[Fact]) -> int:
    """How many prompts generate_many generates from (for progress totals)."""
    return sum(len(generation_prompts(f)) for f in facts)


def generate_many(model, tok, facts: list[Fact], *,
                  progress: Callable[[int, int], None] | None = None) -> list[Generations]:
    """Per fact, the greedy continuations its free-generation metrics need: GEN_NEW_TOKENS
    new tokens from every prompt (the prompt and rephrases: at least the target's token
    count + 2), all facts' prompts in one greedy_token_ids call. progress counts prompts."""
    items = [(fi, kind, p) for fi, f in enumerate(facts) for kind, p in generation_prompts(f)]
    limits = [GEN_NEW_TOKENS if kind == "locality"
              else max(GEN_NEW_TOKENS, len(target_ids(tok, p, facts[fi].target_new)) + 2)
              for fi, kind, p in items]
    ids = greedy_token_ids(model, tok, [p for _, _, p in items], limits, progress=progress)
    out = [Generations(prompt="") for _ in facts]
    for (fi, kind, _), g in zip(items, ids):   # items keep each fact's order
        text = tok.decode(g, skip_special_tokens=True)
        if kind == "prompt":
            out[fi].prompt = text
        elif kind == "rephrase":
            out[fi].rephrases.append(text)
        else:
            out[fi].locality.append(text)
            out[fi].locality_ids.append(g)
    return out


def starts_with_target(continuation: str, target: str) -> bool:
    """Whether a generated continuation says the target first: the continuation without its
    leading whitespace starts with the target without its surrounding whitespace (case and
    punctuation count; "Rome" also matches a continuation "Romeo")."""
    return continuation.lstrip().startswith(target.strip())


def repeats(text: str, times: int = REPEAT_RUN) -> bool:
    """Whether the same word occurs `times` or more times in a row in text. Words are those of
    `words()`, lower-cased, with the punctuation marks dropped before runs are counted, so
    punctuation between the repeats does not break a run: "Germany, Germany, Germany" loops
    as "painter painter painter" does; "a, b, a" does not."""
    run, last = 0, None
    for w in words(text):
        if not _IS_WORD.match(w):
            continue
        w = w.lower()
        run = run + 1 if w == last else 1
        last = w
        if run >= times:
            return True
    return False


def generation_scores(fact: Fact, gen: Generations, ref: Generations | None) -> dict[str, float]:
    """Free-generation metrics of one fact from its generations (a metric the fact gives no
    prompts for is left out):

    - gen_reliability:    1.0 if the prompt's continuation starts with target_new (starts_with_target), else 0.0
    - gen_generalization: the same, mean over the rephrases
    - gen_locality:       share of locality prompts whose first GEN_LOCALITY_TOKENS generated token ids
                          equal ref's (an end token within them counts: both must stop at the same place);
                          only with ref
    - repetition:         share of all the fact's generations (prompt, rephrases, locality prompts)
                          in which a word repeats REPEAT_RUN times in a row (`repeats`)
    - gen_entropy:        mean n-gram entropy (`ngram_entropy`, ROME's fluency measure) of those
                          generations: the continuations only, GEN_NEW_TOKENS tokens each, so
                          lower than ROME's figures on 100-token texts; compare with the base's"""
    r: dict[str, float] = {"gen_reliability": float(starts_with_target(gen.prompt, fact.target_new))}
    if gen.rephrases:
        r["gen_generalization"] = _mean([float(starts_with_target(g, fact.target_new)) for g in gen.rephrases])
    if gen.locality_ids and ref is not None:
        n = GEN_LOCALITY_TOKENS
        r["gen_locality"] = _mean([float(a[:n] == b[:n]) for a, b in zip(gen.locality_ids, ref.locality_ids)])
    r["repetition"] = _mean([float(repeats(t)) for t in gen.texts()])
    r["gen_entropy"] = _mean([ngram_entropy(t) for t in gen.texts()])
    return r


def generation_metrics(fact: Fact, gen: Generations, base: Generations) -> dict[str, float]:
    """generation_scores of the edited model's generations, gen_locality against the base
    model's, and the base model's own gen_reliability, gen_generalization, repetition and
    gen_entropy as base_gen_reliability, base_gen_generalization, base_repetition and
    base_gen_entropy, to put beside them."""
    r = generation_scores(fact, gen, base)
    r.update({f"base_{k}": v for k, v in generation_scores(fact, base, None).items()})
    return r
