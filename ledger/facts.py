"""Facts: the one input of an edit, its validation, and the readers of fact files.

A fact file holds one fact object, a JSON list of them, or JSON Lines. Records come in the
native form or in the forms of EasyEdit's CounterFact (`ground_truth`, `rephrase_prompt`,
`locality_prompt`, `locality_ground_truth`), ROME's CounterFact, zsRE (MEND) and KnowEdit
(`to_native` turns each into the native form).
Every record is validated before anything is trained or written: a file with one bad record
is refused whole, naming the record and the reason.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from .errors import InputError

# A fact is a prompt, not a document: longer prompts are almost always a wrong file.
MAX_PROMPT_CHARS = 2000
MAX_TARGET_CHARS = 500
MAX_EXTRA_PROMPTS = 32


@dataclass(frozen=True)
class LocalityPrompt:
    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class PortabilityPrompt:
    """A prompt whose answer follows from the edited fact (KnowEdit's portability, zsRE's
    new question): scored like reliability, never trained on."""
    prompt: str
    answer: str


@dataclass(frozen=True)
class Fact:
    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[LocalityPrompt, ...] = ()
    case_id: str | None = None
    portability_prompts: tuple[PortabilityPrompt, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rephrase_prompts"] = list(self.rephrase_prompts)
        d["locality_prompts"] = [asdict(lp) for lp in self.locality_prompts]
        d["portability_prompts"] = [asdict(pp) for pp in self.portability_prompts]
        return {k: v for k, v in d.items() if v not in (None, [], ())}

    @property
    def relation(self) -> str | None:
        """The prompt with the subject taken out: facts with equal subject and relation
        state the same thing, so a new one supersedes the old."""
        if self.subject and self.subject in self.prompt:
            return self.prompt.replace(self.subject, "{}")
        return None


def fill(template: str, subject: str) -> str:
    """The template (a relation, or a wording) with the subject in place of "{}"; not
    str.format, as a user's prompt may hold braces of its own ("In {0} words: {} is")."""
    return template.replace("{}", subject, 1)


def _text(rec: dict, key: str, *, required: bool, limit: int, where: str) -> str | None:
    value = rec.get(key)
    if value is None:
        if required:
            raise InputError(f"{where}: missing required field '{key}'")
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InputError(f"{where}: field '{key}' is empty")
    return check_length_and_nul(value, f"field '{key}'", where, limit)


def check_length_and_nul(value: str, what: str, where: str, limit: int) -> str:
    """The value, or an InputError when it is longer than `limit` or holds a NUL character
    (which neither database stores in text)."""
    if len(value) > limit:
        raise InputError(f"{where}: {what} is {len(value)} characters (limit {limit})")
    if "\x00" in value:
        raise InputError(f"{where}: {what} contains a NUL character")
    return value


def _prompt_list(value: Any, key: str, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise InputError(f"{where}: field '{key}' must be a list, got {type(value).__name__}")
    if len(value) > MAX_EXTRA_PROMPTS:
        raise InputError(f"{where}: field '{key}' has {len(value)} entries (limit {MAX_EXTRA_PROMPTS})")
    return value


def fact_from_record(rec: Any, index: int = 0) -> Fact:
    """Validate one record (native or EasyEdit CounterFact form) into a Fact."""
    where = f"record {index}"
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    prompt = _text(rec, "prompt", required=True, limit=MAX_PROMPT_CHARS, where=where)
    target_new = _text(rec, "target_new", required=True, limit=MAX_TARGET_CHARS, where=where)
    subject = _text(rec, "subject", required=False, limit=MAX_PROMPT_CHARS, where=where)
    true_key = "target_true" if "target_true" in rec else "ground_truth"
    target_true = _text(rec, true_key, required=False, limit=MAX_TARGET_CHARS, where=where)
    if target_true is not None and target_true.strip() == target_new.strip():
        raise InputError(f"{where}: target_new equals the true target '{target_true}'")

    rephrase_key = "rephrase_prompts" if "rephrase_prompts" in rec else "rephrase_prompt"
    rephrases = []
    for j, p in enumerate(_prompt_list(rec.get(rephrase_key), rephrase_key, where)):
        rephrases.append(_text({"p": p}, "p", required=True, limit=MAX_PROMPT_CHARS,
                               where=f"{where} {rephrase_key}[{j}]"))

    locality: list[LocalityPrompt] = []
    if "locality_prompts" in rec:
        for j, item in enumerate(_prompt_list(rec["locality_prompts"], "locality_prompts", where)):
            w = f"{where} locality_prompts[{j}]"
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict):
                raise InputError(f"{w}: expected an object with 'prompt' and 'answer'")
            locality.append(LocalityPrompt(
                prompt=_text(item, "prompt", required=True, limit=MAX_PROMPT_CHARS, where=w),
                answer=_text(item, "answer", required=False, limit=MAX_TARGET_CHARS, where=w)))
    elif "locality_prompt" in rec:  # EasyEdit CounterFact form: one neighbour prompt
        w = f"{where} locality_prompt"
        locality.append(LocalityPrompt(
            prompt=_text(rec, "locality_prompt", required=True, limit=MAX_PROMPT_CHARS, where=where),
            answer=_text(rec, "locality_ground_truth", required=False, limit=MAX_TARGET_CHARS, where=w)))

    portability: list[PortabilityPrompt] = []
    for j, item in enumerate(_prompt_list(rec.get("portability_prompts"), "portability_prompts", where)):
        w = f"{where} portability_prompts[{j}]"
        if not isinstance(item, dict):
            raise InputError(f"{w}: expected an object with 'prompt' and 'answer'")
        portability.append(PortabilityPrompt(
            prompt=_text(item, "prompt", required=True, limit=MAX_PROMPT_CHARS, where=w),
            answer=_text(item, "answer", required=True, limit=MAX_TARGET_CHARS, where=w)))

    case_id = rec.get("case_id")
    if case_id is not None and not isinstance(case_id, (str, int)):
        raise InputError(f"{where}: field 'case_id' must be a string or an integer")
    if subject is not None and subject not in prompt:
        raise InputError(f"{where}: subject '{subject}' does not occur in the prompt")
    return Fact(prompt=prompt, target_new=target_new, subject=subject, target_true=target_true,
                rephrase_prompts=tuple(rephrases), locality_prompts=tuple(locality),
                case_id=None if case_id is None else str(case_id), portability_prompts=tuple(portability))


FORMATS = ("auto", "native", "counterfact", "rome", "zsre", "knowedit")

# The fields of the native form. A field outside them is refused: a misspelt field would
# otherwise train without what it meant to give ("rephrase" for "rephrase_prompts").
NATIVE_FIELDS = ("prompt", "target_new", "subject", "target_true", "rephrase_prompts", "locality_prompts",
                 "portability_prompts", "case_id")
# EasyEdit's CounterFact spellings, which fact_from_record reads in a native record too.
_EASYEDIT_FIELDS = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")


def check_native_fields(rec: Any, where: str) -> None:
    """Refuse a field the native form does not define, naming it and the closest native field."""
    if not isinstance(rec, dict):
        return
    for key in rec:
        if key in NATIVE_FIELDS or key in _EASYEDIT_FIELDS:
            continue
        close = difflib.get_close_matches(str(key), NATIVE_FIELDS, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else f" (the fields are {', '.join(NATIVE_FIELDS)})"
        raise InputError(f"{where}: unknown field {json.dumps(key, ensure_ascii=False)}{hint}")


def detect_format(rec: Any) -> str:
    if isinstance(rec, dict):
        if "requested_rewrite" in rec:
            return "rome"
        if "src" in rec and "alt" in rec:
            return "zsre"
        if isinstance(rec.get("locality"), dict) or isinstance(rec.get("portability"), dict):
            return "knowedit"
        if "locality_prompt" in rec or "ground_truth" in rec or "rephrase_prompt" in rec:
            return "counterfact"
    return "native"


def _first_str(value: Any) -> Any:
    """KnowEdit and ROME nest answers: {"str": x}, [x, ...] or [[x, ...]]."""
    while isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, dict) and "str" in value:
        return value["str"]
    return value


def to_native(rec: Any, fmt: str, index: int) -> Any:
    """Map one record of a known dataset form onto the native fields (validated after)."""
    if fmt in ("native", "counterfact") or not isinstance(rec, dict):
        return rec          # fact_from_record reads both of these itself
    where = f"record {index}"
    if fmt == "rome":
        rw = rec.get("requested_rewrite")
        if not isinstance(rw, dict) or not isinstance(rw.get("prompt"), str) or not isinstance(rw.get("subject"), str):
            raise InputError(f"{where}: 'requested_rewrite' needs a 'prompt' template and a 'subject'")
        if "{}" not in rw["prompt"]:
            raise InputError(f"{where}: the ROME prompt template has no '{{}}' for the subject")
        true = _first_str(rw.get("target_true"))
        return {"case_id": rec.get("case_id"), "subject": rw["subject"],
                "prompt": rw["prompt"].replace("{}", rw["subject"]),
                "target_new": _first_str(rw.get("target_new")), "target_true": true,
                "rephrase_prompts": rec.get("paraphrase_prompts") or [],
                "locality_prompts": [{"prompt": p, "answer": true} for p in rec.get("neighborhood_prompts") or []]}
    if fmt == "zsre":
        loc = rec.get("loc")
        out = {"subject": rec.get("subject"), "prompt": rec.get("src"), "target_new": rec.get("alt"),
               "target_true": _first_str(rec.get("answers")),
               "rephrase_prompts": [rec["rephrase"]] if rec.get("rephrase") is not None else [],
               "locality_prompts": [{"prompt": loc, "answer": rec.get("loc_ans")}] if loc is not None else []}
        port = rec.get("portability")
        if isinstance(port, dict) and port.get("New Question") is not None:   # EasyEdit's portability file
            out["portability_prompts"] = [{"prompt": port["New Question"], "answer": _first_str(port.get("New Answer"))}]
        return out
    if fmt == "knowedit":
        for key in ("locality", "portability"):
            if rec.get(key) is not None and not isinstance(rec[key], dict):
                raise InputError(f"{where}: KnowEdit field '{key}' must be an object of named groups")
        locality = []
        for group in (rec.get("locality") or {}).values():
            for item in group if isinstance(group, list) else [group]:
                if isinstance(item, dict):
                    locality.append({"prompt": item.get("prompt"), "answer": _first_str(item.get("ground_truth"))})
        portability = []   # groups such as Reasoning, Subject_Aliasing, Logical_Generalization
        for group in (rec.get("portability") or {}).values():
            for item in group if isinstance(group, list) else [group]:
                portability.append({"prompt": item.get("prompt"), "answer": _first_str(item.get("ground_truth"))}
                                   if isinstance(item, dict) else item)
        out = {"subject": rec.get("subject"), "prompt": rec.get("prompt"), "target_new": rec.get("target_new"),
               "target_true": _first_str(rec.get("ground_truth")), "locality_prompts": locality,
               "portability_prompts": portability}
        if rec.get("rephrase_prompt") is not None:
            out["rephrase_prompts"] = rec["rephrase_prompt"]
        return out
    raise InputError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")


def records_of_text(text: str, what: str = "fact file") -> list[Any]:
    """The records of a fact file (or of another file of records): one object, a JSON
    list, or JSON Lines."""
    stripped = text.strip()
    if not stripped:
        raise InputError(f"the {what} is empty")
    try:
        data = json.loads(stripped)
        records = data if isinstance(data, list) else [data]
    except RecursionError:
        raise InputError(f"the {what} is nested too deeply") from None
    except json.JSONDecodeError as first_error:
        # Not one JSON document: try JSON Lines, and report the first bad line.
        records = []
        for lineno, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except RecursionError:
                raise InputError(f"line {lineno}: nested too deeply") from None
            except json.JSONDecodeError as e:
                if lineno == 1:
                    raise InputError(f"not JSON or JSON Lines: {first_error.msg} "
                                     f"at line {first_error.lineno} column {first_error.colno}") from None
                raise InputError(f"line {lineno}: not valid JSON: {e.msg}") from None
    if not records:
        raise InputError(f"the {what} holds no {'facts' if what == 'fact file' else 'records'}")
    return records


class FactsRead(NamedTuple):
    """The good records of a fact file, and one line per record left out."""

    facts: list[Fact]
    problems: list[str]


def _parse(text: str, fmt: str, offset: int, limit: int | None, skip_bad: bool) -> FactsRead:
    if fmt not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if offset < 0 or (limit is not None and limit < 1):
        raise InputError("--offset must be >= 0 and --limit >= 1")
    records = records_of_text(text)
    end = None if limit is None else offset + limit
    facts, problems = [], []
    for i, rec in list(enumerate(records))[offset:end]:
        try:
            form = detect_format(rec) if fmt == "auto" else fmt
            if form == "native":    # importers of other forms ignore the fields they do not use
                check_native_fields(rec, f"record {i}")
            facts.append(fact_from_record(to_native(rec, form, i), i))
        except InputError as e:
            if not skip_bad:
                raise
            problems.append(str(e))
    return FactsRead(facts, problems)


def parse_facts_text(text: str, *, fmt: str = "auto", offset: int = 0, limit: int | None = None) -> list[Fact]:
    """Parse and validate the records of a fact file (records [offset, offset + limit)); the
    first bad record refuses the whole file (InputError naming its index)."""
    facts = _parse(text, fmt, offset, limit, skip_bad=False).facts
    if not facts:
        raise InputError(f"no records in the range --offset {offset} --limit {limit}")
    return facts


def parse_facts_skipping_bad(text: str, *, fmt: str = "auto", offset: int = 0,
                             limit: int | None = None) -> FactsRead:
    """As parse_facts_text, but a bad record is left out and named in `problems` while the
    good ones go on (the file's JSON must still parse)."""
    return _parse(text, fmt, offset, limit, skip_bad=True)


def read_text(path: str | Path, what: str = "fact file") -> str:
    """A UTF-8 file's text, or an InputError that names the problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such {what}: {p}") from None
    except IsADirectoryError:
        raise InputError(f"{p} is a directory, not a {what}") from None
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not valid UTF-8 (byte {e.start})") from None


def load_facts(path: str | Path, *, fmt: str = "auto", offset: int = 0, limit: int | None = None) -> list[Fact]:
    """Read and validate a fact file; raise InputError naming the first problem."""
    return parse_facts_text(read_text(path), fmt=fmt, offset=offset, limit=limit)


def load_facts_skipping_bad(path: str | Path, *, fmt: str = "auto", offset: int = 0,
                            limit: int | None = None) -> FactsRead:
    """Read a fact file, leaving bad records out: the good facts and a line per bad record."""
    return parse_facts_skipping_bad(read_text(path), fmt=fmt, offset=offset, limit=limit)


def facts_from_records(records: Iterable[Any]) -> list[Fact]:
    return [fact_from_record(rec, i) for i, rec in enumerate(records)]
