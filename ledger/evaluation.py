"""Evaluating a revision on a fact set, and the stored evaluations. The metrics themselves
are ledger/evaluate.py's."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Iterable

from .editing import check_lengths
from .errors import InputError
from .evaluate import (FLUENCY_MAX_LENGTH, GEN_LOCALITY_TOKENS, GEN_NEW_TOKENS, fluency_prompts, generate_many,
                       generation_metrics, mean_metrics, measure_many, n_generations, n_sequences, score)
from .evaluate import fluency as fluency_scores
from .facts import Fact
from .history import evaluations_at
from .names import eval_name, rev_name
from .progress import Progress, ProgressEvent
from .results import EvalReport
from .handle import Handle
from .store import audit, blobs, evaluations as stored, refs, revisions
from .store.engine import write_transaction


def dataset_sha256(facts: list[Fact]) -> str:
    """sha256 of the canonical JSON of a fact list (order matters): the same facts evaluated
    at two revisions compare by this."""
    canon = json.dumps([f.to_dict() for f in facts], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def evaluate(s: Handle, facts: Iterable[Fact], rev: str = "HEAD", *, fluency: bool = False,
             generation: bool = True, label: str | None = None, progress: Progress | None = None) -> EvalReport:
    """Measure every fact at `rev` (docs/design.md, evaluation) and store the result as an
    evaluation of that revision. Locality compares with the unedited base model (the empty
    composition), measured once per fact. With generation, also the free-generation
    metrics (evaluate.generation_metrics) of greedy generations at `rev` and at the base
    model, the base's made once per call. With fluency, also the n-gram entropy of greedy
    generations of each fact's prompt and rephrases, at `rev` (fluency) and at the base
    (base_fluency). At a revision with no edits the base model's runs are the revision's.
    Progress events count sequences and generated prompts over all phases."""
    facts = list(facts)
    if not facts:
        raise InputError("no facts to evaluate")
    if any(not isinstance(f, Fact) for f in facts):
        raise InputError("evaluate takes Fact objects (see load_facts)")
    if label is not None and (not isinstance(label, str) or len(label) > 200 or "\x00" in label):
        raise InputError("--label must be text of at most 200 characters")
    with s.engine.connect() as conn:
        rid = refs.resolve(conn, rev)
        active = revisions.active_set(conn, rid)
    check_lengths(s, facts)
    t0 = time.perf_counter()
    name = rev_name(rid)
    n_ref = n_sequences(facts, {"loc"}) if active else 0
    n_all = n_sequences(facts)
    n_flu = sum(len(fluency_prompts(f)) for f in facts) if fluency else 0
    n_gen = n_generations(facts) if generation else 0
    n_base = n_ref + (n_gen + n_flu if active else 0)   # the base model's runs, before the revision's
    total = n_base + n_all + n_flu + n_gen

    def phase(phase_: str, offset: int, label_: str | None = None) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda d, t: progress(ProgressEvent(phase=phase_, label=label_ or phase_, done=offset + d, total=total))
    reference = base_gens = base_flu = None
    if active:   # the base model; at a revision with no edits the revision's own runs serve
        base = s.compose(set(), None)
        if n_ref:   # its argmax on the locality answers
            reference = measure_many(base.model, base.tokenizer, facts, kinds={"loc"},
                                     progress=phase("base model", 0))
        if generation:
            base_gens = generate_many(base.model, base.tokenizer, facts,
                                      progress=phase("base model generation", n_ref))
        if fluency:
            base_flu = fluency_scores(base.model, base.tokenizer, facts,
                                      progress=phase("base model fluency", n_ref + n_gen))
    composed = s.compose(active, rid)
    after = measure_many(composed.model, composed.tokenizer, facts, progress=phase("measure", n_base, name))
    per_fact = [score(a, b if reference is not None else a)
                for a, b in zip(after, reference or after)]
    options: dict[str, Any] = {"fluency": fluency, "generation": generation, "locality_reference": "base"}
    if fluency:
        options["fluency_max_length"] = FLUENCY_MAX_LENGTH
        flu = fluency_scores(composed.model, composed.tokenizer, facts,
                             progress=phase("fluency", n_base + n_all))
        for row, f, b in zip(per_fact, flu, base_flu or flu):
            row["fluency"] = f
            row["base_fluency"] = b
    if generation:
        options["generation_new_tokens"] = GEN_NEW_TOKENS
        options["generation_locality_tokens"] = GEN_LOCALITY_TOKENS
        gens = generate_many(composed.model, composed.tokenizer, facts,
                             progress=phase("generation", n_base + n_all + n_flu))
        for row, fact, g, b in zip(per_fact, facts, gens, base_gens or gens):
            row.update(generation_metrics(fact, g, b))
    means = mean_metrics(per_fact)
    sha = dataset_sha256(facts)
    created = blobs.now()
    with write_transaction(s.engine) as conn:
        eid = stored.write(conn, revision=rid, created_at=created, author=s.author, label=label,
                            dataset_sha256=sha, n=len(facts), means=means, per_fact=per_fact, options=options)
        audit.record(conn, s.author, "eval", rid, None, {"evaluation": eval_name(eid), "dataset_sha256": sha,
                                                         "n": len(facts), "label": label, "means": means,
                                                         "fluency": fluency, "generation": generation})
    return EvalReport(revision=name, n=len(facts), means=means, per_fact=per_fact, dataset_sha256=sha,
                      label=label, options=options, author=s.author, created_at=created,
                      id=eval_name(eid), seconds=round(time.perf_counter() - t0, 3))


def evaluations(s: Handle, rev: str = "HEAD", *, per_fact: bool = True) -> list[EvalReport]:
    """The stored evaluations of a revision, oldest first."""
    with s.engine.connect() as conn:
        return evaluations_at(conn, refs.resolve(conn, rev), per_fact=per_fact)
