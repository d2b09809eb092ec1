"""Relation wordings: the other ways a relation is put into words, learned from a file once
and used by every later `ledger add`.

A fact states its relation in one wording ("{} professionally plays the sport"). An edit
trained on that wording alone rarely carries over to another ("{}'s greatest weakness is"):
on counterfact-val, holding the edit's gate fully open on the held-out rephrases leaves
generalisation where it is (0.40 against 0.425), so what is missing is the value, not the
gate (docs/design.md). Trained on a few other wordings of the same relation, the
edit answers wordings it never saw. The ledger keeps a table of (relation, wording) pairs,
both templates with "{}" for the subject, imported from any fact file whose records carry
rephrases (CounterFact's train split, ROME's paraphrase_prompts, a user's own file) or from
records of the form {"relation": "...", "wordings": ["...", ...]}.

Every new ledger starts with the tables that ship in `ledger/data` (BUILTIN): the relation
templates of CounterFact's train split and a hand-written catalogue of everyday relations.
A fact whose relation is not in the table borrows the wordings of the relation whose
templates share most content words with its own (`nearest`), so "{} was painted by" finds
the catalogue's painters without the user importing anything.

Here: parsing wordings out of files, choosing the prompts an edit trains on, and the
`ledger wordings` commands (`import_file`, `listing`); the table's SQL is in
store/wordings.py. The trainer only ever sees prompts.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Connection

from .baft.config import MAX_REWRITES
from .errors import InputError
from .facts import (Fact, check_length_and_nul, detect_format, fact_from_record, fill, read_text,
                    records_of_text, to_native)
from .handle import Handle
from .store import audit, blobs
from .store import wordings as table
from .store.engine import write_transaction

# The tables a new ledger starts with (`ledger init`, unless --no-wordings), in ledger/data:
# relation templates of CounterFact's train split (scripts/build_wordings.py; MIT licence) and
# a hand-written catalogue of everyday relations (authors, painters, founders, symbols, ...).
DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = ("wordings-counterfact.json", "relations.json")

# Templates are short; the cap keeps the (relation, wording) unique index within PostgreSQL's
# B-tree entry limit.
MAX_TEMPLATE_CHARS = 500
# The end of a sentence before the subject (also behind a closing quote or bracket), or a line
# break: CounterFact's rephrases put unrelated text in front ("One Minute Stories, ... Noise
# Unit, that originated in"), which is context, not wording.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+|\n+")

# Relation-agnostic rewrites of a fact's prompt ({P}; {Q}: the prompt as a question; {S}: its
# subject): question and instruction frames around the prompt, and the subject named before
# it. They work for any prompt and need no table, so a fact whose relation the table lacks,
# or has few wordings of, still trains on more than its prompt and its fixed prefixes (the
# answer after "A:", the subject inside a question). New ones go at the end, so that
# `rewrites` = k keeps its meaning for stored edits.
REWRITES = ("Q: {Q} A:", "Complete the sentence. {P}", "Here is what I know about {S}. {P}",
            "Q: What do you know about {S}? A: {P}", "Fill in the blank: {P} ___. A:",
            "Everyone who has heard of {S} knows this: {P}", "{S}: {P}", "Q: Finish this sentence: {P} A:")
assert len(REWRITES) == MAX_REWRITES


@dataclass(frozen=True)
class ImportResult:
    source: str
    records: int            # records read
    pairs: int              # distinct (relation, wording) pairs in the file
    added: int              # new to the ledger
    excluded: int           # left out on request
    skipped: int            # records that gave nothing
    skipped_examples: list[str]   # the first few, and why

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "records": self.records, "pairs": self.pairs, "added": self.added,
                "excluded": self.excluded, "skipped": self.skipped, "skipped_examples": self.skipped_examples}


def template_of(prompt: str, subject: str | None) -> str | None:
    """The prompt with its one occurrence of the subject replaced by "{}", and any sentences
    before the subject's own dropped; None when the subject does not occur exactly once."""
    if not subject or prompt.count(subject) != 1 or "{}" in prompt:
        return None
    start = prompt.index(subject)
    ends = list(_SENTENCE_END.finditer(prompt, 0, start))
    head = prompt[ends[-1].end(): start] if ends else prompt[:start]
    return (head + "{}" + prompt[start + len(subject):]).strip()


# How a prompt writes its subject: with a determiner right before it ("The Mona Lisa was
# painted by", "A thermometer is used to measure the") and a plural verb right after it ("The
# Harry Potter books were written by"). The table's wordings are written for a bare singular
# subject ("{} was painted by"); filled as they are, they would train an edit on text nobody
# types ("Mona Lisa was painted by", "Harry Potter books was written by").
_DETERMINER_BEFORE = re.compile(r"(?i)(?<![\w'])(the|a|an)\s+\{\}")
_ANY_DETERMINER_BEFORE = re.compile(
    r"(?i)(?<![\w'])(the|a|an|this|that|these|those|his|her|its|their|my|your|our)\s+\{\}")
_PLURAL_VERB_AFTER = re.compile(r"\{\}\s+(?:were|are|have)\b")
_SINGULAR_VERB_AFTER = re.compile(r"\{\}(\s+)(was|is|has)\b")
_PLURAL_OF = {"was": "were", "is": "are", "has": "have"}
# A slot in apposition to a noun that has the determiner already ("The book {} was written
# by", "the painting {}"), where a second one would be wrong: a determiner, one or two words,
# then the slot, the last word no preposition.
_APPOSITION = re.compile(r"(?i)(?<![\w'])(the|a|an)(\s+[\w-]+){1,2}\s+\{\}")
_PREPOSITIONS = frozenset("of for by in on at to from with about behind into onto as than like".split())
# Where a word starts a sentence: at the start, after a sentence's end, a colon or a line break.
_STARTS_SENTENCE = re.compile(r"(?:^|[.!?:][\"'\u201d\u2019)\]]*\s+|\n)$")
_TRAILING_DETERMINER = re.compile(r"(?i)(?<![\w'])(the|a|an)\s+$")


def _leads(template: str) -> bool:
    """Whether "{}" (behind a determiner or not) starts its sentence: then the verb after it
    is the subject's, which agrees with it ("The {} were written by", not "The author of {}
    is")."""
    before = _TRAILING_DETERMINER.sub("", template[: template.index("{}")])
    return bool(_STARTS_SENTENCE.search(before) or before.endswith(", "))


@dataclass(frozen=True)
class SubjectForm:
    """The determiner ("the", "a", "an" or "") and the verb number a fact's prompt gives its
    subject, applied to the wordings it trains on."""
    determiner: str = ""
    plural: bool = False

    @classmethod
    def of(cls, fact: Fact) -> "SubjectForm":
        t = template_of(fact.prompt, fact.subject)
        if t is None:
            return cls()
        m = _DETERMINER_BEFORE.search(t)
        return cls(m.group(1).lower() if m else "", _leads(t) and bool(_PLURAL_VERB_AFTER.search(t)))

    def _determiner_after(self, before: str) -> str:
        """The determiner and its space as written after the text `before` (capitalised where
        it starts a sentence); "" for none."""
        if not self.determiner:
            return ""
        return (self.determiner.capitalize() if _STARTS_SENTENCE.search(before) else self.determiner) + " "

    def subject_after(self, before: str, subject: str) -> str:
        """The subject as written after the text `before`, with its determiner."""
        return self._determiner_after(before) + subject

    @staticmethod
    def _in_apposition(t: str) -> bool:
        m = _APPOSITION.search(t)
        return bool(m) and m.group(2).split()[-1].lower() not in _PREPOSITIONS

    def template(self, wording: str) -> str:
        """The wording with the subject's determiner before "{}" (unless one is there, or "{}"
        names a noun before it: "The book {}"), and for a plural subject its possessive and,
        where it starts its clause, the be/have right after it made plural."""
        t = wording
        if self.plural:
            t = t.replace("{}'s", "{}'", 1)      # "the Harry Potter books' author"
            if _leads(t):
                t = _SINGULAR_VERB_AFTER.sub(lambda m: "{}" + m.group(1) + _PLURAL_OF[m.group(2)], t, count=1)
        if self.determiner and not _ANY_DETERMINER_BEFORE.search(t) and not self._in_apposition(t):
            i = t.index("{}")
            t = t[:i] + self._determiner_after(t[:i]) + t[i:]
        return t


def _check_template(t: Any, where: str) -> str:
    if not isinstance(t, str) or not t.strip():
        raise InputError(f"{where}: a wording must be a non-empty string")
    t = t.strip()
    if t.count("{}") != 1:
        raise InputError(f"{where}: a wording needs exactly one '{{}}' for the subject: {t!r}")
    return check_length_and_nul(t, "a wording", where, MAX_TEMPLATE_CHARS)


def pairs_of_fact(fact: Fact) -> list[tuple[str, str]]:
    """(relation, wording) for each rephrase of the fact that has the subject once."""
    relation = template_of(fact.prompt, fact.subject)
    if relation is None or len(relation) > MAX_TEMPLATE_CHARS:
        return []
    out = []
    for p in fact.rephrase_prompts:
        w = template_of(p, fact.subject)
        if w is not None and w != relation and len(w) <= MAX_TEMPLATE_CHARS:
            out.append((relation, w))
    return out


def pairs_of_records(records: list[Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """The distinct (relation, wording) pairs of a file's records, in file order, and the
    records that gave none. A malformed wordings record refuses the file; a fact record that
    does not validate, or whose subject is missing from its prompts, only gives nothing."""
    seen: dict[tuple[str, str], None] = {}
    skipped: list[str] = []
    for i, rec in enumerate(records):
        where = f"record {i}"
        if isinstance(rec, dict) and "wordings" in rec:
            relation = _check_template(rec.get("relation"), f"{where} relation")
            ws = rec["wordings"]
            if not isinstance(ws, list) or not ws:
                raise InputError(f"{where}: 'wordings' must be a non-empty list of templates")
            for j, w in enumerate(ws):
                w = _check_template(w, f"{where} wordings[{j}]")
                if w != relation:
                    seen.setdefault((relation, w), None)
            continue
        try:
            fact = fact_from_record(to_native(rec, detect_format(rec), i), i)
        except InputError as e:
            skipped.append(str(e))
            continue
        got = pairs_of_fact(fact)
        if not got:
            skipped.append(f"{where}: no rephrase with the subject in it")
        for p in got:
            seen.setdefault(p, None)
    return list(seen), skipped


def read_pairs(path: str | Path) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(pairs, number of records, skipped records) of a wordings or fact file."""
    records = records_of_text(read_text(path, "wordings file"), "wordings file")
    pairs, skipped = pairs_of_records(records)
    if not pairs:
        raise InputError(f"{path}: no wordings found (records need a subject and rephrases that contain it, "
                         "or the form {\"relation\": ..., \"wordings\": [...]})")
    return pairs, len(records), skipped


# --- the table ---------------------------------------------------------------------------------

def related(conn: Connection, relation: str, wordings: list[str], min_shared: int) -> list[str]:
    """The wordings of the relations that share at least `min_shared` wordings with this one
    (its own left out), those sharing most first, each relation's in import order.

    One relation often has several prompt templates ("{} is located in", "{}, in"), each with
    its own rows here; their sets of wordings overlap because they word the same thing. On
    counterfact-train, 3 shared wordings link templates of one relation and rarely two
    relations (docs/design.md)."""
    if min_shared <= 0 or len(wordings) < min_shared:
        return []
    lenders = table.sharing(conn, relation, wordings, min_shared)
    if not lenders:
        return []
    lent = table.of_relations(conn, lenders)
    own = set(wordings) | {relation}
    out: dict[str, None] = {}
    for r in lenders:
        for w in lent[r]:
            if w not in own:
                out.setdefault(w, None)
    return list(out)


# Words that say nothing about which relation a template states.
_STOPWORDS = frozenset(
    "a an the of is was were are be been being by in on at to for and or who whom whose what which that "
    "this these those it its it's his her their they them he she as from with has have had do does did "
    "there here than then so also q answer".split())
_WORDS = re.compile(r"[a-z]+")


def content_words(template: str) -> frozenset[str]:
    """The words of a template that name its relation: lower-cased, the subject slot, one-letter
    words ("'s") and function words left out."""
    return frozenset(w for w in _WORDS.findall(template.replace("{}", " ").lower())
                     if len(w) > 1 and w not in _STOPWORDS)


# A template borrows a relation's wordings when it shares at least this share of their
# content words (Jaccard) with one of that relation's templates.
NEAREST_MIN_OVERLAP = 0.5


def nearest(conn: Connection, template: str, min_overlap: float = NEAREST_MIN_OVERLAP) -> list[str]:
    """The templates of the relation in the table closest to `template` (its key and its
    wordings, `template` itself left out): the relation one of whose templates has the highest
    Jaccard overlap of content words with it, at least `min_overlap`; among equals, the one
    with most wordings. [] when none is that close, or the template has no content words.

    A hand-written prompt ("The painter of {} is") is rarely a key of the table, but often
    one of a catalogued relation's wordings, or close to one."""
    mine = content_words(template)
    if not mine:
        return []
    groups: dict[str, list[str]] = {}
    for r, w in table.all_pairs(conn):
        groups.setdefault(r, [r]).append(w)
    best, best_key = None, (-1.0, 0)
    for r, ts in groups.items():
        if r == template:       # its own wordings are the caller's already
            continue
        overlap = max((len(mine & cw) / len(mine | cw) for cw in map(content_words, ts) if cw), default=0.0)
        if overlap >= min_overlap and (overlap, len(ts)) > best_key:
            best, best_key = r, (overlap, len(ts))
    return [t for t in groups[best] if t != template] if best is not None else []


@lru_cache(maxsize=1)
def catalogue() -> tuple[tuple[str, frozenset[str]], ...]:
    """The catalogue's relations (ledger/data/relations.json): each key with the content
    words of all its templates."""
    groups: dict[str, set[str]] = {}
    for r, w in read_pairs(DATA_DIR / "relations.json")[0]:
        groups.setdefault(r, set(content_words(r))).update(content_words(w))
    return tuple((r, frozenset(ws)) for r, ws in groups.items())


def other_relations(fact: Fact, wordings: list[str], n: int, seed: int, *, before: int = 0,
                    after: int = 0) -> list[str]:
    """Up to n prompts that put the fact's subject into OTHER relations of the catalogue ("The
    capital of Russia is" for a fact about Russia's currency), and first up to `before` more
    among the relations whose words come before the subject: what an edit must leave alone
    although its gate is open there. A relation sharing a content word with the fact's
    relation or with any wording it trains on is left out, so no paraphrase of the edited
    relation is taken for another one, nor any of the fact's locality prompts. A fixed sample
    per (fact, seed).

    Where the relation's words come first, the subject's state already holds them, so the
    value can learn to leave that relation alone there and still change the edited one; a
    prompt that names the subject first and asks another question after it ("Russia, whose
    capital is") reads a state that holds no relation yet. `before` applies only to a fact
    whose own prompt has words before the subject ("The currency of Russia is", not "Russia
    pays with"): an edit trained on the bare subject's state has to reach paraphrases with
    words before it ("The money of Russia is"), and rows that shut it wherever such words
    come first stop that. `after` is its counterpart for a fact whose prompt names the subject
    first: up to `after` among the relations that name it first too ("Russia is located in")."""
    relation = template_of(fact.prompt, fact.subject)
    if relation is None:
        return []
    # Rows of the fact's own kind only: words before the subject, or the subject first.
    ahead = words_before(relation)
    take = before if ahead else after
    if n <= 0 and take <= 0:
        return []
    filled = _other_relations_filled(fact, relation, wordings)
    pool = [p for _, p in filled]
    first = [p for t, p in filled if words_before(t) == ahead]
    # Each sample draws from its own generator of the same seed, so an edit stored without
    # `before` or `after` gets the sample it was trained on.
    seeded = f"{seed}:other:{fact.subject}:{fact.prompt}"
    first = first if len(first) <= take else random.Random(seeded).sample(first, take)
    if n <= 0:
        return first
    rest = pool if len(pool) <= n else random.Random(seeded).sample(pool, n)
    return first + [p for p in rest if p not in first]


def relation_negatives(fact: Fact, wordings: list[str], n: int, seed: int) -> list[str]:
    """Up to n prompts that put the fact's subject into other relations of the catalogue,
    whose states there set the ramp of the gate's key (BaftConfig.relation_negatives):
    relations whose words come before the subject ("The capital of Kenya is"), and, for a fact
    whose prompt names the subject first, relations that name it first too ("Kenya is a city
    in"). The same relations as other_relations may draw from. A fixed sample per (fact, seed).

    Where words come before the subject, its state holds them, and the gate can tell the
    edited relation from another there. A relation that names the subject first gives the
    bare subject's state, which a fact whose prompt has words before the subject reaches only
    through its paraphrases that name the subject first ("Spain's capital city is"): those
    are left out for such a fact."""
    relation = template_of(fact.prompt, fact.subject)
    if n <= 0 or relation is None:
        return []
    ahead = words_before(relation)
    pool = [p for t, p in _other_relations_filled(fact, relation, wordings) if words_before(t) or not ahead]
    return pool if len(pool) <= n else random.Random(f"{seed}:negatives:{fact.subject}:{fact.prompt}").sample(pool, n)


def _other_relations_filled(fact: Fact, relation: str, wordings: list[str]) -> list[tuple[str, str]]:
    """(template, prompt) of every catalogued relation other than the fact's (`relation`, its
    prompt's template), written as the fact writes its subject and filled with it. A relation
    sharing a content word with the fact's relation or with any wording it trains on is left
    out, so no paraphrase of the edited relation is taken for another one, and so is any of
    the fact's locality prompts (trained on as such, or held out for evaluation)."""
    mine = content_words(relation).union(*(content_words(w) for w in wordings))
    own = {lp.prompt.strip().lower() for lp in fact.locality_prompts}
    form = SubjectForm.of(fact)
    templates = [form.template(r) for r, words in catalogue() if not words & mine and r != relation]
    return [(t, p) for t in templates if (p := fill(t, fact.subject)).strip().lower() not in own]


def words_before(template: str) -> bool:
    """Whether a word other than an article comes before the subject's slot ("The capital of
    {} is": yes; "{} is located in", "The {} is": no)."""
    head = template[: template.find("{}")] if "{}" in template else ""
    return any(w not in ("the", "a", "an") for w in re.findall(r"[\w']+", head.lower()))


def builtin_pairs() -> list[tuple[str, str]]:
    """The (relation, wording) pairs of the tables that ship with the package."""
    pairs: dict[tuple[str, str], None] = {}
    for name in BUILTIN:
        for p in read_pairs(DATA_DIR / name)[0]:
            pairs.setdefault(p, None)
    return list(pairs)


def training_prompts(fact: Fact, wordings: list[str], n: int, seed: int,
                     borrowed: list[str] = ()) -> list[str]:
    """Up to n of the relation's wordings, filled with the fact's subject: a fixed sample per
    (fact, seed), so an edit retrains the same way. When the relation has fewer than n, the
    rest is drawn from `borrowed` (related relations' wordings, see `related`). The fact's own
    prompt and rephrases are left out (they are trained on, or held out, already)."""
    if n <= 0 or not fact.subject:
        return []
    skip = {fact.prompt, *fact.rephrase_prompts}
    # ... and their wordings: a rephrase behind a context sentence ("One day. {} plays") is
    # the same wording as the bare template.
    own = {w for _, w in pairs_of_fact(fact)} | {template_of(fact.prompt, fact.subject)}
    form = SubjectForm.of(fact)

    def filled(ws):
        written = (form.template(w) for w in ws)
        return [p for p in dict.fromkeys(fill(w, fact.subject) for w in written if w not in own) if p not in skip]

    rng = random.Random(f"{seed}:{fact.subject}:{fact.prompt}")
    prompts = filled(wordings)
    if len(prompts) >= n:
        return prompts if len(prompts) == n else rng.sample(prompts, n)
    extra = [p for p in filled(borrowed) if p not in set(prompts)]
    if not extra:
        return prompts
    return prompts + (extra if len(extra) <= n - len(prompts) else rng.sample(extra, n - len(prompts)))


def rewrites(fact: Fact, n: int) -> list[str]:
    """The first n of REWRITES filled with the fact's prompt and subject, leaving out any that
    is one of its rephrases (trained on, or held out, already). [] for a fact without a
    subject (an edit without one trains on no wordings)."""
    if n <= 0 or not fact.subject:
        return []
    prompt = fact.prompt.strip()
    question = prompt if prompt.endswith("?") else prompt + "?"
    form = SubjectForm.of(fact)
    filled = (r.format(P=prompt, Q=question, S=form.subject_after(r[: r.find("{S}")], fact.subject))
              for r in REWRITES[:n])
    return [p for p in filled if p not in fact.rephrase_prompts]


# --- commands ----------------------------------------------------------------------------------

def import_file(s: Handle, path: str | Path, *, exclude: Iterable[tuple[str, str]] = ()) -> ImportResult:
    """Add the (relation, wording) pairs of a wordings or fact file to the ledger's table
    (pairs it holds already are kept once). `exclude` leaves pairs out, e.g. the wordings a
    benchmark holds out. The file is read whole before anything is written."""
    pairs, n_records, skipped = read_pairs(path)
    drop = set(exclude)
    kept = [p for p in pairs if p not in drop]
    source = os.path.basename(str(path))
    with write_transaction(s.engine) as conn:
        added = table.write(conn, kept, source, blobs.now())
        audit.record(conn, s.author, "wordings", None, None, {"source": source, "pairs": len(kept), "added": added})
    return ImportResult(source=source, records=n_records, pairs=len(pairs), added=added,
                        excluded=len(pairs) - len(kept), skipped=len(skipped), skipped_examples=skipped[:5])


def listing(s: Handle, relation: str | None = None) -> dict[str, Any]:
    """With a relation (a template with "{}" for the subject, as `import_file` stores it):
    its wordings. Without: every relation and how many wordings it has."""
    with s.engine.connect() as conn:
        if relation is not None:
            return {"relation": relation, "wordings": table.of_relations(conn, [relation])[relation]}
        rows = table.summary(conn)
    return {"relations": len(rows), "wordings": sum(k for _, k in rows),
            "by_relation": [{"relation": r, "wordings": k} for r, k in rows]}
