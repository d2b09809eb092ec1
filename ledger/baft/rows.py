"""What one training run of BaFT edits trains on: its rows, and the positions the loss reads.

Edit rows (one set per fact): the prompt, the fact's rephrase prompts (when
`train_on_rephrases`), the relation's other wordings filled with the subject, and the prompt
behind short fixed prefixes (generalisation, as ROME does), each followed by the new target.

Unrelated rows, shared by the facts: the facts' own locality prompts continued by the parent
(when `train_on_locality`), the relation template filled with generic subjects (hard
negatives) and, for a subject that is a description, with other descriptions that end as it
does, near misses of the prompt (one word of the subject swapped, `subject_variants`), a few
neutral sentences, the prompts + targets of edits already active (a
retention set, so old edits survive new ones), and rows that hold a fact's own subject: the
subject in other relations, and the prompt continued after its new target.

`TrainingRows` lays them out as one right-padded batch with the masks the objective reads:
the positions of the loss, where each fact's block acts, and where its gate is pushed shut or
open. With `edit_positions="subject"` (BaFT's default) a block changes its own fact's edit
rows only at the subject's tokens, so the edit must be carried by the subject's
representation (ROME's finding); everywhere else its gate is pushed shut.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..facts import Fact, fill
from ..text import Batch, make_batch, next_token_logprobs, prompt_ids
from ..text import continue_greedily as continue_text
from .config import MAX_PREFIXES, MAX_START_WORDS, BaftConfig

# Contexts put before the prompt in training (`n_prefixes`: the first n), so the edit holds
# behind other text. New ones go at the end, so that `n_prefixes` = k keeps its meaning for
# stored edits.
PREFIXES = ("Here is a fact. ", "As everyone knows, ", "In short: ", "Note that ",
            "I read this yesterday: ", "According to the encyclopedia, ", "It is often said that ",
            "The answer to the question is simple. ")
assert len(PREFIXES) == MAX_PREFIXES
NEUTRAL = (
    "The weather today is mild with a light breeze.",
    "She opened the window and looked at the garden.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The meeting was moved to Thursday afternoon.",
    "A triangle has three sides and three angles.",
    "He bought bread, milk and eggs at the shop.",
)

# Hard negatives with no dataset at serve time: the fact's relation template filled with other,
# generic subjects and continued by the parent itself, so the KL and gate terms keep the
# parent's behaviour on the subject's neighbours in the same relation.
GENERIC_SUBJECTS = (
    "Barack Obama", "Paris", "Microsoft", "Albert Einstein", "Tokyo", "Toyota", "William Shakespeare",
    "Germany", "Google", "Lionel Messi", "London", "Nokia", "Marie Curie", "Brazil", "the BBC",
    "Pablo Picasso",
)

# Words that begin many inputs: places, peoples and languages, companies, given names. At an
# input's first position a state holds its token alone (there is nothing before it to read),
# and a gate keyed on a subject in mid-prompt can open there on a place or a name ("Amazon
# was founded by" under an edit of "The capital of Japan is"). Their states at the start of
# an input are negatives for each gate's key (`start_negatives`), never trained on.
START_WORDS = (
    "Australia", "Egypt", "Sweden", "Peru", "Norway", "Vietnam", "Turkey", "Poland",
    "Tokyo", "Chicago", "Madrid", "Sydney", "Moscow", "Dublin", "Cairo", "Boston",
    "English", "French", "Russian", "Arabic", "Korean", "Dutch", "Greek", "Irish",
    "Samsung", "Intel", "Sony", "Tesla", "Boeing", "Adobe", "Amazon", "Facebook",
    "James", "Anna", "Michael", "Maria", "David", "Emma", "Newton", "Napoleon",
    "Africa", "Europe", "Asia", "America", "Monday", "January", "Christmas", "Harvard",
)
assert len(START_WORDS) == MAX_START_WORDS


def start_words(fact: Fact, n: int) -> list[str]:
    """The first n of START_WORDS, but any that the subject holds as a word or that holds the
    subject ("Egypt" for a fact about Egypt; "Amazon" for the Amazon River)."""
    subject = (fact.subject or "").lower()
    words = set(re.findall(r"[\w']+", subject))
    return [w for w in START_WORDS[:n] if w.lower() not in words and (not subject or subject not in w.lower())]


# Heads of descriptions that many subjects share the shape of ("oldest city in the world").
# A description subject ("highest mountain in the world") ends on a word that other
# descriptions end on too, and the gate keys on that word's state; these heads before the
# subject's own tail give negatives of the same shape (`description_negatives`).
DESCRIPTION_HEADS = (
    "oldest city", "longest river", "tallest building", "deepest lake", "busiest airport",
    "largest island", "smallest country", "most spoken language", "hottest desert",
    "brightest star", "oldest university", "biggest stadium", "longest bridge", "coldest place",
    "most popular sport", "fastest bird",
)
# A description: two or more lower-case words, then a preposition and the rest (the tail).
_DESCRIPTION = re.compile(r"^([a-z][a-z'-]* [a-z][a-z' -]*?) ((?:in|on|of|at|from) .+)$")


def description_negatives(fact: Fact, n: int, rng: random.Random) -> list[str]:
    """Up to n prompts of the fact's relation about other descriptions with the subject's
    tail: "The longest river in the world is" for "The highest mountain in the world is".
    Heads whose noun is the subject's own ("largest island" for "biggest island on Earth")
    are left out: they may name the same thing. [] for a subject that is no description
    (names, and descriptions with a one-word head such as "canton of Bern")."""
    relation = fact.relation
    match = _DESCRIPTION.match(fact.subject or "")
    if n <= 0 or match is None or relation is None or relation.count("{}") != 1:
        return []
    head, tail = match.groups()
    noun = head.split()[-1]
    heads = [h for h in DESCRIPTION_HEADS if h.split()[-1] != noun]
    picked = heads if len(heads) <= n else rng.sample(heads, n)
    return [fill(relation, f"{h} {tail}") for h in picked]


def subject_positions(tok, prompt: str, subject: str | None) -> list[int]:
    """Token positions of the subject's last occurrence in the prompt (as `prompt_ids`
    tokenises it); [] when there is no subject or it does not occur."""
    if not subject:
        return []
    start = prompt.rfind(subject)
    if start < 0:
        start = prompt.lower().rfind(subject.lower())
    if start < 0:
        return []
    end = start + len(subject)
    enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
    if list(enc["input_ids"]) != prompt_ids(tok, prompt):
        return []
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]


FUNCTION_WORDS = frozenset("a an the of in on at to for by from with and or but not no is are was were be "
                           "as into onto over under this that these those its his her their our my your".split())
# How byte-level BPE (SmolLM2) and SentencePiece (Gemma) mark a token that starts a word.
WORD_START = ("\u0120", "\u2581")


@torch.no_grad()
def subject_variants(model, tok, fact: Fact, n: int, per_word: int = 3) -> list[str]:
    """Up to n near misses of the fact's prompt: one word of the subject swapped for one of its
    nearest words in the model's input embeddings ("The smallest planet in the solar system is"
    for "The largest planet in the solar system is", "The founder of IBM is" for "The founder
    of Microsoft is"). A gate keys on states such prompts nearly share; as negatives they
    teach it the rest of the subject. Case and plural forms of the word, and swaps after which
    the parent answers the prompt as before ("The biggest planet ..."), are left out: they
    name the same thing. Each word of the subject gets its nearest swap before any gets its
    second."""
    if n <= 0:
        return []
    ids = prompt_ids(tok, fact.prompt)
    pos = set(subject_positions(tok, fact.prompt, fact.subject))
    pieces = tok.convert_ids_to_tokens(ids)

    def word(piece: str) -> str | None:
        """The word a token is, where it is a whole content word starting with its space."""
        w = piece[1:] if piece[:1] in WORD_START else ""
        return w if len(w) > 1 and w.isalpha() and w.lower() not in FUNCTION_WORDS else None

    def stem(w: str) -> str:
        w = w.lower()
        return w[:-2] if w.endswith("es") else w[:-1] if w.endswith("s") else w

    # Whole words only: a swapped piece of a word ("The Monk Lisa") is no name anyone writes.
    swappable = [j for j in sorted(pos) if word(pieces[j]) is not None
                 and not (j + 1 in pos and pieces[j + 1][:1] not in WORD_START)]
    if not swappable:
        return []
    emb = model.get_input_embeddings().weight.float()
    # Ranked by cosine to one word at a time, without a normalised copy of the whole matrix
    # (the word's own norm ranks nothing).
    norms = emb.norm(dim=-1).clamp_min(1e-8)
    by_word: list[list[str]] = []
    for j in swappable:
        own = word(pieces[j])
        swaps = []
        for t in ((emb @ emb[ids[j]]) / norms).topk(16 * per_word).indices.tolist():
            w = word(tok.convert_ids_to_tokens(t))
            if w is not None and not stem(w).startswith(stem(own)) and not stem(own).startswith(stem(w)):
                swaps.append(t)
                if len(swaps) == per_word:
                    break
        by_word.append([tok.decode(ids[:j] + [t] + ids[j + 1:], skip_special_tokens=True) for t in swaps])
    pool = list(dict.fromkeys(v[rank] for rank in range(per_word) for v in by_word if rank < len(v)))
    if not pool:
        return []
    answers = next_token_logprobs(model, tok, [fact.prompt, *pool]).argmax(-1).tolist()
    return [v for v, a in zip(pool, answers[1:]) if a != answers[0]][:n]


@dataclass
class RowTexts:
    """The rows as text: edit rows first (prompt, target), then unrelated rows (text, None)."""
    pairs: list[tuple[str, str | None]]
    owner: list[int]                        # fact index of an edit row, -1 for an unrelated row
    subject_pos: list[list[int]]            # per edit row
    given: list[bool]                       # per edit row: the fact's prompt or one of its rephrases
    # Unrelated rows that hold a fact's own subject (other relations of the subject, the
    # prompt continued after its new target), by index among the unrelated rows: (the
    # subject's positions, the first position the KL reads). Their subject's states are no
    # negatives for the gate's key, and the stop rule does not wait for them (the gate is open
    # there by design).
    subject_rows: dict[int, tuple[list[int], int]] = field(default_factory=dict)
    # The fact's own locality prompts continued by the parent, by index among the unrelated
    # rows: the first position of the continuation. From there on the stop rule waits for
    # the parent's greedy choice to lead (BaftConfig.stop_locality_margin).
    guarded_rows: dict[int, int] = field(default_factory=dict)


def build_rows(model, tok, facts: list[Fact], cfg: BaftConfig, retention: list[tuple[str, str]],
               rng: random.Random, extra: list[list[str]], others: list[list[str]],
               after: list[list[str]] | None = None,
               continue_greedily: Callable[..., list[str]] | None = None) -> RowTexts:
    """The rows of one training run. extra: per fact, other wordings of its relation filled
    with the subject (edit rows); others: per fact, prompts of its subject in other relations
    (unrelated rows, continued by the parent); after: per fact, more wordings to continue after
    the new target (after-target rows). continue_greedily(prompts, max_new_tokens, keep=...):
    the parent's greedy continuations, keep saying which rows recur (the generic negatives)
    (default: generated here; baserows.py reuses the base's)."""
    if continue_greedily is None:
        def continue_greedily(prompts, max_new_tokens, keep=True):
            return continue_text(model, tok, prompts, max_new_tokens)
    pairs: list[tuple[str, str | None]] = []
    owner: list[int] = []
    given_rows: list[bool] = []
    for k, fact in enumerate(facts):
        given = [fact.prompt, *(fact.rephrase_prompts if cfg.train_on_rephrases else [])]
        added = extra[k] + [pre + fact.prompt for pre in PREFIXES[: cfg.n_prefixes]]  # wordings.py's, prefixed
        prompts = given + added
        given_rows += [True] * len(given) + [False] * len(added)
        pairs += [(p, fact.target_new) for p in prompts]
        owner += [k] * len(prompts)
    subject_pos = [subject_positions(tok, p, facts[k].subject) for (p, _), k in zip(pairs, owner)]

    texts: list[str] = []
    own_subjects = {(f.subject or "").lower() for f in facts}
    # The configured number of generic negatives per fact, in a batch too: the other facts'
    # rows are no KL rows for a block (it does not act there) and, with a kept gate, their
    # gate terms train nothing, so they are no substitute (with 2 per fact, a batch of 100
    # reached locality 0.939 against 0.985 one by one).
    per_fact = cfg.neg_subjects
    loc_prompts, neg_prompts = [], []
    for fact in facts:
        if cfg.train_on_locality:
            loc_prompts += [lp.prompt for lp in fact.locality_prompts]
        relation = fact.relation
        if per_fact and relation and relation.count("{}") == 1:
            pool = [x for x in GENERIC_SUBJECTS if x.lower() not in own_subjects]
            picked = pool if len(pool) <= per_fact else rng.sample(pool, per_fact)
            neg_prompts += [fill(relation, x) for x in picked]
            words = (fact.subject or "").split()
            if cfg.near_miss_negatives and len(words) > 1:
                neg_prompts += [fill(relation, w) for w in dict.fromkeys(words) if len(w) > 2]
        neg_prompts += description_negatives(fact, cfg.description_negatives, rng)
    variants = [v for fact in facts for v in subject_variants(model, tok, fact, cfg.subject_variants)]
    if len(facts) > 1:      # facts of one relation in a batch draw the same negatives
        neg_prompts = list(dict.fromkeys(neg_prompts))
    # A locality prompt continued by the parent's OWN greedy continuation: the KL then
    # protects what the model actually goes on to say there, not just the next token.
    guarded_rows = {len(texts) + i: len(prompt_ids(tok, p)) - 1 for i, p in enumerate(loc_prompts)}
    texts += continue_greedily(loc_prompts + neg_prompts + variants,
                               [cfg.continuation_tokens] * len(loc_prompts)
                               + [cfg.neg_continuation_tokens] * (len(neg_prompts) + len(variants)),
                               keep=[False] * len(loc_prompts) + [True] * len(neg_prompts) + [False] * len(variants))
    texts += list(NEUTRAL)
    n = cfg.retention_samples * max(1, min(len(facts), 4))
    keep = pick_retention(tok, facts, retention, n, rng)
    texts += [p + " " + t.strip() for p, t in keep]
    # The subject in other relations, continued by the parent: the edit changes one relation
    # of its subject, not every prompt that names it.
    subject_rows: dict[int, tuple[list[int], int]] = {}
    own = [(k, p) for k, ps in enumerate(others) for p in ps]
    for (k, p), text in zip(own, continue_greedily([p for _, p in own], cfg.neg_continuation_tokens, keep=False)):
        subject_rows[len(texts)] = (subject_positions(tok, text, facts[k].subject), 0)
        texts.append(text)
    # The prompt (and up to after_target_wordings of its other wordings) with its new target,
    # continued by the parent: after the new answer the edited model should go on as the
    # parent does after it, not say the answer again.
    if cfg.after_target_tokens:
        said = []
        for k, fact in enumerate(facts):
            wordings = [fact.prompt] + extra[k][: cfg.after_target_wordings]
            wordings += [w for w in (after[k] if after else []) if w not in wordings]
            said += [(k, w + " " + fact.target_new.strip()) for w in wordings]
        continued = continue_greedily([s for _, s in said], cfg.after_target_tokens, keep=False)
        for (k, s), text in zip(said, continued):
            start = len(prompt_ids(tok, s)) - 1     # the position predicting what follows the target
            subject_rows[len(texts)] = (subject_positions(tok, text, facts[k].subject), start)
            texts.append(text)
    pairs += [(t, None) for t in texts]
    owner += [-1] * len(texts)
    return RowTexts(pairs, owner, subject_pos, given_rows, subject_rows, guarded_rows)


def pick_retention(tok, facts: list[Fact], retention: list[tuple[str, str]], n: int,
                   rng: random.Random) -> list[tuple[str, str]]:
    """At most n of the active edits' (prompt, target) pairs, as retention rows.

    All of them when they fit. Past n, half the places go to the prompts that share tokens
    with the new subjects, rarest shared tokens first: a new gate keys on its subject's
    states, and where it opens on an earlier edit it is on a shared token (" II" of "Largo
    Winch II" on "John Paul II", docs/design.md). The other half is a random sample, for the
    earlier prompts that no token links to the new ones.
    """
    if len(retention) <= n:
        return list(retention)
    subject_ids = set()
    for fact in facts:
        if fact.subject:
            for text in (fact.subject, " " + fact.subject):
                subject_ids.update(tok(text, add_special_tokens=False)["input_ids"])
    shared = [set(tok(p, add_special_tokens=False)["input_ids"]) & subject_ids for p, _ in retention]
    df = Counter(t for ids in shared for t in ids)     # how many earlier prompts hold each token
    score = [sum(1.0 / df[t] for t in ids) for ids in shared]
    order = list(range(len(retention)))
    rng.shuffle(order)                              # ties in a random order
    linked = sorted((i for i in order if score[i] > 0), key=lambda i: -score[i])[: n // 2]
    chosen = set(linked)
    rest = [i for i in order if i not in chosen]
    picked = linked + rest[: n - len(linked)]
    return [retention[i] for i in sorted(picked)]


class TrainingRows:
    """The rows of one training run as one right-padded batch, and the masks over it that the
    objective reads. Fixed for the run.

    The loss reads, row-major: the edit rows' target positions (CE), then every real position
    of the unrelated rows (KL; in a subject row from its first read position on), each
    unrelated ROW weighing the same, so a long neutral sentence does not drown the one
    position where a neighbour's answer is decided; a fact's own locality prompt weighs
    cfg.locality_row_weight rows.
    """

    def __init__(self, tok, texts: RowTexts, cfg: BaftConfig, n_facts: int, device: torch.device):
        batch = make_batch(tok, texts.pairs, device=device)
        self.batch: Batch = batch
        self.row_owner = owner = torch.tensor(texts.owner, device=device)
        self.n_edit = n_edit = int((owner >= 0).sum())
        self.n_unrelated = len(texts.pairs) - n_edit
        real = batch.attention_mask.bool()
        # (B, T): the positions the loss reads.
        self.read = torch.zeros_like(real)
        self.read[:n_edit] = batch.target_mask[:n_edit]
        self.read[n_edit:] = real[n_edit:]
        # Positions whose states are negatives for the gates' keys: every unrelated position
        # but a fact's own subject in the subject rows.
        self.key_neg = real.clone()
        self.key_neg[:n_edit] = False
        # Per unrelated row: whether the stop rule waits for its KL.
        self.stop_row = torch.ones(self.n_unrelated, dtype=torch.bool, device=device)
        for i, (pos, start) in texts.subject_rows.items():
            self.read[n_edit + i, :start] = False
            self.key_neg[n_edit + i, pos] = False
            self.stop_row[i] = False
        # Positions where the stop rule waits for the parent's greedy choice to lead: the
        # continuations of the fact's own locality prompts.
        guard = torch.zeros_like(real)
        for i, start in texts.guarded_rows.items():
            guard[n_edit + i, start:] = real[n_edit + i, start:]
        # The target tokens, in read order: their ids, their rows and the fact each belongs to.
        self.tgt_row = torch.arange(n_edit, device=device)[:, None].expand(n_edit, real.shape[1])[batch.target_mask[:n_edit]]
        self.tgt_owner = owner[self.tgt_row]
        self.tgt_given = torch.tensor(texts.given, dtype=torch.bool, device=device)[self.tgt_row]
        self.target_ids = batch.next_ids[:n_edit][batch.target_mask[:n_edit]]
        self.n_tgt = len(self.target_ids)
        # The unrelated read positions, in read order: their weight in the KL and their row.
        unrel = self.read[n_edit:]
        row_len = unrel.sum(1, keepdim=True).float()
        self.pos_weight = (1.0 / row_len).expand_as(unrel)[unrel] / max(1, self.n_unrelated)
        self.row_of_pos = torch.arange(self.n_unrelated, device=device)[:, None].expand_as(unrel)[unrel]
        self.read_row = self.read.nonzero()[:, 0]       # the row of each read position
        self.guard_pos = guard[n_edit:][unrel]          # per unrelated read position
        # The KL's weight per position: a guarded row (the user's own neighbour) weighs
        # cfg.locality_row_weight rows.
        guarded_row = guard[n_edit:].any(1)[self.row_of_pos]
        self.kl_weight = torch.where(guarded_row, self.pos_weight * cfg.locality_row_weight, self.pos_weight)

        # Per fact: where its block acts while training (its output is multiplied by this
        # mask), and where its gate is pushed shut / open.
        subject_mode = cfg.method == "baft" and cfg.edit_positions == "subject"
        self.apply_masks: list[torch.Tensor] = []       # (B, T, 1) float
        self.close_masks: list[torch.Tensor] = []       # (B, T) bool
        self.open_masks: list[torch.Tensor] = []        # (B, T) bool
        for k in range(n_facts):
            apply = real.clone()
            close = torch.zeros_like(real)
            close[n_edit:] = self.key_neg[n_edit:]
            opened = torch.zeros_like(real)
            for i in range(n_edit):
                if texts.owner[i] != k:
                    if cfg.method == "baft":
                        apply[i] = False             # another fact's row: not this block's job
                        close[i] = real[i]
                    continue
                pos = texts.subject_pos[i]
                if pos:
                    opened[i, pos[-1]] = True
                if subject_mode and pos:
                    apply[i] = False
                    apply[i, pos] = True
                    if cfg.gate_close_edit_rest:
                        close[i] = real[i]
                        close[i, pos] = False
            self.apply_masks.append(apply[..., None].float())
            self.close_masks.append(close)
            self.open_masks.append(opened)
        self.subject_found = sum(1 for i in range(n_edit) if texts.subject_pos[i]) / max(1, n_edit)

    def keep_pos(self, rows: torch.Tensor) -> torch.Tensor:
        """Among all read positions, those of these rows."""
        keep = torch.zeros(self.batch.input_ids.shape[0], dtype=torch.bool, device=self.read.device)
        keep[rows] = True
        return keep[self.read_row]
