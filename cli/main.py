"""`ledger`: the command line. Each command parses, calls one `ledger.Ledger` method, prints.

Errors the user can act on come out as one line, `error: ...`, with exit code 2 for bad usage
or input and 1 for a problem with stored state; never a traceback.
"""
from __future__ import annotations

import functools
import json
import sys
from typing import TYPE_CHECKING, Any, Callable

import click

from ledger import BaftConfig, InputError, LedgerError, ProgressEvent, load_facts, load_facts_skipping_bad
from ledger.baft.config import MAX_PREFIXES, MAX_RELATION_NEGATIVES, MAX_REWRITES, MAX_START_WORDS

# `Ledger` (and with it SQLAlchemy) is imported by the commands that open a ledger, and torch
# only by those that run the model: `ledger --help` imports neither.
if TYPE_CHECKING:
    from ledger import Ledger
    from ledger.explain import Explanation
    from ledger.results import DiffResult, EvalReport, RevertResult, RevisionInfo
    from ledger.replay import ReplayResult
    from ledger.wordings import ImportResult


# Bare `ledger` raises this to show the help (click >= 8.2); it is no error.
_SHOWS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_error(e: click.UsageError) -> None:
    """A usage error as one line, like every other error, pointing to the command's --help."""
    where = e.ctx.command_path if e.ctx is not None else "ledger"
    click.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)


class LedgerGroup(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:     # a bad option before the command: one line, exit 2
            if isinstance(e, _SHOWS_HELP):
                raise
            _usage_error(e)
            raise SystemExit(2) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LedgerError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:     # a bad option of a command: one line too, exit 2
            _usage_error(e)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing of the unfinished step was written", err=True)
            ctx.exit(130)
        except Exception as e:  # a database that vanished mid-command, a disk that filled up
            from sqlalchemy.exc import SQLAlchemyError
            if isinstance(e, SQLAlchemyError):
                first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
                click.echo(f"error: database: {first}", err=True)
                ctx.exit(1)
            raise


def _n(count: int, noun: str) -> str:
    """"1 edit", "2 edits"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False))


def _headline(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={metrics[k]:.2f}" for k in ("reliability", "generalization", "locality") if k in metrics)


def _means(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items())


# Commands that read or move the record and never run the model: they leave torch unloaded
# (importing it costs a second or more), so --threads has nothing to set for them.
_NO_MODEL = frozenset({"log", "show", "status", "refs", "audit", "diff", "verify", "reflog", "branch", "tag", "gc",
                       "checkout", "list"})


def _set_threads(ctx: click.Context) -> None:
    threads = ctx.obj.get("threads")
    if threads and ctx.info_name not in _NO_MODEL:
        import torch
        torch.set_num_threads(threads)


def _open(ctx: click.Context) -> Ledger:
    o = ctx.obj
    _set_threads(ctx)
    from ledger import Ledger
    return Ledger.open(o["db"], author=o["author"], device=o["device"])


def _as_json(result: Any) -> Any:
    """A command's result in JSON form: results with a to_dict, lists of them, or plain data."""
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, list):
        return [_as_json(r) for r in result]
    return result


def reads(group: click.Group, name: str | None = None, *, text: Callable[[Any], None],
          to_json: Callable[[Any], Any] = _as_json, fails: Callable[[Any], bool] | None = None,
          json_help: str = "Print JSON.") -> Callable[[Callable[..., Any]], click.Command]:
    """Make `fn(lg, **params)` the command `name` of `group`: it opens the ledger, calls fn,
    closes the ledger and prints the result, as JSON with --json and through `text` otherwise;
    where `fails(result)`, the command exits 1. fn's click arguments and options stay its own."""
    def wrap(fn: Callable[..., Any]) -> click.Command:
        @functools.wraps(fn)   # keeps the docstring (the help) and the click parameters declared on fn
        @click.pass_context
        def command(ctx: click.Context, as_json: bool, **params: Any) -> None:
            with _open(ctx) as lg:
                result = fn(lg, **params)
            if as_json:
                _dump(to_json(result))
            else:
                text(result)
            if fails is not None and fails(result):
                ctx.exit(1)
        # --json goes last in the help, after fn's own parameters (click lists them in reverse).
        command.__click_params__ = [click.Option(["--json", "as_json"], is_flag=True, help=json_help),
                                    *getattr(fn, "__click_params__", [])]
        return group.command(name)(command)
    return wrap


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", envvar="LEDGER_DB", default=None, metavar="URL",
              help="URL of the ledger database: sqlite:///PATH or postgresql://user@host/db "
                   "[env LEDGER_DB; default .ledger/ledger.db here or in the nearest parent directory that has one; "
                   "init: here].")
@click.option("--author", envvar="LEDGER_AUTHOR", default=None, help="Who is acting [env LEDGER_AUTHOR; default: the user].")
@click.option("--device", default="cpu", show_default=True, help="Torch device for the model (cpu, cuda).")
@click.option("--threads", envvar="LEDGER_THREADS", type=click.IntRange(1, 512), default=None,
              help="CPU threads for torch [env LEDGER_THREADS; default: torch's choice].")
@click.version_option(package_name="baft-ledger")
@click.pass_context
def cli(ctx: click.Context, db: str | None, author: str | None, device: str, threads: int | None) -> None:
    """The edit ledger for BaFT: knowledge edits of a language model, kept like commits."""
    ctx.obj = {"db": db, "author": author, "device": device, "threads": threads}


@cli.command()
@click.option("--model", default=None, metavar="PATH|NAME",
              help="Local Hugging Face model directory, or a packaged model's name: smollm2-135m-instruct "
                   "(the default) or gemma3-270m.")
@click.option("--no-wordings", is_flag=True,
              help="Start with an empty table of relation wordings instead of the built-in ones "
                   "(CounterFact's relations and a catalogue of everyday relations; `ledger wordings`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def init(ctx: click.Context, model: str | None, no_wordings: bool, as_json: bool) -> None:
    """Create a new ledger on a base model.

    rev-1 is the base model, unedited."""
    o = ctx.obj
    _set_threads(ctx)
    from ledger import Ledger
    with Ledger.init(o["db"], model=model, author=o["author"], device=o["device"], wordings=not no_wordings) as lg:
        s, head, table = lg.settings(), lg.head(), lg.wordings()
        info = {"database": lg.engine.url.render_as_string(hide_password=True), "model": s["base_model"],
                "fingerprint": s["base_fingerprint"], **head,
                "wordings": {"relations": table["relations"], "wordings": table["wordings"]}}
    if as_json:
        _dump(info)
    else:
        click.echo(f"initialised ledger in {info['database']}\nmodel {info['model']} "
                   f"(fingerprint {info['fingerprint'][:12]})\n{_head_line(info)}\n"
                   f"relation wordings: {table['wordings']} for {_n(table['relations'], 'relation')}"
                   + (" (--no-wordings: edits train on their own prompts and rewrites of them)" if no_wordings else " (built in)"))


class _Bar:
    """Progress on stderr over a whole command, drawn from its progress events: a bar on a
    terminal, elsewhere one line per stage ("training edit 2/10"). While training, the bar
    counts facts done and the label names the current fact's step: the step cap is a bound
    (training stops once every target is reached), so it makes no total. Used as a context manager:
    leaving it normally finishes the bar (with `fill`, filled: training stops early once every
    target is reached); leaving it on an error or Ctrl-C leaves the bar where it stopped."""

    def __init__(self, fill: bool = False, file: Any = None):
        self.bar = None   # drawn at the first report, so a refused command prints only its error
        self.pos = 0
        self.total = 0
        self.fill = fill
        self.file = file if file is not None else sys.stderr
        self.terminal = self.file.isatty()
        self.shown = None   # the stage last printed, off a terminal

    @staticmethod
    def describe(event: ProgressEvent) -> str:
        return f"training {event.label}" if event.phase == "train" else f"evaluating: {event.label}"

    def __call__(self, event: ProgressEvent) -> None:
        label = self.describe(event)
        if not self.terminal:
            if label != self.shown:
                click.echo(label, file=self.file)
                self.shown = label
            return
        by_fact = event.phase == "train" and event.facts_total is not None
        if self.bar is None:
            self.total = event.facts_total if by_fact else event.total
            self.bar = click.progressbar(length=self.total, label=label, file=self.file, show_pos=True)
        done = event.done
        if by_fact:
            label = f"{label}, step {event.step}"
            done = event.fact       # the facts before the current group are done
        self.bar.label = label
        if done > self.pos:
            self.bar.update(done - self.pos)
            self.pos = done

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.bar is None:
            return
        if exc_type is None and self.fill:
            self.bar.update(self.total - self.pos)
        self.bar.render_finish()    # ends the line as drawn: an interrupted bar keeps its position


# What training does with a fact that names no subject (rows.py: the block acts on all of
# the fact's rows' tokens, no gate key, no relation template for wordings or supersession).
_NOT_REACHED = ("warning: {edit} does not give {target} on its own prompt (reliability {reliability:.2f} after "
                "{steps} steps); `ledger revert {revision}` undoes it")
_NO_SUBJECT = ("note: {edit} ({prompt} -> {target}) has no subject: it acts at every token of its prompts "
               "instead of the subject's, trained on no relation wordings and supersedes no edit")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=False))
@click.option("--method", type=click.Choice(["baft", "reft"]), default="baft", show_default=True,
              help="baft: input-gated bases; reft: constant gate (the LoReFT ablation).")
@click.option("--layer", type=int, default=None, help="Decoder block to edit [default: per model].")
@click.option("--rank", type=int, default=BaftConfig.rank, show_default=True, help="Bases per edit.")
@click.option("--steps", type=int, default=BaftConfig.steps, show_default=True, help="Most training steps.")
@click.option("--lr", type=float, default=BaftConfig.lr, show_default=True, help="Adam learning rate.")
@click.option("--stop-prob", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=BaftConfig.stop_prob,
              show_default=True, help="Stop once every target token has at least this probability on the fact's "
                                      "prompt and rephrases (lower: fewer steps, less carry-over to other "
                                      "wordings).")
@click.option("--stop-prob-wordings", type=click.FloatRange(0.0, 1.0), default=BaftConfig.stop_prob_wordings,
              help="... but only this probability on the prompts the ledger adds (relation wordings, rewrites, "
                   "prefixed prompts), where they must still be the most likely token (fewer steps, less "
                   "carry-over to prompts that ask another question) [default: --stop-prob].")
@click.option("--target-focus", type=click.FloatRange(0.0, 8.0), default=BaftConfig.target_focus, show_default=True,
              help="Weigh each target token by (1 - p)^G of its probability p at the last step, so training "
                   "pushes where the stop rule still waits (0: every token alike).")
@click.option("--locality-weight", type=float, default=BaftConfig.locality_weight, show_default=True,
              help="Weight of the KL term on unrelated inputs.")
@click.option("--locality-row-weight", type=click.FloatRange(0.0), default=BaftConfig.locality_row_weight,
              show_default=True, help="In that KL term, each of the fact's own locality prompts weighs this many "
                                      "unrelated inputs.")
@click.option("--gate-floor", type=click.FloatRange(0.0, 1.0, max_open=True), default=BaftConfig.gate_floor,
              show_default=True, help="A gate below this is exactly 0 (0: the plain sigmoid gate; higher: fewer "
                                      "changed neighbours, less carry-over to prompts that ask another question "
                                      "of the subject).")
@click.option("--wordings", "n_wordings", type=click.IntRange(0, 32), default=BaftConfig.wordings, show_default=True,
              help="Also train on up to N other wordings of the fact's relation from the ledger's table "
                   "(`ledger wordings`; a relation not in it borrows from the one sharing most content words).")
@click.option("--wordings-related", type=click.IntRange(0), default=BaftConfig.wordings_related, show_default=True,
              help="When the relation has fewer than N wordings, borrow from relations sharing at least this "
                   "many wordings with it (0: never).")
@click.option("--other-relations", type=click.IntRange(0, 16), default=BaftConfig.other_relations, show_default=True,
              help="Keep what the model says of the subject in up to N other catalogued relations "
                   "(more steps; fewer changed neighbours that share the subject).")
@click.option("--other-relations-before", type=click.IntRange(0, 16), default=BaftConfig.other_relations_before,
              show_default=True,
              help="Where the fact's prompt has words before the subject, keep what the model says of the "
                   "subject in up to N catalogued relations whose words come before it (\"The capital of {} "
                   "is\"), drawn before --other-relations: fewer changed neighbours, less reach to prompts "
                   "that ask another question of the subject.")
@click.option("--subject-variants", type=click.IntRange(0, 32), default=BaftConfig.subject_variants,
              show_default=True, help="Keep what the model says on up to N near misses of the prompt, one word of "
                                      "the subject swapped for a near one (fewer changed neighbours that share "
                                      "words with the subject).")
@click.option("--description-negatives", type=click.IntRange(0, 16), default=BaftConfig.description_negatives,
              show_default=True, help="Where the subject is a description (\"highest mountain in the world\"), keep "
                                      "what the model says of up to N other descriptions that end as it does "
                                      "(\"longest river in the world\").")
@click.option("--start-negatives", type=click.IntRange(0, MAX_START_WORDS), default=BaftConfig.start_negatives,
              show_default=True, help="Keep the edit shut at the start of inputs that begin with up to N common "
                                      "words (places, languages, companies, names) other than the subject's.")
@click.option("--relation-negatives", type=click.IntRange(0, MAX_RELATION_NEGATIVES),
              default=BaftConfig.relation_negatives, show_default=True,
              help="Keep the edit shut on its subject in up to N catalogued relations other than its own "
                   "(\"The capital of Kenya is\" for \"Kenya is a country in\"): fewer changes to what the "
                   "model says of the subject, less reach to prompts that ask another question of it.")
@click.option("--after-target-wordings", type=click.IntRange(0, 32), default=BaftConfig.after_target_wordings,
              show_default=True, help="Train N of the fact's wordings, not only its prompt, to go on as the model "
                                      "did after the new answer (fewer loops on the answer, less carry-over to "
                                      "other wordings).")
@click.option("--prefixes", "n_prefixes", type=click.IntRange(0, MAX_PREFIXES), default=BaftConfig.n_prefixes,
              show_default=True, help="Also train on the prompt behind N short fixed contexts.")
@click.option("--rewrites", type=click.IntRange(0, MAX_REWRITES), default=BaftConfig.rewrites, show_default=True,
              help="Where the wordings table has no wording for the fact's relation, train on up to N "
                   "rewrites of the prompt that fit any relation instead (question and instruction frames).")
@click.option("--format", "fmt", type=click.Choice(["auto", "native", "counterfact", "rome", "zsre", "knowedit"]),
              default="auto", show_default=True, help="Record form of FILE (auto detects per record).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip the first N records.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Add at most N records.")
@click.option("--skip-bad", is_flag=True, help="Add the good records and report the bad ones (default: refuse the file).")
@click.option("--strict", is_flag=True, help="Refuse the file when the model already answers one of its facts "
                                             "(default: skip that fact with a note).")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True,
              help="Train K facts together (one block each) and commit them as one revision.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the training prompts' sampling and the blocks' initialisation.")
@click.option("-m", "--message", default=None, help="Revision message [default: the fact].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per new edit.")
@click.pass_context
def add(ctx: click.Context, file: str, method: str, layer: int | None, rank: int, steps: int, lr: float,
        stop_prob: float, stop_prob_wordings: float | None, target_focus: float, locality_weight: float,
        locality_row_weight: float,
        gate_floor: float, n_wordings: int, wordings_related: int,
        other_relations: int, other_relations_before: int, subject_variants: int, description_negatives: int, start_negatives: int, relation_negatives: int,
        after_target_wordings: int, n_prefixes: int, rewrites: int, fmt: str,
        offset: int, limit: int | None, skip_bad: bool, strict: bool, batch: int, seed: int, message: str | None,
        as_json: bool) -> None:
    """Train and commit one BaFT edit per fact in FILE.

    Each fact becomes a new revision (with --batch K, K facts per revision, trained together).

    FILE holds one fact object, a JSON list, or JSON Lines, in the native form
    (prompt, target_new, subject, target_true, rephrase_prompts, locality_prompts,
    portability_prompts, case_id), the EasyEdit CounterFact form, ROME's CounterFact form, zsRE (MEND) or KnowEdit. Every record
    is checked before anything is trained; a native field not in that list is refused.
    A fact the model already answers is skipped with a note (in --json, a line with
    "skipped": true and the reason), or refuses the file with --strict; when every fact is
    skipped, nothing is added and the command says so and exits 0.

    The edit acts at the subject's tokens, so give each fact its subject. A fact without one
    is added with a note on stderr: its edit acts at every token of its prompts, trains on no
    relation wordings and supersedes no earlier edit.
    """
    cfg = BaftConfig(method=method, layer=layer, rank=rank, steps=steps, lr=lr, stop_prob=stop_prob,
                     stop_prob_wordings=stop_prob_wordings, target_focus=target_focus,
                     locality_weight=locality_weight, locality_row_weight=locality_row_weight, gate_floor=gate_floor,
                     wordings=n_wordings, wordings_related=wordings_related, other_relations=other_relations,
                     other_relations_before=other_relations_before,
                     subject_variants=subject_variants, description_negatives=description_negatives,
                     start_negatives=start_negatives, relation_negatives=relation_negatives,
                     after_target_wordings=after_target_wordings,
                     n_prefixes=n_prefixes, rewrites=rewrites, seed=seed)
    if skip_bad:
        facts, problems = load_facts_skipping_bad(file, fmt=fmt, offset=offset, limit=limit)
    else:
        facts, problems = load_facts(file, fmt=fmt, offset=offset, limit=limit), []
    for p in problems:
        click.echo(f"skipped {p}", err=True)
    if not facts:
        raise InputError("no good records to add")
    with _open(ctx) as lg:
        with _Bar(fill=True) as bar:
            results = lg.add(facts, cfg, message=message, batch=batch, progress=bar, skip_known=not strict)
    for k in results.skipped:
        click.echo(f"skipped record {k.record}: {k.reason}", err=True)
        if as_json:
            click.echo(json.dumps(k.to_dict(), ensure_ascii=False))
    if not results:
        click.echo("nothing to add: every fact is already answered", err=as_json)
    for r in results:
        if as_json:
            click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
        else:
            shown = _headline(r.metrics)
            extra = f"  (supersedes {', '.join(r.superseded)})" if r.superseded else ""
            n_w = len(r.stats.get("wording_prompts", []))
            rewritten = r.stats.get("rewritten", False)
            click.echo(f"{r.revision}  {r.edit}  {r.fact['prompt']} -> {r.fact['target_new']}  "
                       f"{shown}  {r.stats['steps']} steps {r.stats['seconds']:.1f}s  "
                       f"{n_w} {'rewrites' if rewritten else 'wordings'}{extra}")
            if rewritten or (n_w == 0 and cfg.wordings > 0):
                what = f"{n_w} rewrites of its prompt" if rewritten else "its own prompts only"
                click.echo(f"note: {r.edit} trained on {what}: the wordings table has no relation like it "
                           "(`ledger wordings list`, `ledger wordings import`)", err=True)
        if r.metrics.get("reliability", 1.0) < 1.0:
            click.echo(_NOT_REACHED.format(edit=r.edit, revision=r.revision, steps=r.stats["steps"],
                                           reliability=r.metrics["reliability"],
                                           target=json.dumps(r.fact["target_new"], ensure_ascii=False)), err=True)
        if not r.fact.get("subject"):
            click.echo(_NO_SUBJECT.format(edit=r.edit, prompt=json.dumps(r.fact["prompt"], ensure_ascii=False),
                                          target=json.dumps(r.fact["target_new"], ensure_ascii=False)), err=True)
    if len(results) > 1:
        click.echo(f"added {_n(len(results), 'edit')} in {results.seconds:.1f}s "
                   f"({results.edits_per_minute:.1f} edits/min, {results.threads} threads)", err=True)


def _print_evaluation(report: EvalReport) -> None:
    click.echo(f"{report.id}  {report.revision}  {_n(report.n, 'fact')}  dataset {report.dataset_sha256[:12]}"
               f"  {report.seconds:.1f}s" + (f"  {report.label}" if report.label else ""))
    for k, v in report.means.items():
        click.echo(f"  {k:<24}{v:.3f}")


@reads(cli, "eval", text=_print_evaluation, json_help="Print the whole evaluation, per fact too.")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=False))
@click.option("--rev", default="HEAD", show_default=True, help="Revision to evaluate.")
@click.option("--format", "fmt", type=click.Choice(["auto", "native", "counterfact", "rome", "zsre", "knowedit"]),
              default="auto", show_default=True, help="Record form of FILE (auto detects per record).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip the first N records.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate at most N records.")
@click.option("--fluency", is_flag=True, help="Also n-gram entropy of greedy generations (slower).")
@click.option("--generation/--no-generation", default=True, show_default=True,
              help="Free-generation metrics (gen_reliability, gen_generalization, gen_locality, repetition, gen_entropy) "
                   "at the revision and at the base model.")
@click.option("--label", default=None, help="A note stored with the evaluation.")
def eval_(lg: Ledger, file: str, rev: str, fmt: str, offset: int, limit: int | None, fluency: bool,
          generation: bool, label: str | None) -> EvalReport:
    """Measure the facts in FILE at a revision and store the result.

    Metrics as EasyEdit: reliability, generalization, locality (against the unedited base
    model), portability, and CounterFact's efficacy, paraphrase and neighborhood scores; and,
    unless --no-generation, metrics of free greedy generation at the revision and, as base_*,
    at the base model. FILE takes the forms of `ledger add`.
    """
    facts = load_facts(file, fmt=fmt, offset=offset, limit=limit)
    with _Bar() as bar:
        return lg.evaluate(facts, rev, fluency=fluency, generation=generation, label=label, progress=bar)


def _print_log(rows: list[RevisionInfo]) -> None:
    for r in rows:
        refs = f" ({', '.join(r.refs)})" if r.refs else ""
        change = " ".join([f"+{e}" for e in r.added] + [f"-{e}" for e in r.removed])
        click.echo(f"{r.revision}{refs}  {r.operation}  {r.author}  {r.created_at}  "
                   f"[{r.n_active} active] {change}\n    {r.message}")


@reads(cli, text=_print_log)
@click.option("--rev", default="HEAD", show_default=True, help="Start from this revision.")
@click.option("-n", "--limit", type=int, default=20, show_default=True, help="Show at most N revisions.")
def log(lg: Ledger, rev: str, limit: int) -> list[RevisionInfo]:
    """Revisions from REV back through its parents, newest first."""
    return lg.log(rev, limit)


def _print_revision(info: RevisionInfo) -> None:
    click.echo(f"revision   {info.revision}{' (' + ', '.join(info.refs) + ')' if info.refs else ''}\n"
               f"parent     {info.parent or '-'}\noperation  {info.operation}\nauthor     {info.author}\n"
               f"time       {info.created_at}\nactive     {_n(info.n_active, 'edit')}\nchain      {info.chain_hash}\n"
               f"message    {info.message}")
    for e in info.edits:
        sign = "+" if e.id in info.added else "-"
        metrics = "  ".join(f"{k}={v:.2f}" for k, v in e.metrics.items())
        click.echo(f"{sign} {e.id}  {e.fact['prompt']} -> {e.fact['target_new']}\n"
                   f"    {e.method} layer {e.layer} rank {e.rank}  {metrics}\n"
                   f"    {e.stats.get('steps')} steps  loss {e.stats.get('final_loss')}  "
                   f"{e.stats.get('seconds')}s  blob {e.blob[:12]}")
    for ev in info.evaluations or []:
        label = f"  {ev.label}" if ev.label else ""
        click.echo(f"= {ev.id}  {_n(ev.n, 'fact')}  dataset {ev.dataset_sha256[:12]}  {ev.author}  {ev.created_at}{label}\n"
                   f"    {_means(ev.means)}")


@reads(cli, text=_print_revision)
@click.argument("rev", default="HEAD")
def show(lg: Ledger, rev: str) -> RevisionInfo:
    """Show one revision (REV, default HEAD).

    Its record, change set and the edits it added or removed."""
    return lg.show(rev)


def _head_line(head: dict[str, Any]) -> str:
    """Where HEAD is, worded alike by init, checkout and status (and as `log` decorates it)."""
    if head["branch"] is None:
        return f"HEAD detached at {head['revision']}"
    return f"HEAD -> {head['branch']} at {head['revision']}"


def _print_head(head: dict[str, Any]) -> None:
    click.echo(_head_line(head))


def _left_behind_warning(left: list[str]) -> str:
    """What git says on leaving commits off every branch, for revisions."""
    named = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    them = "it" if len(left) == 1 else "them"
    return (f"warning: leaving {_n(len(left), 'revision')} behind, on no branch or tag: {named}; "
            f"to keep {them}, run: ledger branch NAME {left[0]}")


@reads(cli, text=_print_head)
@click.argument("rev")
def checkout(lg: Ledger, rev: str) -> dict[str, Any]:
    """Move HEAD to a branch or revision; later adds build on it.

    Leaving a detached HEAD whose revisions no branch or tag reaches warns, naming them."""
    out = lg.checkout(rev)
    if out.get("left_behind"):
        out["warning"] = _left_behind_warning(out["left_behind"])
        click.echo(out["warning"], err=True)
    return out


@reads(cli, text=lambda out: click.echo(out["prompt"] + out["completion"]))
@click.argument("prompt")
@click.option("--rev", default=None, help="Revision to run [default: HEAD].")
@click.option("--max-new-tokens", type=int, default=20, show_default=True, help="Most tokens to generate.")
def generate(lg: Ledger, prompt: str, rev: str | None, max_new_tokens: int) -> dict[str, str]:
    """Greedy continuation of PROMPT at a revision.

    The model is composed at the revision (default HEAD)."""
    text = lg.generate(prompt, rev=rev, max_new_tokens=max_new_tokens)
    return {"revision": f"rev-{lg.model_at(rev).revision}", "prompt": prompt, "completion": text}


def _print_explanation(ex: Explanation) -> None:
    """A line per token (repr-style, so whitespace and control characters stay on it) with the
    edits firing there, then the top-k next tokens after the prompt."""
    width = min(16, max([len(repr(t.token)) for t in ex.tokens] + [len(repr(r["token"])) for r in ex.top_next]))
    click.echo(f"{ex.revision}  prompt {ex.prompt!r}" + (f"  continuation {ex.continuation!r}" if ex.continuation else ""))
    click.echo(f"   #  {'token':<{width}}  edits firing: gate weight after the floor, norm of the change written"
               + (" (+: generated)" if any(t.generated for t in ex.tokens) else ""))
    for t in ex.tokens:
        fired = "; ".join(f"{f.edit} (layer {f.layer}) weight {f.weight:.3f} norm {f.norm:.4g}"
                          for f in t.firings) or "-"
        click.echo(f"{t.index:>4}{'+' if t.generated else ' '} {repr(t.token):<{width}}  {fired}")
    click.echo(f"\n   #  {'next token':<{width}}  {'p at ' + ex.revision:>12}  {'p at base':>12}")
    for k, r in enumerate(ex.top_next, 1):
        click.echo(f"{k:>4}  {repr(r['token']):<{width}}  {r['p_revision']:>12.4f}  {r['p_base']:>12.4f}")


@reads(cli, text=_print_explanation)
@click.argument("prompt")
@click.option("--rev", default="HEAD", show_default=True, help="Revision to explain.")
@click.option("--max-new-tokens", type=int, default=0, show_default=True,
              help="Also explain this many tokens of the greedy continuation.")
@click.option("--top-k", type=int, default=5, show_default=True, help="Next tokens to list after the prompt.")
def explain(lg: Ledger, prompt: str, rev: str, max_new_tokens: int, top_k: int) -> Explanation:
    """Which edits fire on which token of PROMPT.

    Per token of PROMPT (and of its greedy continuation), the active edits whose gate after
    the floor is open there, with that weight and the norm of the change the edit writes; then
    the top-k next tokens with their probabilities at the revision and at the base model."""
    return lg.explain(prompt, rev=rev, max_new_tokens=max_new_tokens, top_k=top_k)


def _print_problems(out: dict[str, Any]) -> None:
    for p in out["problems"]:
        click.echo(p)
    click.echo("ok: every hash matches" if out["ok"] else f"{_n(len(out['problems']), 'problem')} found")


@reads(cli, text=_print_problems, fails=lambda out: not out["ok"])
def verify(lg: Ledger) -> dict[str, Any]:
    """Recompute every hash and check it.

    Exits 1 naming each revision, edit or blob that does not match."""
    problems = lg.verify()
    return {"ok": not problems, "problems": problems}


def _print_status(info: dict[str, Any]) -> None:
    click.echo(f"{_head_line(info)}\nmodel {info['base_model']} "
               f"(fingerprint {info['base_fingerprint'][:12]})\nledger {info['database']}")


# Settings the database stores as text that are numbers.
_NUMERIC_SETTINGS = ("hidden_size", "n_layers")


@reads(cli, text=_print_status)
def status(lg: Ledger) -> dict[str, Any]:
    """Where HEAD is, and the ledger's base model."""
    settings = {k: int(v) if k in _NUMERIC_SETTINGS else v for k, v in lg.settings().items()}
    return {**lg.head(), **settings, "database": lg.database_url}


def _print_replay(res: ReplayResult) -> None:
    click.echo(f"replayed {res.source} {res.source_revision} ({res.source_model}) onto {res.model}\n"
               f"new ledger {res.database} (fingerprint {res.fingerprint[:12]}), "
               f"{_n(res.wordings, 'wording')} copied")
    for f in res.facts:
        old = _headline(f.source_metrics)
        if f.metrics is None:
            click.echo(f"{f.source_edit}  {f.fact['prompt']} -> {f.fact['target_new']}  skipped: {f.skipped}")
            continue
        click.echo(f"{f.source_edit} -> {f.revision} {f.edit}  {f.fact['prompt']} -> {f.fact['target_new']}  "
                   f"layer {f.source_layer} -> {f.layer}\n    old base: {old}\n    new base: {_headline(f.metrics)}")
    done = [f for f in res.facts if f.metrics is not None]
    if done:
        old, new = res.means("source"), res.means("new")
        click.echo("mean over " + _n(len(done), "fact") + ": " + "  ".join(
            f"{k} {old[k]:.2f} -> {new[k]:.2f}" for k in ("reliability", "generalization", "locality")
            if k in old and k in new))
    click.echo(f"{_n(len(done), 'fact')} replayed, {len(res.facts) - len(done)} skipped, in {res.seconds:.1f}s",
               err=True)


@cli.command()
@click.option("--onto-model", "onto", required=True, metavar="PATH|NAME",
              help="The new base model: a local Hugging Face directory or a packaged model's name "
                   "(smollm2-135m-instruct, gemma3-270m).")
@click.option("--db", "new_db", default=None, metavar="URL",
              help="Where the new ledger goes [default: ./NAME/.ledger/ledger.db, NAME the model's]; "
                   "an existing ledger is never overwritten.")
@click.option("--rev", default="HEAD", show_default=True, help="Replay the facts active at this revision.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def replay(ctx: click.Context, onto: str, new_db: str | None, rev: str, as_json: bool) -> None:
    """Rebuild the ledger on another base model.

    The facts active at REV are retrained on the new model and added, in the order they were
    committed and each with the config it was trained with, to a new ledger; each new revision
    names the edit it replays and keeps its author. Prints each fact's metrics on the old base and the
    new. A fact the new model already answers is skipped. The global --db names the source
    ledger; this command's --db the new one."""
    with _open(ctx) as lg:
        with _Bar(fill=True) as bar:
            res = lg.replay(onto, new_db, rev=rev, progress=bar)
    if as_json:
        _dump(res.to_dict())
    else:
        _print_replay(res)


def _print_revert(res: RevertResult) -> None:
    parts = [f"-{e}" for e in res.removed] + [f"+{e}" for e in res.restored]
    click.echo(f"{res.revision}  revert {res.reverted}  {' '.join(parts)}")
    for r in res.remeasured:
        shown = "  ".join(f"{k} {r.before[k]:.2f}->{r.after[k]:.2f}" for k in r.after if k in r.before)
        click.echo(f"  re-measured {r.edit}: {shown}")


@reads(cli, text=_print_revert)
@click.argument("target")
@click.option("-m", "--message", default=None, help="Revision message [default: revert TARGET].")
def revert(lg: Ledger, target: str, message: str | None) -> RevertResult:
    """Undo a revision or an edit in a new revision on HEAD.

    TARGET is a revision, or an edit as edit-N.

    Edits that were trained with the reverted state are re-measured; their metric changes
    are stored and printed. `ledger rebase` retrains them.
    """
    return lg.revert(target, message=message)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def rebase(ctx: click.Context, as_json: bool) -> None:
    """Retrain the edits whose training composition changed.

    Each edit at HEAD whose composition changed since it was trained (after a revert or
    supersede) is retrained as a new revision that replaces the old edit."""
    with _open(ctx) as lg:
        with _Bar(fill=True) as bar:
            results = lg.rebase(progress=bar)
    if as_json:
        _dump([r.to_dict() for r in results])
        return
    if not results:
        click.echo("nothing to rebase: every active edit was trained in its current composition")
    for r in results:
        click.echo(f"{r.revision}  {r.edit} replaces {', '.join(r.superseded)}  {_headline(r.metrics)}")


def _print_diff(d: DiffResult) -> None:
    click.echo(f"{d.a} -> {d.b}")
    for e in d.added:
        click.echo(f"+ {e['edit']}  {e['prompt']} -> {e['target_new']}  (layer {e['layer']}, rank {e['rank']})")
    for e in d.removed:
        click.echo(f"- {e['edit']}  {e['prompt']} -> {e['target_new']}  (layer {e['layer']}, rank {e['rank']})")
    for layer, st in d.layers.items():
        click.echo(f"layer {layer}: blocks {st['a']['blocks']} -> {st['b']['blocks']}, rank "
                   f"{st['a']['total_rank']} -> {st['b']['total_rank']}, tensor norm of the edits added "
                   f"{st['norm_added']:.3f}, removed {st['norm_removed']:.3f}")
    for e, m in d.metric_deltas.items():
        click.echo(f"~ {e}  " + "  ".join(f"{k} {v:+.2f}" for k, v in m.items()))
    for ev in d.eval_deltas:
        click.echo(f"= dataset {ev['dataset_sha256'][:12]} ({_n(ev['n'], 'fact')}) {ev['a']} -> {ev['b']}  "
                   + "  ".join(f"{k} {v:+.3f}" for k, v in ev["deltas"].items()))
    legend = [text for shown, text in ((d.added, "+ edit added"), (d.removed, "- edit removed"),
                                       (d.metric_deltas, "~ metric change of an edit in both"),
                                       (d.eval_deltas, "= change of a stored evaluation")) if shown]
    if legend:
        click.echo("(" + "; ".join(legend) + ")")


@reads(cli, text=_print_diff)
@click.argument("a")
@click.argument("b")
def diff(lg: Ledger, a: str, b: str) -> DiffResult:
    """What changes from revision A to revision B."""
    return lg.diff(a, b)


@reads(cli, text=lambda out: click.echo(f"branch {out['name']} at {out['revision']}"))
@click.argument("name")
@click.argument("rev", required=False)
def branch(lg: Ledger, name: str, rev: str | None) -> dict[str, Any]:
    """Create branch NAME at REV (default HEAD)."""
    return lg.branch(name, rev)


@reads(cli, text=lambda out: click.echo(f"tag {out['name']} at {out['revision']}"))
@click.argument("name")
@click.argument("rev")
def tag(lg: Ledger, name: str, rev: str) -> dict[str, Any]:
    """Tag REV as NAME. Tags never move."""
    return lg.tag(name, rev)


def _print_refs(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        target = f" -> {r['target']}" if r["target"] else ""
        click.echo(f"{r['kind']:<7} {r['name']}{target}  {r['revision']}")


@reads(cli, text=_print_refs)
def refs(lg: Ledger) -> list[dict[str, Any]]:
    """HEAD, branches and tags."""
    return lg.refs()


def _print_reflog(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        old = r["old_branch"] or r["old"] or "-"
        new = r["new_branch"] or r["new"] or "-"
        click.echo(f"{r['time']}  {r['ref']}: {old} -> {new}  by {r['actor']}  ({r['reason']})")


@reads(cli, text=_print_reflog)
@click.argument("ref", required=False)
@click.option("-n", "--limit", type=int, default=50, show_default=True, help="Show at most N moves.")
def reflog(lg: Ledger, ref: str | None, limit: int) -> list[dict[str, Any]]:
    """Every move of a ref (or of all refs), newest first."""
    return lg.reflog(ref, limit)


def _print_audit(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        click.echo(f"{r['time']}  {r['actor']}  {r['command']}  {r['revision'] or '-'}  {r['edit'] or ''}  "
                   + json.dumps(r["details"], ensure_ascii=False))


@reads(cli, text=_print_audit)
@click.option("--rev", default=None, help="Only events about this revision.")
@click.option("--edit", default=None, help="Only events about this edit (edit-N).")
@click.option("--actor", default=None, help="Only events by this author.")
@click.option("--command", "command_", default=None, help="Only this command (add, revert, checkout, ...).")
@click.option("--since", default=None, metavar="TIME",
              help="Only events at or after TIME: ISO-8601, e.g. 2026-12-03, 2026-12-03T19:49 or "
                   "2026-12-03T20:49+01:00; a time without Z or an offset is UTC.")
@click.option("--until", default=None, metavar="TIME",
              help="Only events at or before TIME (as --since); a date alone includes that whole day.")
@click.option("-n", "--limit", type=int, default=100, show_default=True, help="Show at most N events.")
def audit(lg: Ledger, rev: str | None, edit: str | None, actor: str | None, command_: str | None,
          since: str | None, until: str | None, limit: int) -> list[dict[str, Any]]:
    """The append-only audit record: who did what, when."""
    return lg.audit(rev=rev, edit=edit, actor=actor, since=since, until=until, command=command_, limit=limit)


@reads(cli, text=lambda m: click.echo(f"exported {m['revision']} ({_n(len(m['edits']), 'active edit')}) to {m['out']}"),
       to_json=lambda m: {k: m[k] for k in ("out", "revision", "chain_hash", "base_fingerprint", "files")})
@click.argument("rev")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--base-ref", is_flag=True,
              help="Do not copy the base weights: refer to the base model's directory (checked by sha256 on load).")
def export(lg: Ledger, rev: str, out: str, force: bool, base_ref: bool) -> dict[str, Any]:
    """Write a deployable snapshot of REV to OUT.

    The snapshot loads with plain transformers:
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    return {"out": out, **lg.export(rev, out, force=force, base_ref=base_ref)}


@reads(cli, text=lambda out: click.echo(f"removed {_n(out['blobs_removed'], 'blob')}, {_n(out['bytes_removed'], 'byte')}"))
def gc(lg: Ledger) -> dict[str, int]:
    """Delete tensor blobs that no edit refers to."""
    return lg.gc()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 127.0.0.1 keeps the ui to this machine.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--db", "db_url", default=None, metavar="URL", help="The ledger database (as the global --db).")
@click.option("--allow-writes", is_flag=True,
              help="Enable tag, branch, checkout and revert from the page, each behind a token printed at start-up.")
@click.pass_context
def ui(ctx: click.Context, host: str, port: int, db_url: str | None, allow_writes: bool) -> None:
    """Serve a local web view of the ledger (read-only by default).

    History, revisions, edits, diffs, the audit log, evaluation charts and a playground,
    read through the same library as the commands. Ctrl-C stops it."""
    try:
        from ledger.web import serve
    except ImportError as e:
        raise InputError(f"`ledger ui` needs the web dependencies ({e.name} is missing): "
                         "pip install -e '.[web]' or run scripts/setup.sh") from None
    if db_url:
        ctx.obj["db"] = db_url
    with _open(ctx) as lg:
        serve(lg, host=host, port=port, allow_writes=allow_writes, echo=click.echo)


@cli.group()
def wordings() -> None:
    """The relation wordings that `ledger add` trains facts on."""


def _print_import(r: ImportResult) -> None:
    click.echo(f"{_n(r.added, 'new wording')} ({r.pairs} in {_n(r.records, 'record')} of {r.source}"
               + (f", {_n(r.skipped, 'record')} gave none" if r.skipped else "") + ")")


@reads(wordings, "import", text=_print_import, json_help="Print the result as JSON.")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=False))
def wordings_import(lg: Ledger, file: str) -> ImportResult:
    """Learn relation wordings from FILE.

    FILE is a fact file whose records have a subject and
    rephrases (CounterFact, ROME, native), or records {"relation": "{} speaks", "wordings":
    ["The mother tongue of {} is", ...]}. Each later `ledger add` trains a fact on up to
    --wordings of its relation's wordings, filled with its subject."""
    return lg.import_wordings(file)


def _print_wordings(info: dict[str, Any]) -> None:
    if "relation" in info:       # one relation's wordings, not the table of relations
        for w in info["wordings"]:
            click.echo(w)
        return
    for row in info["by_relation"]:
        click.echo(f"{row['wordings']:5d}  {row['relation']}")
    click.echo(f"{_n(info['wordings'], 'wording')} of {_n(info['relations'], 'relation')}", err=True)


@reads(wordings, "list", text=_print_wordings)
@click.argument("relation", required=False)
def wordings_list(lg: Ledger, relation: str | None) -> dict[str, Any]:
    """List relations and their wordings.

    The relations with wordings and how many each has; with RELATION (a template such as
    "{} speaks"), its wordings."""
    return lg.wordings(relation)


@cli.group()
def db() -> None:
    """Schema migrations of the ledger database."""


@db.command("upgrade")
@click.option("--to", "target", default="head", show_default=True, help="Alembic revision to reach.")
@click.pass_context
def db_upgrade(ctx: click.Context, target: str) -> None:
    """Migrate the database schema (to head by default)."""
    from ledger import maintenance
    before, after = maintenance.db_upgrade(ctx.obj["db"], target)
    click.echo(f"schema {before} -> {after}")


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def db_current(ctx: click.Context, as_json: bool) -> None:
    """The database's schema revision and the one needed.

    The schema revision of the database and the one this version of the ledger needs."""
    from ledger import maintenance
    info = maintenance.db_current(ctx.obj["db"]).to_dict()
    if as_json:
        _dump(info)
    else:
        click.echo(f"current {info['current'] or '-'}  head {info['head']}"
                   + ("" if info["current"] == info["head"] else "  (run `ledger db upgrade`)"))


def main() -> None:
    cli(prog_name="ledger")


if __name__ == "__main__":
    main()
