"""Engines, transactions and the schema's migration state.

SQLite (the embedded default): WAL so readers never block the writer, foreign keys on, a
busy timeout, and every write transaction opened with BEGIN IMMEDIATE so two writers queue
on the lock instead of failing half-way. PostgreSQL: every write transaction first takes one
transaction-scoped advisory lock, which serialises appends to the ledger across processes.

SQLAlchemy is imported inside the functions that use it: the reading commands open a
Database (database.py) and check its schema here without it.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import InputError, SchemaError, StateError
from .database import Database, check_sqlite_file
from .sql import Conn, DatabaseError

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from sqlalchemy.engine import URL

DEFAULT_FILE = ".ledger/ledger.db"
DEFAULT_URL = "sqlite:///" + DEFAULT_FILE
_WRITE_LOCK_KEY = 0x42AF7_1ED6  # any constant: one advisory lock for the whole ledger


def database_url(url: str | None, *, search: bool = False) -> str:
    """The URL given, else LEDGER_DB, else the default SQLite file. With `search` (opening a
    ledger, not creating one), the default is the `.ledger/ledger.db` of the working directory
    or, as git finds `.git/`, of the nearest parent directory that has one."""
    if url or os.environ.get("LEDGER_DB"):
        return url or os.environ["LEDGER_DB"]
    if search:
        here = Path.cwd()
        for d in (here, *here.parents):
            if (d / DEFAULT_FILE).is_file():
                return "sqlite:///" + str(d / DEFAULT_FILE) if d != here else DEFAULT_URL
    return DEFAULT_URL


SUPPORTED_URLS = "sqlite:///PATH, postgresql:// or postgresql+psycopg://"
# The (dialect, driver) pairs the ledger runs and is tested on; postgresql:// means psycopg.
_SUPPORTED_DRIVERS = {("sqlite", "pysqlite"), ("postgresql", "psycopg")}
# The package to install for a driver module, where the two names differ.
_DRIVER_PACKAGES = {"MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "psycopg2": "psycopg2 (or psycopg2-binary)",
                    "mysql": "mysql-connector-python", "cx_Oracle": "cx-Oracle"}


def describe(engine: Engine) -> str:
    """The engine's URL as a user can pass it again from anywhere: no password, and a SQLite
    file as an absolute path."""
    u = engine.url
    if u.get_backend_name() == "sqlite" and u.database and not os.path.isabs(u.database):
        u = u.set(database=os.path.abspath(u.database))
    return u.render_as_string(hide_password=True)


def check_supported(u: URL) -> None:
    """Refuse, in one line, a URL of a database or driver the ledger does not run on, naming
    the schemes it supports and, for a known scheme, the driver package that scheme needs."""
    from sqlalchemy.exc import NoSuchModuleError
    scheme = u.drivername
    shown = u.render_as_string(hide_password=True)
    try:
        dialect = u.get_dialect()
    except NoSuchModuleError:
        hint = ""
        if u.get_backend_name() == "postgres":
            hint = f"; write postgresql{scheme[len('postgres'):]}:// instead of {scheme}://"
        raise InputError(f"--db {shown!r}: unknown database scheme {scheme}://{hint}; "
                         f"supported: {SUPPORTED_URLS}") from None
    if (dialect.name, dialect.driver) in _SUPPORTED_DRIVERS:
        return
    try:
        dialect.import_dbapi()
        driver = ""
    except ImportError as e:
        module = (e.name or dialect.driver).split(".")[0]
        driver = f" and needs the driver package {_DRIVER_PACKAGES.get(module, module)}, which is not installed"
    raise InputError(f"--db {shown!r}: {scheme}:// is not supported{driver}; supported: {SUPPORTED_URLS}")


def make_engine(url: str, *, create_dir: bool = False) -> Engine:
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        u = make_url(url)
    except ArgumentError:
        raise InputError(f"--db {url!r} is not a database URL (e.g. sqlite:///path/ledger.db)") from None
    check_supported(u)
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:":
            check_sqlite_file(db, create_dir=create_dir)
        try:
            engine = create_engine(u, connect_args={"timeout": 60})
        except (ArgumentError, NoSuchModuleError) as e:
            raise InputError(f"--db {url!r}: {e}") from None

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # Let SQLAlchemy, not the driver, decide when transactions begin.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            if db and db != ":memory:":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection):
            immediate = conn.get_execution_options().get("ledger_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    try:
        return create_engine(u, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as e:
        raise InputError(f"--db {url!r}: {e}") from None


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One serialised write transaction: all of it commits, or none of it does."""
    from sqlalchemy import text
    with engine.connect().execution_options(ledger_write=True) as conn:
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _WRITE_LOCK_KEY})
            yield conn


@contextlib.contextmanager
def writer_lock(engine: Engine) -> Iterator[None]:
    """Queue writers of one ledger for the whole of train-then-commit.

    An edit must be trained in the composition it is committed on, so two writers training
    at once would waste one training run. PostgreSQL: an advisory lock (pg_advisory_lock) on a
    connection held for the duration. SQLite: an exclusive flock on `<db>.writer-lock` next to
    the database. Both are released by the OS or server if the process dies. Readers never
    wait on it; the head check inside the commit transaction stays as the safety net.
    """
    if engine.dialect.name == "postgresql":
        from sqlalchemy import text
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _WRITE_LOCK_KEY + 1})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _WRITE_LOCK_KEY + 1})
                conn.commit()
        return
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    if not db or db == ":memory:":
        yield
        return
    import fcntl
    with open(f"{db}.writer-lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- migrations -------------------------------------------------------------------------------

def alembic_config(url: str | None = None):
    """An alembic Config that finds the packaged migrations, installed or not."""
    from alembic.config import Config
    import migrations
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# Every command checks the schema before it reads: these two read the migration files and the
# version table directly, because importing alembic and loading its script directory would
# cost each command more than its own work. Anything unusual is left to alembic.
_MIGRATION_LINE = re.compile(r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.M)


def head_revision() -> str:
    """The newest migration: the one revision no other migration names as its down_revision."""
    import ast

    import migrations
    revisions, parents = set(), set()
    for path in (Path(migrations.__file__).parent / "versions").glob("*.py"):
        found = dict(_MIGRATION_LINE.findall(path.read_text(encoding="utf-8")))
        if "revision" not in found:
            continue
        try:
            revisions.add(ast.literal_eval(found["revision"]))
            down = ast.literal_eval(found.get("down_revision", "None"))
        except (ValueError, SyntaxError):
            return _alembic_head()
        if isinstance(down, str):
            parents.add(down)
        elif down is not None:   # a merge migration: alembic knows how to read it
            return _alembic_head()
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else _alembic_head()


def _alembic_head() -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _database(db: Engine | Database) -> Database:
    return db if isinstance(db, Database) else Database(engine=db)


def check_reachable(db: Engine | Database) -> None:
    """Refuse, in one line, a database the driver cannot connect to."""
    db = _database(db)
    if db.reads_plain:
        try:
            with db.reading() as conn:
                conn.scalar("SELECT 1")
        except DatabaseError as e:
            if db.unreachable(e):
                raise StateError(f"cannot reach the database {db.render()}: {e.first_line}") from None
            raise
        return
    from sqlalchemy.exc import OperationalError
    try:
        with db.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except OperationalError as e:
        first = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
        raise StateError(f"cannot reach the database {db.render()}: {first}") from None


# Whether a table exists, as SQLAlchemy's inspector asks each database: SQLite's catalogue of
# the main schema; PostgreSQL's tables (and views) visible on the search path.
_HAS_TABLE = {
    "sqlite": "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = :name",
    "postgresql": "SELECT 1 FROM pg_catalog.pg_class c WHERE c.relname = :name "
                  "AND c.relkind IN ('r', 'p', 'f', 'v', 'm') AND pg_catalog.pg_table_is_visible(c.oid)",
}


def _has_table(conn: Conn, name: str) -> bool:
    return conn.scalar(_HAS_TABLE[conn.dialect], name=name) is not None


def has_ledger_tables(db: Engine | Database) -> bool:
    with _database(db).reading() as conn:
        return _has_table(conn, "alembic_version")


def current_revision(db: Engine | Database) -> str | None:
    """The database's migration (None: not migrated), from alembic's version table."""
    db = _database(db)
    with db.reading() as conn:
        if not _has_table(conn, "alembic_version"):
            return None
        rows = conn.column("SELECT version_num FROM alembic_version")
    if len(rows) > 1:   # several heads: alembic's reader reports it
        from alembic.runtime.migration import MigrationContext
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    return rows[0] if rows else None


def upgrade(engine: Engine, target: str = "head") -> None:
    from alembic import command
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, target)


def downgrade(engine: Engine, target: str) -> None:
    from alembic import command
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, target)


def check_schema(db: Engine | Database) -> None:
    """Refuse to work on a database that is not at this version's head migration, changing nothing."""
    db = _database(db)
    check_reachable(db)
    if not has_ledger_tables(db):
        raise StateError(f"no ledger in {db.render()}: run `ledger init`")
    current, head = current_revision(db), head_revision()
    if current != head:
        raise SchemaError(f"the database schema is at {current or 'nothing'}, this version needs {head}: "
                          "run `ledger db upgrade`")
