"""The names users type and read: rev-N, edit-N, eval-N, and the rule for branch and tag names."""
from __future__ import annotations

import re

from .errors import InputError

REV_RE = re.compile(r"^rev-([1-9][0-9]{0,11})\Z")
EDIT_RE = re.compile(r"^edit-([1-9][0-9]{0,11})\Z")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}\Z")
DEFAULT_BRANCH = "main"


def rev_name(rev_id: int) -> str:
    return f"rev-{rev_id}"


def edit_name(edit_id: int) -> str:
    return f"edit-{edit_id}"


def eval_name(eval_id: int) -> str:
    return f"eval-{eval_id}"


def edit_id_of(name: str) -> int | None:
    """The number of `edit-N`, or None when the name is not of that form."""
    m = EDIT_RE.match(name or "")
    return int(m.group(1)) if m else None


def parse_edit(name: str) -> int:
    """The number of `edit-N`; InputError for any other name."""
    eid = edit_id_of(name)
    if eid is None:
        raise InputError(f"invalid edit name {name!r}: expected edit-N")
    return eid


def check_ref_name(name: str) -> str:
    if not isinstance(name, str) or not REF_RE.match(name) or ".." in name or name.endswith(("/", ".")) \
            or REV_RE.match(name) or EDIT_RE.match(name) or name.upper() == "HEAD" or name.startswith("rev-"):
        raise InputError(f"invalid ref name {name!r}: use letters, digits, '.', '_', '-', '/' "
                         "(not starting with rev-, no '..')")
    return name
