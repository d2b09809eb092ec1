"""Edit quality: BaFT vs ReFT vs FT-M, single and sequential editing, CounterFact and zsRE.

One process, one model load. Per dataset (the first N records from --offset of
counterfact/counterfact-edit-1k.json and zsre/zsre_mend_train-1k.json under --data-dir, and of
bench/data/everyday-dev.json, hand-written everyday facts, and, with --datasets descriptions or
everyday-check, of bench/data/descriptions-dev.json, hand-written facts whose subject is a
description, or bench/data/everyday-check.json, hand-written everyday facts of other relations):

- single:     each fact edited alone from the base model. BaFT/ReFT: one SQLite ledger,
              `checkout rev-1` then `Ledger.add` per fact (the full product path), the fact
              measured at its own revision. FT-M: the weight restored after every fact.
- sequential: the first T facts added one after another (BaFT/ReFT: `Ledger.add` into a fresh
              SQLite ledger, one revision per fact; FT-M: the same weight fine-tuned fact after
              fact), then all T evaluated at the final revision.
- batch:      (--batch-K) the first K facts as ONE `Ledger.add(facts, cfg, batch=K)` revision
              (FT-M: one fine-tuning batch of K), compared with one-by-one adds of the same
              facts (the sequential setting with T = K, run for it).

Metrics are ledger.evaluate's (EasyEdit's definitions); locality is agreement with the
UNEDITED base model (docs/design.md, "Evaluation") in every setting. BaFT/ReFT train with
train_on_rephrases=False, train_on_locality=False: the fact's own rephrase and locality
prompts are held out for evaluation. Every ledger holds the relation wordings of --wordings
(default: the built-in tables `ledger init` gives a new ledger) minus, with --held-out strict
(the default), every pair whose wording is an evaluated fact's rephrase wording, and every pair
of a relation whose key is one where an edit of the run would be lent that key
(held_out_pairs), so generalisation is measured on wordings no edit of the run was trained on,
whichever relation it borrows from (--held-out strict-relations: every relation whose key is
one, lent or not). --held-out per-fact keeps the whole table, as a user's
ledger holds it, and relies on the product's own rule (wordings.training_prompts): an edit
never trains on its own fact's prompt and rephrase wordings; other facts' edits may train on
a wording this fact is evaluated on, filled with their own subjects. A fact the
model already answers with target_new is refused by `Ledger.add`; it is skipped (and listed) for every method alike. On zsRE the
CounterFact probability scores are not reported (its locality prompts are unrelated NQ
questions, so "P(true) > P(new)" on them means nothing); its true answer is not used.
BaFT/ReFT rows also carry the free-generation metrics of `ledger eval` (gen_reliability,
gen_generalization, gen_locality, repetition, gen_entropy: ledger.evaluate.generation_metrics,
greedy generations at the edited model and at the base) with the base model's values beside
them (base_gen_reliability, base_gen_generalization, base_repetition, base_gen_entropy).

Prints one JSON line per (dataset, method, setting[, T or K]) to stdout (and --out), a
progress line per edit to stderr.

    .venv/bin/python bench/quality.py                       # n=200, T=10,100: hours on 2 cores
    .venv/bin/python bench/quality.py --n 2 --seq-T 3 --threads 1    # a smoke run
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ftm import FTMConfig, FTMEditor  # noqa: E402
from ledger import BaftConfig, InputError, Ledger  # noqa: E402
from ledger.baft import default_layer  # noqa: E402
from ledger.evaluate import (Generations, Measurement, answers, generate_many, generation_metrics,  # noqa: E402
                             mean_metrics, measure, score)
from ledger.facts import Fact, fact_from_record, to_native  # noqa: E402
from ledger.models import BaseModel  # noqa: E402
from ledger.editing import wording_prompts  # noqa: E402
from ledger.store.schema import Blob, Wording  # noqa: E402
from ledger.store.wordings import write as write_wordings  # noqa: E402
from ledger.wordings import BUILTIN, DATA_DIR, SubjectForm, read_pairs, template_of  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402

DATASETS = {"counterfact": ("counterfact/counterfact-edit-1k.json", "counterfact"),
            "zsre": ("zsre/zsre_mend_train-1k.json", "zsre"),
            # Everyday facts of relations CounterFact lacks, hand-written for tuning (bench/data).
            "everyday": (str(ROOT / "bench" / "data" / "everyday-dev.json"), "native"),
            # Subjects that are descriptions ("tallest building in the world"), hand-written (bench/data).
            "descriptions": (str(ROOT / "bench" / "data" / "descriptions-dev.json"), "native"),
            # Everyday facts of other relations than everyday's, hand-written to check that what
            # is tuned on everyday carries to facts it was not tuned on (bench/data).
            "everyday-check": (str(ROOT / "bench" / "data" / "everyday-check.json"), "native")}
# --cf-split: tune on val (or train), report on edit-1k.
CF_SPLITS = {"edit-1k": "counterfact/counterfact-edit-1k.json", "val": "counterfact/counterfact-val.json",
             "train": "counterfact/counterfact-train.json"}
METHODS = ("baft", "reft", "ftm")
SETTINGS = ("single", "sequential", "batch")
CF_ONLY = ("efficacy_score", "paraphrase_score", "neighborhood_score")
METRICS = ("reliability", "generalization", "locality") + CF_ONLY
GEN_METRICS = ("gen_reliability", "gen_generalization", "gen_locality", "repetition", "gen_entropy",
               "base_gen_reliability", "base_gen_generalization", "base_repetition", "base_gen_entropy")


# --- inputs ------------------------------------------------------------------------------------

def record_range(text: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    try:
        start, end = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B, two record numbers, got {text!r}") from None
    if not sep or start < 0 or end <= start:
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A < B, got {text!r}")
    return start, end


def int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def name_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return out
    return parse


def load_dataset(data_dir: Path, name: str, offset: int, count: int) -> list[tuple[str, Fact]]:
    """(id, fact) for records [offset, offset + count) of the dataset's file. zsRE facts drop
    their true answer (unused, and equal to target_new in some records)."""
    rel, fmt = DATASETS[name]
    path = data_dir / rel
    records = json.loads(path.read_text())[offset: offset + count]
    out = []
    for i, rec in enumerate(records, offset):
        native = to_native(rec, fmt, i)
        if name == "zsre":
            native = {k: v for k, v in native.items() if k != "target_true"}
        fact = fact_from_record(native, i)
        out.append((f"case {fact.case_id}" if fact.case_id else f"{name}[{i}]", fact))
    return out


# --- provenance --------------------------------------------------------------------------------

def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    return {"git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain"))}


# --- ledgers sharing one loaded base model -----------------------------------------------------

def held_out_pairs(paths: list[Path], facts: list[Fact], cfg: BaftConfig | None = None, *,
                   whole_relations: bool = False) -> set[tuple[str, str]]:
    """The (relation, wording) pairs to leave out of the table (--held-out strict): every pair
    whose wording is the wording of an evaluated fact's rephrase, under any relation, as written
    or as a fact writes it for its subject (wordings.SubjectForm). Given
    cfg, also every pair of a relation whose key is such a wording and which an edit of these
    facts, trained with cfg, would still be lent (wordings.nearest lends a relation's key with
    its wordings): checked with the product's own choice of prompts (editing.wording_prompts)
    on the table left, until none is. No edit of the run can then train on a wording it is
    evaluated on, whichever relation it borrows from (wordings.related, wordings.nearest).
    whole_relations: every pair of every relation whose key is such a wording, whether lent or
    not (--held-out strict-relations)."""
    # The evaluated wordings by how their facts write a table wording for the subject
    # (wordings.SubjectForm): "{} was painted by" is "The {} was painted by" for the Mona Lisa.
    by_form: dict[SubjectForm, set[str]] = {}
    for f in facts:
        by_form.setdefault(SubjectForm.of(f), set()).update(
            w for w in (template_of(p, f.subject) for p in f.rephrase_prompts) if w)
    evaluated = set().union(*by_form.values())
    pairs = list(dict.fromkeys(p for path in paths for p in read_pairs(path)[0]))

    def evaluated_wording(w: str) -> bool:
        return w in evaluated or any(form.template(w) in ws for form, ws in by_form.items())

    out = {(r, w) for r, w in pairs if evaluated_wording(w) or (whole_relations and r in evaluated)}
    if cfg is None or whole_relations:
        return out
    while True:
        leaked = reachable_templates([p for p in pairs if p not in out], facts, cfg) & evaluated
        more = {(r, w) for r, w in pairs if r in leaked} - out
        if not more:
            if leaked:
                raise RuntimeError(f"held-out wordings still reachable: {sorted(leaked)[:3]}")
            return out
        out |= more


def reachable_templates(pairs: list[tuple[str, str]], facts: list[Fact], cfg: BaftConfig) -> set[str]:
    """The templates of the table prompts the product would train these facts on
    (editing.wording_prompts) with a wordings table of these pairs; rewrites of a fact's own
    prompt come from no table and are left out."""
    engine = create_engine("sqlite://")
    try:
        Wording.__table__.create(engine)
        with engine.begin() as conn:
            write_wordings(conn, list(dict.fromkeys(pairs)), "held-out check", "")
            prompts, rewritten = wording_prompts(conn, facts, cfg)
    finally:
        engine.dispose()
    return {template_of(p, f.subject) for f, ps, rw in zip(facts, prompts, rewritten) if not rw for p in ps}


class Ledgers:
    """Fresh SQLite ledgers on one loaded base model: the first is made by `Ledger.init` (the
    one model load); every further one is a copy of that rev-1 database, opened with the
    loaded base handed over instead of loaded again (same model, same fingerprint)."""

    def __init__(self, workdir: Path, model: str | None, wordings: list[Path] = (),
                 held_out: set[tuple[str, str]] = frozenset(), keep: Path | None = None):
        self.workdir = workdir
        self.keep = keep        # where each ledger's database is copied when its run ends
        self.template = workdir / "template.db"
        lg = Ledger.init(f"sqlite:///{self.template}", model=model, wordings=False)
        self.base: BaseModel = lg.base
        # Every ledger starts with the same wordings table (by default the one `ledger init`
        # gives), without the held-out pairs: generalisation is measured on wordings no edit
        # was trained on.
        imported = [lg.import_wordings(path, exclude=held_out).to_dict() for path in wordings]
        self.wordings = {"source": ",".join(r["source"] for r in imported),
                         **{k: sum(r[k] for r in imported) for k in ("pairs", "added", "excluded")}} \
            if imported else None
        lg.close()   # detaches its (empty) composition: the base model is bare between runs
        self.count = 0

    @contextmanager
    def fresh(self) -> Iterator[Ledger]:
        self.count += 1
        d = self.workdir / f"ledger-{self.count}"
        d.mkdir()
        src, dst = sqlite3.connect(self.template), sqlite3.connect(d / "ledger.db")
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        lg = Ledger.open(f"sqlite:///{d / 'ledger.db'}")
        lg._base = self.base   # the model loaded once; Ledger.open would load it again on first use
        try:
            yield lg
        finally:
            lg.close()          # detaches the hooks: the next run starts from the bare base
            if self.keep is not None:
                self.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / "ledger.db", self.keep / f"ledger-{self.count}.db")
            shutil.rmtree(d, ignore_errors=True)


def blob_bytes(lg: Ledger, edit: str) -> int:
    address = lg.edit(edit).blob
    with lg.engine.connect() as conn:
        return int(conn.execute(select(Blob.size).where(Blob.sha256 == address)).scalar_one())


def already_answers(model, tok, fact: Fact) -> bool:
    """The rule `Ledger.add` refuses a fact by: the model gives target_new already."""
    return answers(measure(model, tok, Fact(prompt=fact.prompt, target_new=fact.target_new)))


# CounterFact's rephrase prompts are of two kinds. Most paraphrase the fact's relation ("Logan
# Thomas, the" for "Logan Thomas plays in the position of"). Others are CounterFact's
# generation prompts, which ask another question about the subject, so that target_new is
# not what the question asks for ("Where Richard Wagner passed away, people speak the
# language of" with target "Paris", "Christiane Taubira was born in" with target "Spanish"):
# scored right only where the edit makes the subject say its target whatever is asked. These
# are the phrases of those prompts, read off failing rephrases of counterfact-val and edit-1k;
# each recurs in counterfact-train (4,343 of its 10,000 rephrases hold one). Nothing trains on
# them: they only split the reported generalisation.
ANOTHER_QUESTION = ("people speak the language of", "people around", "surrounded by", "surroundings include",
                    "by navigating", "the locals held a", "religious events at the local",
                    "aired alongside other programs", "is known for", "is incredible at", "becomes important when",
                    "friends all speak", "has its name is that", "was born in", "favorite product out of",
                    "has to", "greatest accomplishment", "greatest strength", "the expertise of")
REPHRASE_KINDS = ("paraphrase", "another_question")
# A sequential row over more edits than this splits its figures by the order the edits were
# added in (Run.by_order): retention of old edits as new ones arrive.
ORDER_CHUNK = 100


def rephrase_kind(fact: Fact) -> str:
    """'another_question' where a rephrase prompt of the fact holds one of ANOTHER_QUESTION's
    phrases, else 'paraphrase'."""
    text = " ".join(fact.rephrase_prompts).lower()
    return "another_question" if any(p in text for p in ANOTHER_QUESTION) else "paraphrase"


# --- one run -----------------------------------------------------------------------------------

class Run:
    """What one (dataset, method, setting) run collects."""

    def __init__(self, dataset: str, method: str, setting: str, size: int | None,
                 base_gens: dict[str, Generations] | None = None):
        self.dataset, self.method, self.setting, self.size = dataset, method, setting, size
        # the base model's greedy generations per fact id: with them, every fact also gets
        # the free-generation metrics (BaFT/ReFT runs)
        self.base_gens = base_gens
        self.metrics: list[dict[str, float]] = []
        self.base_metrics: list[dict[str, float]] = []
        self.kinds: list[str] = []          # per edited fact, rephrase_kind(fact)
        self.seconds: list[float] = []
        self.steps: list[int] = []
        self.all_steps: list[int] = []      # per add, the steps of every training run (a loop retrain's too)
        self.bytes: list[int] = []
        self.skipped: list[str] = []
        self.superseded: list[str] = []
        self.n = 0
        self.total_seconds: float | None = None
        self.error: str | None = None

    @property
    def label(self) -> str:
        size = f" T={self.size}" if self.setting == "sequential" else f" K={self.size}" if self.setting == "batch" else ""
        return f"{self.dataset}/{self.method}/{self.setting}{size}"

    def record(self, fact: Fact, m: dict[str, float], base_m: dict[str, float]) -> None:
        """One edited fact's metrics, and the base model's on it."""
        self.metrics.append(m)
        self.base_metrics.append(base_m)
        self.kinds.append(rephrase_kind(fact))

    def progress(self, i: int, total: int, fid: str, text: str) -> None:
        print(f"[{self.label}] {i}/{total} {fid}: {text}", file=sys.stderr, flush=True)

    def by_rephrase_kind(self) -> dict[str, dict[str, float]]:
        """Generalisation over the facts whose rephrase is a paraphrase, and over those whose
        rephrase asks another question (rephrase_kind): a diagnosis, not a headline figure."""
        out = {}
        for kind in REPHRASE_KINDS:
            rows = [m for m, k in zip(self.metrics, self.kinds) if k == kind]
            if rows:
                out[kind] = {"n": len(rows), **{key: round(statistics.mean(m[key] for m in rows), 4)
                                                  for key in ("generalization", "gen_generalization") if key in rows[0]}}
        return out

    def by_order(self) -> dict[str, dict[str, float]]:
        """A sequential run's metrics at the last revision over its edits in order of adding,
        ORDER_CHUNK at a time ("1-100", "101-200", ...): how well the oldest edits are retained
        next to the newest. Present where the run edited more than one chunk."""
        out = {}
        for start in range(0, len(self.metrics), ORDER_CHUNK):
            rows = self.metrics[start:start + ORDER_CHUNK]
            keys = [k for k in ("reliability", "generalization", "locality", "gen_reliability",
                                "gen_generalization", "gen_locality", "repetition") if k in rows[0]]
            out[f"{start + 1}-{start + len(rows)}"] = {
                "n": len(rows), **{k: round(statistics.mean(m[k] for m in rows), 4) for k in keys}}
        return out

    def row(self, common: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        def means(rows: list[dict[str, float]]) -> dict[str, float]:
            m = mean_metrics(rows) if rows else {}
            if self.dataset != "counterfact":
                m = {k: v for k, v in m.items() if k not in CF_ONLY}
            return {k: round(v, 4) for k, v in m.items() if k in METRICS or k in GEN_METRICS}
        out: dict[str, Any] = {"dataset": self.dataset, "method": self.method, "setting": self.setting}
        if self.setting == "sequential":
            out["T"] = self.size
        elif self.setting == "batch":
            out["K"] = self.size
        m = means(self.metrics)
        out.update({"n": self.n, "n_edited": len(self.metrics), "skipped": self.skipped})
        out.update({k: m.get(k) for k in METRICS if k in m or self.dataset == "counterfact" or k not in CF_ONLY})
        out.update({k: m[k] for k in GEN_METRICS if k in m})
        if self.dataset == "counterfact" and self.metrics:
            out["by_rephrase_kind"] = self.by_rephrase_kind()
        if self.setting == "sequential" and len(self.metrics) > ORDER_CHUNK:
            out["by_order"] = self.by_order()
        if self.superseded:
            out["superseded"] = self.superseded
        if self.error:
            out["error"] = self.error
        if self.setting == "batch":
            per_fact = self.total_seconds / len(self.metrics) if self.metrics and self.total_seconds else None
            out["seconds_per_fact"] = round(per_fact, 3) if per_fact is not None else None
            out["seconds_total"] = round(self.total_seconds, 2) if self.total_seconds is not None else None
        out["median_seconds_per_edit"] = round(statistics.median(self.seconds), 3) if self.seconds else None
        out["mean_seconds_per_edit"] = round(statistics.mean(self.seconds), 3) if self.seconds else None
        out["mean_steps"] = round(statistics.mean(self.steps), 2) if self.steps else None
        # mean_steps counts the run an edit kept; where the loop check retrained it, the first
        # run's steps were paid for too (and are in the seconds)
        out["mean_steps_all_runs"] = round(statistics.mean(self.all_steps), 2) if self.all_steps else None
        out["stored_bytes_per_edit"] = round(statistics.mean(self.bytes)) if self.bytes else None
        out["unedited"] = means(self.base_metrics)   # the base model on the same facts, same run
        out["config"] = config
        out.update(common)
        return out


def evaluate_all(model, tok, run: Run, facts: list[tuple[str, Fact]], base_meas: dict[str, Measurement],
                 edited: list[str]) -> None:
    """Metrics of every edited fact on the model as it is now, locality against the base."""
    by_id = dict(facts)
    gens = generate_many(model, tok, [by_id[fid] for fid in edited]) if run.base_gens is not None else None
    for k, fid in enumerate(edited):
        m = score(measure(model, tok, by_id[fid]), base_meas[fid])
        if gens is not None:
            m.update(generation_metrics(by_id[fid], gens[k], run.base_gens[fid]))
        run.record(by_id[fid], m, score(base_meas[fid], base_meas[fid]))
        run.progress(k + 1, len(edited), fid, f"at the last revision {brief(m)}")


def base_progress(dataset: str, what: str) -> Callable[[int, int], None]:
    """progress(done, total) for the base model's reference pass: a stderr line each time done
    passes a multiple of 50, and at the end (on 1,000 facts the pass takes minutes before the
    first edit)."""
    last = 0

    def progress(done: int, total: int) -> None:
        nonlocal last
        if done // 50 > last // 50 or done == total:
            print(f"[{dataset}/base model] {done}/{total} {what}", file=sys.stderr, flush=True)
        last = done
    return progress


def brief(m: dict[str, float]) -> str:
    short = {"reliability": "rel", "generalization": "gen", "locality": "loc", "gen_reliability": "grel",
             "repetition": "rep"}
    return " ".join(f"{short[k]} {m[k]:.2f}" for k in short if k in m)


def stats_note(stats: dict) -> str:
    """The loop check's finding for a progress line: wordings that looped, and whether the
    edit was trained again for them; and whether the gate's ramp was set from the prompt."""
    keyed = ", gate set from the prompt" if stats.get("gate_key_prompt") else ""
    if "looping_wordings" not in stats:
        return keyed
    return f", loops {stats['looping_wordings']}" + (" (retrained)" if "loop_retrained" in stats else "") + keyed


def training_steps(stats: dict[str, Any]) -> int:
    """The steps of every training run of one add: the kept run's, and the first run's where
    the loop check trained the edit again (`first_steps`)."""
    return stats["steps"] + stats.get("first_steps", 0)


def add_one(lg, run: "Run", cfg: BaftConfig, i: int, facts, fid, fact, known):
    """Add one fact through `Ledger.add`, recording its time, steps and blob size in run;
    None (and a skip recorded) where the fact is known already or refused."""
    run.n += 1
    if fid in known:
        run.skipped.append(fid)
        run.progress(i, len(facts), fid, "skipped: the base model already answers target_new")
        return None
    t = time.perf_counter()
    try:
        [res] = lg.add([fact], cfg)
    except InputError as e:   # e.g. the edited model already answers it
        run.skipped.append(fid)
        run.progress(i, len(facts), fid, f"skipped: {e}")
        return None
    run.seconds.append(time.perf_counter() - t)
    run.steps.append(res.stats["steps"])
    run.all_steps.append(training_steps(res.stats))
    run.bytes.append(blob_bytes(lg, res.edit))
    return res


def ledger_single(ledgers: Ledgers, run: Run, cfg: BaftConfig, facts, base_meas, known) -> None:
    base = ledgers.base
    with ledgers.fresh() as lg:
        for i, (fid, fact) in enumerate(facts, 1):
            lg.checkout("rev-1")
            res = add_one(lg, run, cfg, i, facts, fid, fact, known)
            if res is None:
                continue
            composed = lg.model_at(res.revision)
            m = score(measure(composed.model, base.tokenizer, fact), base_meas[fid])
            if run.base_gens is not None:
                [gen] = generate_many(composed.model, base.tokenizer, [fact])
                m.update(generation_metrics(fact, gen, run.base_gens[fid]))
            run.record(fact, m, score(base_meas[fid], base_meas[fid]))
            run.progress(i, len(facts), fid, f"{run.seconds[-1]:.1f} s, {res.stats['steps']} steps{stats_note(res.stats)}, {brief(m)}")


def ledger_sequential(ledgers: Ledgers, run: Run, cfg: BaftConfig, facts, base_meas, known) -> None:
    base = ledgers.base
    edited = []
    with ledgers.fresh() as lg:
        for i, (fid, fact) in enumerate(facts, 1):
            res = add_one(lg, run, cfg, i, facts, fid, fact, known)
            if res is None:
                continue
            edited.append(fid)
            if res.superseded:
                run.superseded.append(fid)
            run.progress(i, len(facts), fid, f"{res.revision}, {run.seconds[-1]:.1f} s, {res.stats['steps']} steps{stats_note(res.stats)}, "
                                             f"at creation {brief(res.metrics)}")
        composed = lg.model_at()
        evaluate_all(composed.model, base.tokenizer, run, facts, base_meas, edited)


def ledger_batch(ledgers: Ledgers, run: Run, cfg: BaftConfig, facts, base_meas, known) -> None:
    base = ledgers.base
    todo = [(fid, f) for fid, f in facts if fid not in known]
    run.n = len(facts)
    run.skipped = [fid for fid, _ in facts if fid in known]
    with ledgers.fresh() as lg:
        t = time.perf_counter()
        try:
            results = lg.add([f for _, f in todo], cfg, batch=run.size)
        except InputError as e:   # e.g. two facts stating the same thing in one batch
            run.error = str(e)
            run.progress(len(facts), len(facts), "all", f"refused: {e}")
            return
        run.total_seconds = time.perf_counter() - t
        edits = {r.edit for r in results}
        run.steps = [r.stats["steps"] for r in results if "steps" in r.stats]
        run.all_steps = [training_steps(r.stats) for r in results if "steps" in r.stats]
        run.bytes = [sum(blob_bytes(lg, e) for e in edits) // max(1, len(todo))] if edits else []
        run.progress(len(facts), len(facts), "all", f"{len(todo)} facts in {run.total_seconds:.1f} s, "
                                                    f"{len(edits)} edit(s), {lg.head()['revision']}")
        composed = lg.model_at()
        evaluate_all(composed.model, base.tokenizer, run, facts, base_meas, [fid for fid, _ in todo])


def ftm_run(editor: FTMEditor, run: Run, facts, base_meas, known, *, restore_each: bool) -> None:
    model, tok = editor.model, editor.tok
    edited = []
    try:
        for i, (fid, fact) in enumerate(facts, 1):
            run.n += 1
            if fid in known or (not restore_each and already_answers(model, tok, fact)):
                run.skipped.append(fid)
                run.progress(i, len(facts), fid, "skipped: the model already answers target_new")
                continue
            t = time.perf_counter()
            stats = editor.edit(fact)
            run.seconds.append(time.perf_counter() - t)
            run.steps.append(stats["steps"])
            run.all_steps.append(training_steps(stats))
            run.bytes.append(editor.delta_bytes)
            if restore_each:
                m = score(measure(model, tok, fact), base_meas[fid])
                run.record(fact, m, score(base_meas[fid], base_meas[fid]))
                editor.restore()
                run.progress(i, len(facts), fid, f"{run.seconds[-1]:.1f} s, {stats['steps']} steps, {brief(m)}")
            else:
                edited.append(fid)
                run.progress(i, len(facts), fid, f"{run.seconds[-1]:.1f} s, {stats['steps']} steps, "
                                                 f"loss {stats['final_loss']:.3f}")
        if not restore_each:
            evaluate_all(model, tok, run, facts, base_meas, edited)
    finally:
        editor.restore()


def ftm_batch(editor: FTMEditor, run: Run, facts, base_meas, known) -> None:
    todo = [(fid, f) for fid, f in facts if fid not in known]
    run.n = len(facts)
    run.skipped = [fid for fid, _ in facts if fid in known]
    try:
        t = time.perf_counter()
        stats = editor.edit([f for _, f in todo]) if todo else {"steps": 0}
        run.total_seconds = time.perf_counter() - t
        run.steps.append(stats["steps"])
        run.all_steps.append(training_steps(stats))
        run.bytes = [editor.delta_bytes // max(1, len(todo))]
        run.progress(len(facts), len(facts), "all", f"{len(todo)} facts in {run.total_seconds:.1f} s, {stats['steps']} steps")
        evaluate_all(editor.model, editor.tok, run, facts, base_meas, [fid for fid, _ in todo])
    finally:
        editor.restore()


# --- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                    help="holds counterfact/ and zsre/ (default: ../shared/data beside the repo)")
    ap.add_argument("--n", type=int, default=200, help="facts per dataset for single editing (default 200)")
    ap.add_argument("--cf-split", choices=tuple(CF_SPLITS), default="edit-1k",
                    help="CounterFact file: edit-1k (report, the default), val or train (tune)")
    ap.add_argument("--offset", type=int, default=0, help="first record of each file (default 0)")
    ap.add_argument("--seq-T", type=int_list, default=[10, 100], metavar="T,...",
                    help="sequential run lengths (default 10,100): the first T facts of each dataset")
    ap.add_argument("--batch-K", type=int_list, default=None, metavar="K,...",
                    help="batch sizes: the first K facts as one Ledger.add(..., batch=K) revision, compared "
                         "with one-by-one adds of the same facts (needs Ledger.add's batch keyword)")
    ap.add_argument("--methods", type=name_list(METHODS), default=list(METHODS), metavar="M,...",
                    help="of baft,reft,ftm (default all)")
    ap.add_argument("--datasets", type=name_list(tuple(DATASETS)), default=["counterfact", "zsre", "everyday"],
                    metavar="D,...", help="of counterfact,zsre,everyday,descriptions,everyday-check (default the first three)")
    ap.add_argument("--settings", type=name_list(SETTINGS), default=["single", "sequential"], metavar="S,...",
                    help="of single,sequential,batch (default single,sequential; batch is added by --batch-K)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LEDGER_THREADS") or 2),
                    help="torch CPU threads (default $LEDGER_THREADS or 2)")
    ap.add_argument("--model", default=None, help="base model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--baft-config", type=json.loads, default={}, metavar="JSON",
                    help="BaftConfig fields over the defaults, for baft and reft (e.g. '{\"rank\": 8}')")
    ap.add_argument("--ftm-config", type=json.loads, default={}, metavar="JSON",
                    help="FTMConfig fields over EasyEdit's defaults (e.g. '{\"steps\": 50}')")
    ap.add_argument("--wordings", default="builtin", metavar="builtin|none|PATH",
                    help="relation wordings of every ledger: builtin (the tables `ledger init` starts with, "
                         "the default), none (`ledger init --no-wordings`), or a file relative to --data-dir "
                         "imported instead; with --held-out strict the evaluated rephrase wordings are left out")
    ap.add_argument("--held-out", choices=("strict", "strict-relations", "per-fact"), default="strict",
                    help="strict: every evaluated rephrase wording leaves the table for every edit of the run, "
                         "and so does every relation whose key is one and which some edit of the run would be "
                         "lent; strict-relations: every relation whose key is one, lent or not; per-fact: the "
                         "whole table, and each edit skips its own fact's wordings (the product's rule) "
                         "(default strict)")
    ap.add_argument("--held-out-records", type=record_range, default=None, metavar="A:B",
                    help="with --held-out strict: hold out the rephrase wordings of records [A, B) of each file "
                         "instead of the evaluated ones, so that one run split over processes (--offset, --n, "
                         "single edits) trains every edit as the whole run would (e.g. 0:200 in two runs of "
                         "--n 100 at --offset 0 and 100)")
    ap.add_argument("--keep-ledgers", type=Path, default=None, metavar="DIR",
                    help="copy each run's ledger database into DIR when the run ends (ledger-N.db, N in run "
                         "order), e.g. for bench/serving.py --db")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    args = ap.parse_args(argv)

    DATASETS["counterfact"] = (CF_SPLITS[args.cf_split], "counterfact")
    settings = list(dict.fromkeys(args.settings + (["batch"] if args.batch_K else [])))
    if "batch" in settings:
        if not args.batch_K:
            ap.error("--settings batch needs --batch-K K,...")
        if "batch" not in inspect.signature(Ledger.add).parameters:
            ap.error("--batch-K needs Ledger.add(facts, cfg, batch=K) (batched editing), which this version "
                     "of the ledger does not have yet")
    if args.n < 0 or args.offset < 0:
        ap.error("--n and --offset must not be negative")
    for name in args.datasets:
        if not (args.data_dir / DATASETS[name][0]).is_file():
            ap.error(f"no {name} file at {args.data_dir / DATASETS[name][0]}")
    try:
        eval_only = {"train_on_rephrases": False, "train_on_locality": False}
        cfgs = {m: BaftConfig.from_dict({**eval_only, **args.baft_config, "method": m}) for m in ("baft", "reft")}
        ftm_cfg = FTMConfig(**args.ftm_config)
    except (InputError, TypeError) as e:
        ap.error(f"bad config: {e}")
    seq_T = sorted(set(args.seq_T if "sequential" in settings else [])
                   | set(args.batch_K if "batch" in settings else []))   # batch compares with one-by-one
    batch_K = sorted(set(args.batch_K or [])) if "batch" in settings else []
    torch.set_num_threads(args.threads)
    out_file = args.out.open("w") if args.out else None

    def emit(row: dict[str, Any]) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out_file:
            out_file.write(line + "\n")
            out_file.flush()

    wordings_paths = [] if args.wordings == "none" else [DATA_DIR / name for name in BUILTIN] \
        if args.wordings == "builtin" else [args.data_dir / args.wordings]
    for path in wordings_paths:
        if not path.is_file():
            ap.error(f"no wordings file at {path}")
    count = max([args.n if "single" in settings else 0, *seq_T, *batch_K])
    # The records whose rephrase wordings are held out: the evaluated ones, or --held-out-records
    # around them (read once; the evaluated records are a slice of them).
    first, end = args.held_out_records or (args.offset, args.offset + count)
    if args.held_out_records and not first <= args.offset < args.offset + count <= end:
        ap.error(f"--held-out-records {first}:{end} must cover the evaluated records {args.offset}:{args.offset + count}")
    held = {name: load_dataset(args.data_dir, name, first, end - first) for name in args.datasets}
    data = {name: facts[args.offset - first: args.offset - first + count] for name, facts in held.items()}
    held_out = held_out_pairs(wordings_paths, [f for facts in held.values() for _, f in facts], cfgs["baft"],
                              whole_relations=args.held_out == "strict-relations") \
        if args.held_out != "per-fact" else set()

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        ledgers = Ledgers(Path(tmp), args.model, wordings_paths, held_out, args.keep_ledgers)
        base = ledgers.base
        n_layers = len(base.layers)
        common = {"model": "SmolLM2-135M-Instruct" if base.spec == "smollm2-135m-instruct" else base.spec,
                  "model_fingerprint": base.fingerprint[:16], "offset": args.offset, "threads": args.threads,
                  "held_out_eval_prompts": True, "held_out_wordings": args.held_out, "torch": torch.__version__,
                  **({"held_out_records": "{}:{}".format(*args.held_out_records)} if args.held_out_records else {}),
                  "wordings": ledgers.wordings and {k: ledgers.wordings[k] for k in
                                                     ("source", "pairs", "added", "excluded")},
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **git_state()}
        for dataset in args.datasets:
            facts = data[dataset]
            common_ds = {**common, "data": DATASETS[dataset][0]}
            # The bare base model: its measurement is every fact's locality reference.
            base_meas, measured = {}, base_progress(dataset, "facts measured")
            for i, (fid, f) in enumerate(facts, 1):
                base_meas[fid] = measure(base.model, base.tokenizer, f)
                measured(i, len(facts))
            known = {fid for fid, f in facts if answers(base_meas[fid])}
            # Its greedy generations, made once: the reference of the BaFT/ReFT rows' free-generation metrics.
            unknown = [(fid, f) for fid, f in facts if fid not in known]
            base_gens = dict(zip([fid for fid, _ in unknown],
                                 generate_many(base.model, base.tokenizer, [f for _, f in unknown],
                                               progress=base_progress(dataset, "prompts generated")))) \
                if set(args.methods) - {"ftm"} else None
            for method in args.methods:
                gens = None if method == "ftm" else base_gens
                if method == "ftm":
                    editor = FTMEditor(base.model, base.tokenizer, ftm_cfg)
                    config = {"method": "ftm", **editor.cfg.to_dict()}
                else:
                    cfg = cfgs[method]
                    config = {**cfg.to_dict(), "layer": cfg.layer if cfg.layer is not None else default_layer(n_layers)}
                runs: dict[int, dict[str, Any]] = {}
                if "single" in settings:
                    run = Run(dataset, method, "single", None, gens)
                    if method == "ftm":
                        ftm_run(editor, run, facts[: args.n], base_meas, known, restore_each=True)
                    else:
                        ledger_single(ledgers, run, cfg, facts[: args.n], base_meas, known)
                    emit(run.row(common_ds, config))
                for T in seq_T:
                    run = Run(dataset, method, "sequential", T, gens)
                    if method == "ftm":
                        ftm_run(editor, run, facts[:T], base_meas, known, restore_each=False)
                    else:
                        ledger_sequential(ledgers, run, cfg, facts[:T], base_meas, known)
                    runs[T] = run.row(common_ds, config)
                    emit(runs[T])
                for K in batch_K:
                    run = Run(dataset, method, "batch", K, gens)
                    if method == "ftm":
                        ftm_batch(editor, run, facts[:K], base_meas, known)
                    else:
                        ledger_batch(ledgers, run, cfg, facts[:K], base_meas, known)
                    row = run.row(common_ds, config)
                    one = runs[K]
                    row["one_by_one"] = {k: one.get(k) for k in (*METRICS, *GEN_METRICS, "n_edited", "mean_seconds_per_edit")
                                         if k in one}
                    if row.get("seconds_per_fact") and one.get("mean_seconds_per_edit"):
                        row["speedup_vs_one_by_one"] = round(one["mean_seconds_per_edit"] / row["seconds_per_fact"], 2)
                    emit(row)
    if out_file:
        out_file.close()


if __name__ == "__main__":
    main()
