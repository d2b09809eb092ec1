"""Adding edits: fact -> trainer -> record -> store -> composer -> model.

An edit is trained outside any database transaction (it takes seconds); the commit that
follows is one short serialised write transaction that first checks the branch did not move
meanwhile, so a revision is never committed on a parent it was not trained against. The
steps, each its own function:

1. `compose_parent`: the parent's composition with the edits it keeps, and what training
   reads from the ledger (the kept edits' facts, the relation's wordings);
2. `train`: the trainer on that model (it returns tensors and stats and never sees the
   database), then each new block measured as it will compose;
3. `records.build_record`: the stored row of each edit, a pure function;
4. `commit`: blobs, edits, the revision, HEAD and the audit in ONE transaction;
5. `recompose`: the model at the new revision, from the tensors already in memory.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Callable

from sqlalchemy import Connection

from . import wordings as wd
from .baft import BaftConfig, default_layer
from .baft.trainer import TrainedEdit, train_edits
from .compose import UNCOMMITTED, Block, ComposedModel
from .errors import BranchMoved, InputError
from .evaluate import answers, measure_many, repeats, score
from .text import greedy_token_ids
from .facts import Fact
from .names import edit_name, rev_name
from .progress import Progress, ProgressEvent
from .records import EditRecord, build_record
from .results import AddResult, AddResults, SkippedFact
from .handle import Handle, library_versions
from .store import audit, blobs, edits, refs, revisions
from .store import wordings as wording_table
from .store.engine import write_transaction, writer_lock

StepProgress = Callable[[int, int], None]   # what the trainer reports: (steps run, most steps)


def add(s: Handle, facts: list[Fact], config: BaftConfig | None = None, *, message: str | None = None,
        batch: int = 1, progress: Progress | None = None, skip_known: bool = False) -> AddResults:
    """Train, measure and commit the facts on top of HEAD: each fact as its own revision, or,
    with batch=K, K facts at a time trained together (one block per fact, one optimisation)
    and committed as one revision. A fact the model at HEAD already answers refuses the whole
    list, or, with skip_known, is left out and listed in the result's `skipped`."""
    started = time.perf_counter()
    if not facts:
        raise InputError("no facts to add")
    if batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}")
    cfg = config or BaftConfig()
    n_layers = len(s.base.layers)
    layer = cfg.layer if cfg.layer is not None else default_layer(n_layers)
    if layer >= n_layers:
        raise InputError(f"--layer {layer} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    skipped = precheck(s, facts, skip_known=skip_known)
    left_out = {k.record for k in skipped}
    records = [i for i in range(len(facts)) if i not in left_out]   # the facts' indices as given
    facts = [facts[i] for i in records]
    if batch > 1:
        seen: dict[tuple, int] = {}
        for j, f in enumerate(facts):
            key = (f.subject, f.relation) if f.relation else (None, f.prompt)
            if key in seen and seen[key] // batch == j // batch:
                raise InputError(f"records {records[seen[key]]} and {records[j]} state the same thing and would "
                                 "land in one batch: add them in separate commands")
            seen[key] = j
    results = AddResults(skipped=skipped)
    total = len(facts) * cfg.steps
    for start in range(0, len(facts), batch):
        group = facts[start: start + batch]
        label = f"edit {start + 1}/{len(facts)}" if len(group) == 1 else \
            f"edits {start + 1}-{start + len(group)}/{len(facts)}"
        steps = training_progress(progress, label, start, len(group), start * cfg.steps, total, len(facts))
        with writer_lock(s.engine):   # one commit at a time per ledger; readers go on
            results += _add_group(s, group, cfg, layer, message, steps)
    import torch   # loaded with the model already
    results.seconds = time.perf_counter() - started
    results.threads = torch.get_num_threads()
    return results


def training_progress(progress: Progress | None, label: str, fact: int, n_facts: int, offset: int,
                      total: int, facts_total: int) -> StepProgress | None:
    """The trainer's (step, steps) callback for one group, reporting ProgressEvents whose
    done/total count training steps over the whole command (a group of k facts counts k per step)."""
    if progress is None:
        return None

    def report(step: int, steps: int) -> None:
        progress(ProgressEvent(phase="train", label=label, done=offset + step * n_facts, total=total,
                               fact=fact, n_facts=n_facts, step=step, steps=steps, facts_total=facts_total))
    return report


def precheck(s: Handle, facts: list[Fact], *, skip_known: bool = False) -> list[SkippedFact]:
    """Refuse a file before anything is trained: a prompt longer than the model's context,
    or a target the model at HEAD already gives (nothing to edit). With skip_known, such a
    target is not refused: its fact is returned, to be left out."""
    check_lengths(s, facts)
    head = s.model_at()
    known = measure_many(head.model, head.tokenizer, facts, kinds={"rel"})   # one batched pass
    skipped = []
    for i, (f, m) in enumerate(zip(facts, known)):
        if answers(m):
            reason = (f"the model at {rev_name(head.revision)} already answers {f.target_new!r} to "
                      f"{f.prompt!r}: nothing to edit")
            if not skip_known:
                raise InputError(f"record {i}: {reason}")
            skipped.append(SkippedFact(record=i, fact=f.to_dict(), reason=reason))
    return skipped


def check_lengths(s: Handle, facts: list[Fact]) -> None:
    """Refuse a prompt (with its target) longer than the model's context."""
    tok = s.base.tokenizer
    config = s.base.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    for i, f in enumerate(facts):
        longest = max([f.prompt, *f.rephrase_prompts, *(lp.prompt for lp in f.locality_prompts),
                       *(pp.prompt + " " + pp.answer for pp in f.portability_prompts)], key=len)
        n = len(tok(longest + " " + f.target_new)["input_ids"])
        if n + 8 > limit:
            raise InputError(f"record {i}: a prompt is {n} tokens, longer than the model's context ({limit})")


def superseded(conn: Connection, fact: Fact, active: set[int]) -> list[int]:
    """Active edits stating the same subject and relation: the new fact replaces them."""
    if not fact.subject or fact.relation is None or not active:
        return []
    return sorted(e for e in edits.stating(conn, fact.subject, fact.relation) if e in active)


def _add_group(s: Handle, facts: list[Fact], cfg: BaftConfig, layer: int, message: str | None,
               progress: StepProgress | None) -> list[AddResult]:
    """Train and commit one group on HEAD, again on the new HEAD when another writer moved it."""
    if message is None:
        message = (f"add: {facts[0].prompt} -> {facts[0].target_new}" if len(facts) == 1
                   else f"add: {len(facts)} facts in one batch ({facts[0].prompt} -> {facts[0].target_new}, ...)")
    rng = random.Random()
    for attempt in range(s.max_attempts):
        with s.engine.connect() as conn:
            state = refs.head(conn)
            parent_active = revisions.active_set(conn, state.revision)
            replaced = sorted({e for f in facts for e in superseded(conn, f, parent_active)})
        try:
            return train_and_commit(s, facts, cfg, layer, state.revision, parent_active - set(replaced), replaced,
                                    "add", message, progress)
        except BranchMoved:
            # Another writer committed first. An edit must be trained in the composition
            # it is committed on, so retrain on the new head (after a short random wait
            # so that racing writers spread out).
            if attempt + 1 == s.max_attempts:
                raise
            time.sleep(rng.uniform(0, 0.05 * (attempt + 1)))
    raise AssertionError("unreachable")


# --- the pipeline ----------------------------------------------------------------------------------

@dataclass
class TrainingInputs:
    """What one training run reads: the parent's composition with the kept edits on, and per
    fact the prompts the ledger adds to its own."""

    composed: ComposedModel
    retention: list[tuple[str, str]]   # the kept edits' (prompt, target_new): must stay answered
    wordings: list[list[str]]          # per fact, other wordings of its relation, filled
    rewritten: list[bool]              # per fact, its wordings are rewrites of its prompt
    others: list[list[str]]            # per fact, its subject in other catalogued relations
    negatives: list[list[str]]         # per fact, such prompts that set the ramp of its gate's key


def compose_parent(s: Handle, facts: list[Fact], cfg: BaftConfig, parent: int, train_on: set[int],
                   remove: list[int]) -> TrainingInputs:
    with s.engine.connect() as conn:
        retention = [(f["prompt"], f["target_new"]) for f in edits.facts_of(conn, train_on).values()]
        extra, rewritten = wording_prompts(conn, facts, cfg)
    others = [wd.other_relations(f, ws, cfg.other_relations, cfg.seed, before=cfg.other_relations_before,
                                 after=cfg.other_relations_after)
              for f, ws in zip(facts, extra)]
    negatives = [wd.relation_negatives(f, ws, cfg.relation_negatives, cfg.seed) for f, ws in zip(facts, extra)]
    composed = s.compose(train_on, parent if not remove else None)
    return TrainingInputs(composed, retention, extra, rewritten, others, negatives)


def wording_prompts(conn: Connection, facts: list[Fact], cfg: BaftConfig) -> tuple[list[list[str]], list[bool]]:
    """Per fact, up to cfg.wordings other wordings of its relation, filled with its subject;
    where the table gives none, up to cfg.rewrites relation-agnostic rewrites of its prompt
    instead (wordings.rewrites). And per fact, whether its prompts are such rewrites."""
    if cfg.wordings <= 0:
        return [[] for _ in facts], [False] * len(facts)
    relations = [wd.template_of(f.prompt, f.subject) for f in facts]
    table = wording_table.of_relations(conn, [r for r in relations if r])
    out, rewritten = [], []
    for f, r in zip(facts, relations):
        own = table.get(r, []) if r else []
        # Related relations lend wordings only where the fact's own are too few; then the
        # relation nearest by content words (a hand-written prompt rarely is a key).
        lent = wd.related(conn, r, own, cfg.wordings_related) if r and len(own) < cfg.wordings else []
        if r and cfg.wordings_nearest and len(own) + len(lent) < cfg.wordings:
            lent += [w for w in wd.nearest(conn, r) if w not in own and w not in lent]
        prompts = wd.training_prompts(f, own, cfg.wordings, cfg.seed, borrowed=lent)
        # Only where the table gives nothing: next to a relation's own wordings, rewrites of
        # the prompt cost generalisation on counterfact-val (docs/design.md, `rewrites`).
        if not prompts:
            prompts = wd.rewrites(f, min(cfg.rewrites, cfg.wordings))
            rewritten.append(bool(prompts))
        else:
            rewritten.append(False)
        out.append(prompts)
    return out, rewritten


def train(s: Handle, facts: list[Fact], cfg: BaftConfig, layer: int, inputs: TrainingInputs,
          kept: list[Block], progress: StepProgress | None) -> tuple[list[TrainedEdit], list[dict[str, float]]]:
    """Train one block per fact (together) on the parent's composition, then measure each as
    it will compose: the kept blocks, and the new ones after them in order, as their ids will
    sort. The metrics compare with the parent's composition."""
    composed = inputs.composed
    model, tok = composed.model, composed.tokenizer
    before = measure_many(model, tok, facts)

    def train_and_compose(after: list[list[str]] | None = None) -> list[TrainedEdit]:
        """The new blocks trained on the parent's composition, then composed after the kept ones.
        A retrain for loops (after) stops at stop_prob on every row: its after-target rows need
        the steps the full margin gives (docs/design.md, `stop_prob_wordings`)."""
        run_cfg = cfg
        if after is not None:
            composed.compose(kept, None)      # the first run's blocks off again
            run_cfg = replace(cfg, stop_prob_wordings=None)
        new = train_edits(model, tok, composed.sites, s.base.layers, facts, run_cfg, layer=layer,
                          retention=inputs.retention, extra_prompts=inputs.wordings, other_prompts=inputs.others,
                          negative_prompts=inputs.negatives, progress=progress, after_prompts=after,
                          base_rows=composed.base_rows)
        composed.compose(kept + [Block(UNCOMMITTED + k, layer, t.tensors) for k, t in enumerate(new)], None)
        return new

    trained = train_and_compose()
    looping = looping_wordings(model, tok, facts, inputs.wordings) if cfg.loop_check else None
    looped = [w if len(w) >= cfg.loop_check else [] for w in looping or []]
    if any(looped):
        # Trained again from the parent, with an after-target row for each wording that
        # loops, so the edited model goes on after the answer as the parent does.
        first_run, trained = trained, train_and_compose(looped)
        for t, w, first in zip(trained, looped, first_run):
            t.stats["loop_retrained"] = len(w)       # wordings that looped after the first training
            t.stats["first_steps"] = first.stats["steps"]
            t.stats["seconds"] = round(t.stats["seconds"] + first.stats["seconds"], 3)
    for k, (t, prompts, rewritten, other) in enumerate(zip(trained, inputs.wordings, inputs.rewritten,
                                                           inputs.others)):
        if looping is not None:
            t.stats["looping_wordings"] = len(looping[k])   # after the first training, retrained or not
        t.stats["wording_prompts"] = prompts      # what this edit was trained on, for the audit
        t.stats["rewritten"] = rewritten          # the table had nothing: these are rewrites of the prompt
        t.stats["other_relation_prompts"] = other
        t.stats["relation_negative_prompts"] = inputs.negatives[k]
    metrics = [score(after, b) for after, b in zip(measure_many(model, tok, facts), before)]
    return trained, metrics


LOOP_CHECK_TOKENS = 12


def looping_wordings(model, tok, facts: list[Fact], wordings: list[list[str]]) -> list[list[str]]:
    """Per fact, its prompt and trained wordings whose greedy continuation (LOOP_CHECK_TOKENS
    tokens) at the model as it is repeats a word three times in a row."""
    items = [(k, w) for k, f in enumerate(facts) for w in [f.prompt, *wordings[k]]]
    ids = greedy_token_ids(model, tok, [w for _, w in items], LOOP_CHECK_TOKENS, padded=True)
    out: list[list[str]] = [[] for _ in facts]
    for (k, w), g in zip(items, ids):
        if repeats(tok.decode(g, skip_special_tokens=True)):
            out[k].append(w)
    return out


def commit(s: Handle, records: list[EditRecord], facts: list[Fact], *, parent: int, remove: list[int],
           operation: str, message: str) -> tuple[int, list[int]]:
    """Write the edits and one revision on `parent` that removes `remove` and adds them, move
    HEAD and audit, in one transaction; BranchMoved (nothing written) when HEAD is no longer
    at `parent`. Returns the new revision and edit ids."""
    with write_transaction(s.engine) as conn:
        now_state = refs.head(conn)
        if now_state.revision != parent:
            raise BranchMoved(f"the branch moved from {rev_name(parent)} to {rev_name(now_state.revision)} "
                              "while training: nothing was written, run the command again")
        edit_ids = []
        for record in records:
            blobs.put(conn, record.blob)
            edit_ids.append(edits.write(conn, record.columns))
        changes = [(e, "remove") for e in remove] + [(e, "add") for e in edit_ids]
        rev = revisions.append(conn, parent_id=parent, operation=operation, author=s.author,
                               message=message, changes=changes)
        what = edit_name(edit_ids[0]) if len(edit_ids) == 1 else \
            f"{edit_name(edit_ids[0])}..{edit_name(edit_ids[-1])}"
        refs.advance_head(conn, rev.id, s.author, f"{operation} {what}")
        for fact, edit_id in zip(facts, edit_ids):
            audit.record(conn, s.author, operation, rev.id, edit_id, {
                "fact": fact.prompt, "target_new": fact.target_new, "removed": [edit_name(e) for e in remove]})
    return rev.id, edit_ids


def recompose(s: Handle, composed: ComposedModel, revision: int, kept: set[int], edit_ids: list[int],
              trained: list[TrainedEdit], layer: int) -> None:
    """The model at the new revision, the new blocks from the tensors in memory (what the
    blobs hold)."""
    for edit_id, t in zip(edit_ids, trained):
        s.blocks[edit_id] = Block(edit_id, layer, t.tensors)
    composed.compose(s.blocks_of(kept | set(edit_ids)), revision)


def train_and_commit(s: Handle, facts: list[Fact], cfg: BaftConfig, layer: int, parent: int, train_on: set[int],
                     remove: list[int], operation: str, message: str,
                     progress: StepProgress | None) -> list[AddResult]:
    """Train one block per fact (together) with the blocks of `train_on` active and frozen,
    measure each, and commit one revision on `parent` that removes `remove` and adds them."""
    inputs = compose_parent(s, facts, cfg, parent, train_on, remove)
    trained, metrics = train(s, facts, cfg, layer, inputs, s.blocks_of(train_on), progress)
    versions, created = library_versions(), blobs.now()
    records = [build_record(f, t.tensors, t.stats, m, cfg, layer, trained_on=parent, author=s.author,
                            versions=versions, created_at=created)
               for f, t, m in zip(facts, trained, metrics)]
    rev_id, edit_ids = commit(s, records, facts, parent=parent, remove=remove, operation=operation, message=message)
    recompose(s, inputs.composed, rev_id, train_on, edit_ids, trained, layer)
    return [AddResult(revision=rev_name(rev_id), edit=edit_name(e), metrics=m, stats=t.stats,
                      superseded=[edit_name(x) for x in remove], fact=f.to_dict())
            for e, m, t, f in zip(edit_ids, metrics, trained, facts)]
