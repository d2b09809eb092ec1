"""An open ledger database: its URL, plain driver connections for reading, and the SQLAlchemy
engine, created on first use.

The reading commands (`ledger log`, `show`, `status`, ...) must start in a fraction of a
second, and importing SQLAlchemy alone takes longer than that. So a Database reads through a
plain `sqlite3` connection (`sqlite:///PATH`) or `psycopg` connection (`postgresql://`,
`postgresql+psycopg://`), and creates the SQLAlchemy engine (store/engine.py) only when asked
for it: by a write, or by a read the store has not written as SQL text. Once the engine
exists every read goes through it too, so one handle never reads through two kinds of
connection at once. A URL of any other shape (a query string on SQLite, `:memory:`, several
PostgreSQL hosts in the query, a URL that is no URL) is handed to SQLAlchemy from the start,
which opens it or refuses it in one line.

The URL is read as SQLAlchemy reads it (the same pattern and unquoting), connected to with
the arguments SQLAlchemy's dialect would pass the driver, and shown as SQLAlchemy shows it,
so what a command prints does not depend on which kind of connection read it.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import parse_qsl, quote, quote_plus, unquote

from ..errors import InputError, StateError
from .sql import AlchemyConn, Conn, DatabaseError, DriverConn

if TYPE_CHECKING:
    from sqlalchemy import Engine

# sqlalchemy.engine.url._parse_url's pattern, so a URL splits here as it does there.
_URL = re.compile(r"""
    (?P<name>[\w\+]+)://
    (?:
        (?P<username>[^:/]*)
        (?::(?P<password>[^@]*))?
    @)?
    (?:
        (?:
            \[(?P<ipv6host>[^/\?]+)\] |
            (?P<ipv4host>[^/:\?]+)
        )?
        (?::(?P<port>[^/\?]*))?
    )?
    (?:/(?P<database>[^\?]*))?
    (?:\?(?P<query>.*))?
    """, re.X)

_SQLITE = ("sqlite", "sqlite+pysqlite")
_POSTGRESQL = ("postgresql", "postgresql+psycopg")


@dataclass(frozen=True)
class Url:
    """A database URL the plain drivers open, split as SQLAlchemy splits it."""
    drivername: str
    username: str | None
    password: str | None
    host: str | None
    port: int | None
    database: str | None
    query: tuple[tuple[str, str], ...]

    @property
    def backend(self) -> str:
        return "sqlite" if self.drivername in _SQLITE else "postgresql"

    def render(self) -> str:
        """The URL as SQLAlchemy's `render_as_string(hide_password=True)` writes it."""
        s = self.drivername + "://"
        if self.username is not None:
            s += quote(self.username, safe=" +")
            if self.password is not None:
                s += ":***"
            s += "@"
        if self.host is not None:
            s += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            s += ":" + str(self.port)
        if self.database is not None:
            s += "/" + quote(self.database, safe=" +/")
        if self.query:
            s += "?" + "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in self.query)
        return s

    def psycopg_args(self) -> dict[str, Any]:
        """What SQLAlchemy's psycopg dialect passes psycopg.connect for this URL: the set parts
        under libpq's names, then the query's parameters."""
        args: dict[str, Any] = {}
        for key, value in (("host", self.host), ("dbname", self.database), ("user", self.username),
                           ("password", self.password), ("port", self.port)):
            if value:
                args[key] = value
        args.update(self.query)
        return args


def parse(url: str) -> Url | None:
    """The URL, when it is one the plain drivers open as SQLAlchemy would; None for any other
    (SQLAlchemy then opens it or says what is wrong with it)."""
    m = _URL.match(url)
    if m is None:
        return None
    c = m.groupdict()
    name = c["name"]
    if name not in _SQLITE and name not in _POSTGRESQL:
        return None
    port = c["port"]
    if port is not None and not port.isdigit():
        return None
    query: list[tuple[str, str]] = []
    if c["query"] is not None:
        query = parse_qsl(c["query"])
        keys = [k for k, _ in query]
        # SQLite's query options and PostgreSQL's several hosts are SQLAlchemy's to read.
        if name in _SQLITE or len(set(keys)) != len(keys) or "host" in keys or "port" in keys:
            return None
    parts = {k: unquote(c[k]) if c[k] is not None else None for k in ("username", "password", "database")}
    u = Url(drivername=name, username=parts["username"], password=parts["password"],
            host=c["ipv4host"] or c["ipv6host"], port=int(port) if port else None,
            database=parts["database"], query=tuple(sorted(query)))
    if u.backend == "sqlite" and (u.username is not None or u.password is not None or u.host or u.port
                                  or u.database in (None, "", ":memory:")):
        return None
    return u


def check_sqlite_file(database: str, *, create_dir: bool = False) -> None:
    """Refuse a SQLite file that connecting would wrongly create: a missing ledger when opening
    one, or, when creating one, a missing directory other than the ledger's own `.ledger/`
    (which is made)."""
    path = Path(database).expanduser()
    if create_dir and not path.parent.is_dir():
        # Only the ledger's own directory is made (`.ledger/` in an existing directory, as in
        # the default URL); any other missing directory is more likely a typo.
        if path.parent.name == ".ledger" and path.parent.parent.is_dir():
            path.parent.mkdir()
        else:
            raise InputError(f"no directory {path.parent} for the ledger database: create it first")
    elif not create_dir and not path.exists():
        # Connecting would create an empty file; say what is wrong instead.
        raise StateError(f"no ledger database at {path}: run `ledger init` (or pass --db)")


class Database:
    """One ledger database. `reading()` gives a Conn for the store's SQL text queries;
    `engine` is the SQLAlchemy engine, created on first use."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None):
        if url is None and engine is None:
            raise ValueError("a Database needs a URL or an engine")
        self.url = url
        self._engine = engine
        self._plain = parse(url) if url is not None and engine is None else None
        self._idle: list[Any] = []    # plain connections between reads

    @classmethod
    def open(cls, url: str) -> "Database":
        """An existing ledger's database. Refuses what make_engine refuses, the same way: a URL
        the plain drivers do not open goes to it at once."""
        plain = parse(url)
        if plain is None:
            from .engine import make_engine
            return cls(engine=make_engine(url))
        if plain.backend == "sqlite":
            check_sqlite_file(plain.database)
        return cls(url)

    # --- the engine ---------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from .engine import make_engine
            self._engine = make_engine(self.url)
        return self._engine

    @property
    def reads_plain(self) -> bool:
        """Whether reads go through plain driver connections (no engine in use)."""
        return self._plain is not None and self._engine is None

    @property
    def dialect(self) -> str:
        return self._plain.backend if self._plain is not None else self.engine.dialect.name

    # --- reading ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator[Conn]:
        """A connection for one read, in one transaction (one snapshot on SQLite), rolled back
        at the end: a plain one while no engine is in use, else one of the engine's."""
        if not self.reads_plain:
            with self.engine.connect() as c:
                yield AlchemyConn(c)
            return
        raw = self._checkout()
        errors = self._driver_errors()
        try:
            if self._plain.backend == "sqlite":
                try:
                    raw.execute("BEGIN")
                except errors as e:
                    raise DatabaseError(e) from None
            yield DriverConn(raw, self._plain.backend, errors)
        finally:
            self._checkin(raw)

    def unreachable(self, e: DatabaseError) -> bool:
        """Whether a plain connection's error says the database cannot be reached (what
        SQLAlchemy calls an OperationalError)."""
        if self._plain is None:
            return False
        if self._plain.backend == "sqlite":
            import sqlite3
            return isinstance(e.orig, sqlite3.OperationalError)
        import psycopg
        return isinstance(e.orig, psycopg.OperationalError)

    def _driver_errors(self) -> type[BaseException]:
        if self._plain.backend == "sqlite":
            import sqlite3
            return sqlite3.Error
        import psycopg
        return psycopg.Error

    def _connect(self) -> Any:
        """A new plain connection, set up as make_engine sets up the engine's."""
        u = self._plain
        if u.backend == "sqlite":
            import sqlite3
            try:
                # SQLAlchemy's pysqlite dialect opens os.path.abspath(database); the engine's
                # timeout; transactions begun by reading(), not by the driver.
                raw = sqlite3.connect(os.path.abspath(u.database), timeout=60, isolation_level=None,
                                      check_same_thread=False)
                raw.execute("PRAGMA foreign_keys=ON")
                raw.execute("PRAGMA busy_timeout=60000")
                raw.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as e:
                raise DatabaseError(e) from None
            return raw
        import psycopg
        try:
            return psycopg.connect(**u.psycopg_args())
        except psycopg.Error as e:
            raise DatabaseError(e) from None

    def _checkout(self) -> Any:
        while True:
            try:
                raw = self._idle.pop()
            except IndexError:
                return self._connect()
            if self._plain.backend == "sqlite":
                return raw
            # As the engine's pool_pre_ping: a connection the server dropped meanwhile is
            # replaced, not handed out.
            try:
                raw.execute("SELECT 1")
                raw.rollback()
                return raw
            except Exception:  # noqa: BLE001 - any failure: close it and take the next
                with contextlib.suppress(Exception):
                    raw.close()

    def _checkin(self, raw: Any) -> None:
        try:
            if self._plain.backend == "sqlite":
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
            else:
                raw.rollback()
        except Exception:  # noqa: BLE001 - a connection that cannot roll back is not reused
            with contextlib.suppress(Exception):
                raw.close()
            return
        self._idle.append(raw)

    # --- naming it ----------------------------------------------------------------------------

    def render(self) -> str:
        """The URL as the engine shows it: no password."""
        if self._plain is not None:
            return self._plain.render()
        return self.engine.url.render_as_string(hide_password=True)

    def describe(self) -> str:
        """The URL as a user can pass it again from anywhere: no password, and a SQLite file as
        an absolute path."""
        u = self._plain
        if u is None:
            from .engine import describe
            return describe(self.engine)
        if u.backend == "sqlite" and not os.path.isabs(u.database):
            u = Url(u.drivername, u.username, u.password, u.host, u.port, os.path.abspath(u.database), u.query)
        return u.render()

    def close(self) -> None:
        """Close the plain connections and dispose of the engine, if one was made."""
        while self._idle:
            with contextlib.suppress(Exception):
                self._idle.pop().close()
        if self._engine is not None:
            self._engine.dispose()

