"""The wordings table, on one Connection: (relation, wording) template pairs, in import order."""
from __future__ import annotations

from typing import Iterable

from sqlalchemy import Connection, func, select

from .schema import Wording


def write(conn: Connection, pairs: list[tuple[str, str]], source: str, now: str) -> int:
    """Add the pairs the ledger does not hold yet; returns how many were new."""
    relations = sorted({r for r, _ in pairs})
    have: set[tuple[str, str]] = set()
    for k in range(0, len(relations), 500):     # bounded IN lists on every engine
        have |= {(r, w) for r, w in conn.execute(
            select(Wording.relation, Wording.wording).where(Wording.relation.in_(relations[k: k + 500])))}
    new = [{"relation": r, "wording": w, "source": source, "created_at": now} for r, w in pairs if (r, w) not in have]
    if new:
        conn.execute(Wording.__table__.insert(), new)
    return len(new)


def of_relations(conn: Connection, relations: Iterable[str]) -> dict[str, list[str]]:
    """Each relation's wordings, in the order they were imported."""
    wanted = sorted(set(relations))
    out: dict[str, list[str]] = {r: [] for r in wanted}
    if not wanted:
        return out
    rows = conn.execute(select(Wording.relation, Wording.wording)
                        .where(Wording.relation.in_(wanted)).order_by(Wording.id))
    for r, w in rows:
        out[r].append(w)
    return out


def sharing(conn: Connection, relation: str, wordings: list[str], min_shared: int) -> list[str]:
    """The other relations holding at least `min_shared` of these wordings, those sharing most
    first (then by name)."""
    shared = func.count(Wording.id)
    # Bounded IN list: the relation's own wordings (a few dozen at most in practice).
    mine = sorted(set(wordings))[:1000]
    rows = conn.execute(select(Wording.relation, shared).where(Wording.wording.in_(mine), Wording.relation != relation)
                        .group_by(Wording.relation).having(shared >= min_shared)
                        .order_by(shared.desc(), Wording.relation))
    return [r for r, _ in rows]


def all_pairs(conn: Connection) -> list[tuple[str, str]]:
    """Every (relation, wording), in import order."""
    return [(r, w) for r, w in conn.execute(select(Wording.relation, Wording.wording).order_by(Wording.id))]


def summary(conn: Connection) -> list[tuple[str, int]]:
    """(relation, number of wordings), most wordings first."""
    n = func.count(Wording.id)
    rows = conn.execute(select(Wording.relation, n).group_by(Wording.relation).order_by(n.desc(), Wording.relation))
    return [(r, int(k)) for r, k in rows]
