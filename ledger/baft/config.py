"""Hyperparameters of one BaFT edit. Every field is stored with the edit it produced."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import InputError

METHODS = ("baft", "reft")
TRAIN_DTYPES = ("float32", "bfloat16")
ROTATION_INITS = ("random", "gradient")
# How many fixed contexts the trainer has to put before a prompt (rows.PREFIXES).
MAX_PREFIXES = 8
# How many relation-agnostic rewrites of a prompt there are (wordings.REWRITES).
MAX_REWRITES = 8
# How many words rows.START_WORDS holds.
MAX_START_WORDS = 48
# The most relation negatives per fact (the catalogue holds 48 relations).
MAX_RELATION_NEGATIVES = 32


@dataclass(frozen=True)
class BaftConfig:
    # "baft": per-basis input gate s(h) = sigmoid(U h + c).
    # "reft": the constant gate (LoReFT), the ablation the paper argues against. It is stored
    # as U = 0, c = REFT_GATE_BIAS, so one fused code path serves both.
    method: str = "baft"
    # Decoder block whose output (the residual stream) is edited. None: a per-model default,
    # a fixed fraction of the depth (see default_layer).
    layer: int | None = None
    rank: int = 4
    # Where R (the subspace the edit writes in) starts. "random": a random orthonormal basis.
    # "gradient": the top singular directions of the target loss's gradient at the subject's
    # positions of the fact's prompts, so the edit writes along what the model reads there.
    # On counterfact-val it moves generalisation by +0.067 on val[0:60] and -0.017 on
    # val[60:120] at equal steps (docs/design.md): noise, so not the default.
    rotation_init: str = "random"
    steps: int = 60           # upper bound; training stops early once the target is reached
    min_steps: int = 8
    lr: float = 1e-2
    # Adam's first-moment decay: 0.7, not torch's 0.9. With stop_prob 0.99 torch's
    # momentum overshoots and the target's probability swings around 0.97-0.99 for a
    # dozen steps before every row holds it; on counterfact-val it takes 27.9 steps a fact
    # against 18.3 with 0.7 (docs/design.md).
    adam_beta1: float = 0.7
    # Adam's second-moment decay (torch's 0.999). 0.9 takes 10 % fewer steps on everyday-dev
    # (the late steps wait on one target token that creeps up) for slightly less carry-over
    # to unseen wordings (docs/design.md).
    adam_beta2: float = 0.999
    # The gate's (U, c) learning rate as a multiple of lr. 0 (the default): the gate stays as
    # gate_key_init set it, a match on the subject's key, and training moves W and b only.
    # A trained gate overfits the few negatives it sees: on val[0:10] it opens on 17 % of
    # foreign tokens (0.15 % frozen), and 30 edits in a row reach locality 0.67 (1.0 frozen);
    # docs/design.md.
    gate_lr_scale: float = 0.0
    # Loss = CE(target) + locality_weight * KL(parent || edited on unrelated inputs)
    #        + gate_weight * mean gate on unrelated inputs.
    locality_weight: float = 4.0
    gate_weight: float = 1.0
    # The gate starts half open (sigmoid(0)); a closed start would starve U of gradient.
    gate_bias_init: float = 0.0
    # + gate_open_weight * -log gate at the subject's last token of the edit rows (BaFT).
    gate_open_weight: float = 0.1
    # "subject": while training, a BaFT block changes its fact's prompts only at the subject's
    # tokens, so the edit rides on the subject's representation and the gate learns to fire
    # on the subject, not on the relation's wording, which neighbours share. "all": every
    # position. (ReFT always uses "all": its gate cannot tell positions apart.)
    edit_positions: str = "subject"
    # With "subject": the gate term also covers the edit rows' other positions.
    gate_close_edit_rest: bool = True
    # How the gate term pools where the edit must not fire: "mean" over every position, or
    # "max": each row's most open gate, averaged over rows (a gate open on one token of a
    # neighbour's subject then costs as much as a row of open gates).
    gate_close_pool: str = "mean"
    # Start the gate as a match on the subject's key (BaFT): U along (key - mean of the
    # unrelated rows' states), c set so the gate is ~0.95 at the key and ~0.05 at the closest
    # negative. Without it the gate learns "a subject is here" and fires on neighbours'
    # subjects too (docs/design.md: locality 0.70 -> 0.95 on val[0:20]).
    gate_key_init: bool = True
    # How the key's direction is found: the difference of the key and the unrelated states'
    # mean; where that leaves the key within objective.KEY_MARGIN of the closest unrelated state
    # and this is below 1, Fisher's discriminant instead, its scatter shrunk by this much
    # towards the identity (EditProblem._init_gates). A subject that begins the prompt otherwise
    # keys on what the start of every input shares, and its gate opens there on every input.
    gate_key_shrinkage: float = 0.3
    # Gate floor f: the weight used is max(0, (s - f) / (1 - f)), exactly 0 where the gate
    # s < f (layer.py). Shut means shut: a thousand edits do not each leak a little onto
    # every token, the serving path skips shut bases, and training skips the rows where the
    # new gate is shut (their KL and gradient are exactly 0). 0 gives the plain sigmoid gate.
    gate_floor: float = 0.2
    # Near-miss negatives: the relation template filled with each word of a multi-word subject
    # alone ("BBC" and "One" for "BBC One"), so the gate learns the whole subject.
    near_miss_negatives: bool = False
    # Near misses as negatives, up to this many per fact: the prompt with one word of the
    # subject swapped for a near word of the model's embeddings, where the parent then answers
    # otherwise ("The smallest planet in the solar system is" for "The largest ..."),
    # continued by the parent (rows.subject_variants), so the gate's key learns the whole
    # subject. Not the default: on everyday-dev, 40 in a row, 8 take locality from 0.850 to
    # 0.871 and repetition to the base model's, but generalisation from 0.853 to 0.836 (edit-1k
    # records 0-199: 0.693 against 0.711), and a new ledger's add to 2.23 times a no-wordings
    # add (the speed goal is 2; docs/design.md, under the field's name).
    subject_variants: int = 0
    # Other descriptions with the subject's tail as negatives, up to this many per fact, for a
    # subject that is a description ("highest mountain in the world": rows.description_negatives),
    # so its gate does not key on the tail's last word ("world") that other descriptions share.
    description_negatives: int = 6
    # Words that often begin an input (rows.START_WORDS: places, languages, companies, names),
    # their states at the start of an input as negatives for the gate's key: up to this many,
    # none that is a word of the subject. At the first position a state holds its token
    # alone, and a gate keyed on a country in mid-prompt ("The capital of Japan is") opens
    # there on other places ("Amazon was founded by", "Canada shares its longest border")
    # unless it has seen them. They cost no step: only the key's set-up reads them.
    start_negatives: int = 48
    # The subject in other catalogued relations (wordings.relation_negatives: "The capital of
    # Kenya is" for "Kenya is a country in"), its states there among the negatives that set
    # the ramp of the gate's key: up to this many. The edit rides on the subject, and a gate
    # open wherever the subject is changes what the model says of it in every relation. Like
    # start_negatives, no training rows. 6: on the tuning sets it gives locality on everyday
    # facts (everyday-dev 0.921 against 0.913 at 0) for some reach to CounterFact prompts that
    # ask another question of the subject (docs/design.md, under the field's name, has each
    # set's figures).
    relation_negatives: int = 6
    # Early stop once every target token is the argmax and has at least this probability.
    # 0.9: trained on the built-in wordings, an edit carries to unseen wordings without the
    # margin of 0.99, which takes 1.6 times the steps for the same generalisation on
    # everyday facts (docs/design.md, under the field's name).
    stop_prob: float = 0.9
    # ... where set, the target tokens of the rows the ledger adds (table wordings, rewrites,
    # the prompt behind fixed prefixes) need only this probability, and to be the argmax; the
    # fact's own prompt and rephrases keep stop_prob. None: stop_prob for every row. Not the
    # default: 0.5 takes 0.7 times the time of an add on counterfact-val and locality on
    # everyday-dev from 0.839 to 0.858, but generalisation on edit-1k's n=200 from 0.712 to
    # 0.692 (paraphrases the same, prompts asking another question 0.461 to 0.417;
    # docs/design.md, under the field's name).
    stop_prob_wordings: float | None = None
    # Each target token's CE weighted by (1 - p)^target_focus, p its probability at the last
    # step, a fact's weights scaled to sum to its number of tokens (objective.py): the steps
    # push on the tokens the stop rule still waits for. 0: the plain mean. Not the default:
    # 1 takes a quarter fewer steps and carries further to unseen wordings, but loops more and
    # changes more neighbours (everyday-dev locality 0.885 against 0.921; docs/design.md,
    # under the field's name).
    target_focus: float = 0.0
    # ... and the KL on every unrelated row (mean over its tokens) is at most this.
    stop_kl: float = 0.01
    # ... and on the parent's greedy continuation of each of the fact's own locality prompts
    # (train_on_locality), wherever the parent's top token leads its next by at least this
    # log-probability, it still leads in the edited model by half of it, so generating from
    # the user's neighbours gives what the parent gave. 0: no such wait.
    stop_locality_margin: float = 0.1
    # In the KL, each of the fact's own locality prompts weighs this many unrelated rows: a
    # close neighbour ("Michel Rocard is a native speaker of" for an edit of Danielle
    # Darrieux's mother tongue) shares the subject's kind, the gate's key sits near its state,
    # and at 1 that edit on Gemma 3 (--seed 2) ran to the step cap with the neighbour's third
    # token changed; at 4 it stops at 40 steps with the neighbour's KL at 0.005
    # (docs/design.md).
    locality_row_weight: float = 4.0
    # Train on the fact's own rephrase prompts (a user's paraphrases are training data).
    # Benchmarks turn this off so generalisation is measured on unseen prompts.
    train_on_rephrases: bool = True
    # Train with the fact's own locality prompts as negatives (off in benchmarks, likewise).
    train_on_locality: bool = True
    # Other wordings of the fact's relation from the ledger's wordings table (wordings.py),
    # filled with the subject and trained on like the prompt: up to this many per fact.
    # On counterfact-val[0:20] (each fact's held-out wording left out of the table), 6 take
    # generalisation from 0.425 to 0.875 at equal locality; 16 (most relations of
    # counterfact-train have 6-19) take it further, with the stricter stop: val single edits
    # 0.901 against 0.834 with 6 (docs/design.md).
    wordings: int = 16
    # When the relation has fewer than `wordings` of its own: relations that share at least
    # this many wordings with it (other templates of the same relation) lend theirs. 0: off.
    wordings_related: int = 3
    # ... and then the relation whose templates share most content words with the fact's
    # (wordings.nearest): a hand-written prompt ("The painter of {} is") is rarely a key of
    # the table but often close to one of its relations' wordings.
    wordings_nearest: bool = True
    # The subject in up to this many other relations of the built-in catalogue ("The capital
    # of Russia is" for a fact about Russia's currency; wordings.other_relations), continued
    # by the parent for neg_continuation_tokens, as unrelated rows: the gate is open there, so
    # the KL makes the value change the edited relation and not everything said of the subject.
    # Not the default: on 6 everyday facts whose neighbours change, 4 of them raise locality
    # from 0.66 to 0.80 at 2.3 times the steps; on 40 in a row, 2 cost generalisation
    # (0.847 against 0.869) for locality 0.875 against 0.850 (docs/design.md, under the
    # field's name).
    other_relations: int = 0
    # ... and first up to this many among the relations whose words come before the subject
    # ("The capital of {} is", not "{} is located in": wordings.other_relations' `before`),
    # for a fact whose own prompt has words before the subject ("The currency of Russia is").
    # There the subject's state holds the other relation, so the value learns to leave it
    # alone without shutting what a prompt naming the subject first goes on to ask. On
    # everyday-dev, 40 in a row, 2 take locality from 0.876 to 0.916 at generalisation 0.903
    # against 0.908; on edit-1k records 0-99 the same generalisation (0.759), where rows for
    # every fact, the subject-first prompts' too, take it to 0.651 on the first 43
    # (docs/design.md, under the field's name).
    other_relations_before: int = 2
    # ... and, for a fact whose own prompt names the subject first ("Kenya is a country in"), up
    # to this many among the relations that name it first too ("Kenya was founded by"). Not the
    # default: on everyday-check, 32 in a row, 2 take locality from 0.721 to 0.763 and
    # generalisation from 0.868 to 0.837 (docs/design.md, under `other_relations_before`).
    other_relations_after: int = 0
    # The prompt with its new target, continued by the parent for this many tokens, as an
    # unrelated row whose KL starts after the target: after the new answer the edited model
    # goes on as the parent does after it, instead of repeating the answer. 0: off.
    after_target_tokens: int = 4
    # ... and the same for up to this many of the relation's other wordings the edit trains on.
    # Not the default: on counterfact-val[0:42] 4 take looping generations from 10 of 126 to
    # 2 (base model: 0), but generalisation from 0.944 to 0.849 at 1.6 times the steps: the
    # KL after the answer in every wording holds back the value that carries the edit to
    # unseen wordings (docs/design.md, under the field's name).
    after_target_wordings: int = 0
    # After training, the edited model continues the prompt and its trained wordings greedily
    # (12 tokens); where at least this many of them loop (a word three times in a row), the fact
    # is trained again with an after-target row for each looping wording. 0: no check. With 3,
    # counterfact-val[0:40] single edits loop in 0.017 of generations against 0.050, at equal
    # generalisation, 1.2 times the steps (docs/design.md, under the field's name).
    loop_check: int = 3
    # Short fixed prefixes before the prompt, for generalisation (as ROME does).
    n_prefixes: int = 2
    # Where the wordings table gives no wording for the fact's relation (nor a related or
    # near one), up to this many relation-agnostic rewrites of the prompt stand in: question
    # and instruction frames around it, the subject named before it (wordings.REWRITES). They
    # need no table, so a fact of any relation trains on more than its own prompt. On
    # everyday-dev (12 of 40 facts without table wordings under the strict hold-out), 40 in a
    # row: generalisation 0.894 against 0.853; beside a relation's own wordings they cost
    # generalisation on counterfact-val, hence only where the table gives none
    # (docs/design.md, under the field's name).
    rewrites: int = 6
    # Locality prompts are continued by this many tokens of the parent's own greedy output
    # before the KL is taken over them.
    continuation_tokens: int = 8
    # Hard negatives: the fact's relation template filled with this many generic subjects,
    # each continued by the parent for neg_continuation_tokens tokens (needs a subject).
    neg_subjects: int = 8
    neg_continuation_tokens: int = 2
    # Prompts of edits already active, used as retention negatives (sampled when more): they
    # are unrelated rows, so the new gate's key is set apart from the earlier subjects and
    # the KL holds their answers where it still opens. With 8 sampled, later gates open on
    # earlier facts' prompts (" II" of "Largo Winch II" on "John Paul II"): 100 edits in a
    # row on val lose 10 facts' answers, against 3 with all of them (docs/design.md). A row
    # whose new gate is shut costs only the set-up pass up to the edited block.
    # Past this many, half are the prompts sharing tokens with the new subject, half random
    # (rows.pick_retention).
    retention_samples: int = 256
    # Precision of the blocks above the edited one in the fast steps: "bfloat16" runs their
    # matmuls in bfloat16 (autocast, weights cast once per edit), several times faster on a CPU
    # with bfloat16 units; the edited block, the loss and the output head stay float32, and the
    # parent's reference distributions are taken the same way. "float32": exact (the plain
    # path's gradients to 1e-5).
    train_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if not 1 <= self.rank <= 256:
            raise InputError(f"--rank must be between 1 and 256, got {self.rank}")
        if self.steps < 1 or self.min_steps < 0:
            raise InputError("--steps must be at least 1")
        if not 0 <= self.adam_beta1 < 1:
            raise InputError(f"adam_beta1 must lie in [0, 1), got {self.adam_beta1}")
        if not 0 <= self.adam_beta2 < 1:
            raise InputError(f"adam_beta2 must lie in [0, 1), got {self.adam_beta2}")
        if self.stop_prob_wordings is not None and not 0 <= self.stop_prob_wordings <= 1:
            raise InputError(f"stop_prob_wordings must lie in [0, 1], got {self.stop_prob_wordings}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.edit_positions not in ("subject", "all"):
            raise InputError(f"edit_positions must be 'subject' or 'all', got '{self.edit_positions}'")
        if self.rotation_init not in ROTATION_INITS:
            raise InputError(f"rotation_init must be one of {', '.join(ROTATION_INITS)}, got '{self.rotation_init}'")
        if self.train_dtype not in TRAIN_DTYPES:
            raise InputError(f"train_dtype must be one of {', '.join(TRAIN_DTYPES)}, got '{self.train_dtype}'")
        if self.gate_close_pool not in ("mean", "max"):
            raise InputError(f"gate_close_pool must be 'mean' or 'max', got '{self.gate_close_pool}'")
        if not 0.0 <= self.gate_floor < 1.0:
            raise InputError(f"--gate-floor must lie in [0, 1), got {self.gate_floor}")
        if self.method == "baft" and self.gate_lr_scale == 0 and not self.gate_key_init:
            raise InputError("a frozen gate (gate_lr_scale 0) needs gate_key_init: it would stay half open everywhere")
        if not 0 < self.gate_key_shrinkage <= 1:
            raise InputError(f"gate_key_shrinkage must lie in (0, 1], got {self.gate_key_shrinkage}")
        if not 0 <= self.wordings <= 32:
            raise InputError(f"--wordings must be between 0 and 32, got {self.wordings}")
        if not 0 <= self.n_prefixes <= MAX_PREFIXES:
            raise InputError(f"--prefixes must be between 0 and {MAX_PREFIXES}, got {self.n_prefixes}")
        if not 0 <= self.rewrites <= MAX_REWRITES:
            raise InputError(f"--rewrites must be between 0 and {MAX_REWRITES}, got {self.rewrites}")
        if not 0 <= self.subject_variants <= 32:
            raise InputError(f"subject_variants must be between 0 and 32, got {self.subject_variants}")
        if not 0 <= self.start_negatives <= MAX_START_WORDS:
            raise InputError(f"start_negatives must be between 0 and {MAX_START_WORDS}, got {self.start_negatives}")
        if not 0 <= self.relation_negatives <= MAX_RELATION_NEGATIVES:
            raise InputError(f"relation_negatives must be between 0 and {MAX_RELATION_NEGATIVES}, "
                             f"got {self.relation_negatives}")
        if not 0 <= self.description_negatives <= 16:
            raise InputError(f"description_negatives must be between 0 and 16, got {self.description_negatives}")
        if not 0 <= self.other_relations <= 16:
            raise InputError(f"other_relations must be between 0 and 16, got {self.other_relations}")
        if not 0 <= self.other_relations_after <= 16:
            raise InputError(f"other_relations_after must be between 0 and 16, got {self.other_relations_after}")
        if not 0 <= self.other_relations_before <= 16:
            raise InputError(f"other_relations_before must be between 0 and 16, got {self.other_relations_before}")
        if not 0 <= self.after_target_tokens <= 32:
            raise InputError(f"after_target_tokens must be between 0 and 32, got {self.after_target_tokens}")
        if not 0 <= self.loop_check <= 64:
            raise InputError(f"loop_check must be between 0 and 64, got {self.loop_check}")
        if not 0 <= self.after_target_wordings <= 32:
            raise InputError(f"after_target_wordings must be between 0 and 32, got {self.after_target_wordings}")
        if not 0 <= self.target_focus <= 8:
            raise InputError(f"target_focus must lie in [0, 8], got {self.target_focus}")
        if self.stop_locality_margin < 0:
            raise InputError(f"stop_locality_margin must not be negative, got {self.stop_locality_margin}")
        if self.wordings_related < 0:
            raise InputError(f"--wordings-related must not be negative, got {self.wordings_related}")
        for name in ("locality_weight", "gate_weight", "gate_open_weight", "gate_lr_scale", "locality_row_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must not be negative")
        if self.layer is not None and self.layer < 0:
            raise InputError(f"--layer must not be negative, got {self.layer}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, stored: bool = False) -> "BaftConfig":
        """A config from a dict; missing fields take the defaults. stored=True: d is the
        config of an edit in the ledger, and a field it lacks takes the value that reproduces
        how it was trained (STORED_BEFORE); a field the config no longer has is ignored."""
        known = {f.name for f in fields(cls)}
        base = {k: v for k, v in STORED_BEFORE.items() if k not in d} if stored else {}
        return cls(**base, **{k: v for k, v in d.items() if k in known})


# Fields that some stored edits lack, with the value that reproduces how those edits were
# trained: a rebase retrains an old edit as it was trained.
STORED_BEFORE: dict[str, Any] = {"gate_floor": 0.0, "gate_lr_scale": 1.0, "wordings": 0, "wordings_related": 0,
                                 "train_dtype": "float32", "rotation_init": "random", "gate_key_shrinkage": 1.0,
                                 "adam_beta1": 0.9, "wordings_nearest": False,
                                 "other_relations": 0, "other_relations_before": 0, "other_relations_after": 0, "subject_variants": 0, "description_negatives": 0, "start_negatives": 0, "relation_negatives": 0, "after_target_tokens": 0,
                                 "after_target_wordings": 0, "loop_check": 0, "rewrites": 0,
                                 "stop_prob_wordings": None, "target_focus": 0.0, "stop_locality_margin": 0.0,
                                 "locality_row_weight": 1.0}


def default_layer(n_layers: int) -> int:
    """A lower-middle block, a third of the depth: where factual recall is mediated in decoder
    LMs (ROME's finding). For SmolLM2 (30 blocks) that is layer 10: on counterfact-val the
    edit's value carries to more rephrasings there than at layer 9 at the same locality, and
    at layer 12 the gates open on neighbours (docs/design.md)."""
    return max(0, min(n_layers - 1, round(n_layers / 3)))
