"""
The registry database: where it is, how to connect, the schema version, migrations and the one
session scope that owns transactions and turns driver errors into `registry.errors` exceptions.

Connections (SQLite): WAL journal (readers never block the writer), `busy_timeout` (a writer waits
for another instead of failing), `foreign_keys=ON`, `synchronous=NORMAL`, all set in a connect
event. pysqlite's own implicit transactions are switched off and we emit BEGIN ourselves: reads use
a deferred BEGIN (one consistent snapshot), writes use BEGIN IMMEDIATE, which takes the write lock up
front. Without that, a transaction that read first and writes later can fail at once with "database
is locked" when another process committed in between (SQLite cannot upgrade a stale snapshot, and
the busy timeout does not apply). PostgreSQL needs none of that; there the scanner serialises writes
to one run with a row lock on the run (`lock_run`), and deadlocks or serialization failures are
retried by `write`.

Read-only (SQLite): a registry whose file or folder we cannot write, or one opened with `read_only=True`
(the CLI's read commands), is opened with SQLite's `mode=ro`, and with `immutable=1` when its folder is not
writable and no WAL file holds commits (`mode=ro` must create the -shm file, which a read-only folder
forbids; with a non-empty -wal, immutable would hide its commits, so `mode=ro` reads it through the
existing -shm). Reads work; a write raises `RegistryReadOnlyError` naming the reason, before any SQL.

Which registry opens is decided once, by `locate` (the CLI's --db and the app's --db / --base-dir / demo
default go through it). The schema version lives in the `registry_info` table. An empty database is created (when allowed);
an older one is refused with the exact `python -m registry migrate` command; a newer one or a database
that is not a registry is refused with a clear message. Nothing here ever drops a table's data: the one
table ever rebuilt is `runs` on SQLite by migration 4 (SQLite cannot drop a UNIQUE constraint), copied row
for row in the migration's transaction after the backup copy.

This module knows nothing about runs or checkpoints beyond creating their tables (see `store.py`).
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from nanochat.common import DEFAULT_BASE_DIR
from registry.errors import (
    NotARegistryError,
    RegistryBusyError,
    RegistryDatabaseError,
    RegistryError,
    RegistryNotFoundError,
    RegistryReadOnlyError,
    SchemaTooNewError,
    SchemaTooOldError,
)
from registry.models import Base, DatasetShard, RegistryInfo, Run, ShardTokenCount, TokenizerCheck

# 2: dataset_shards and shard_token_counts (the dataset inspector's cache); 3: eval_results
# 4: tokenizer_checks and runs.tokenizer_check_id (each run's token_bytes verdict)
# 5: runs and scans get an origin (the machine that indexed them), a run is unique per (origin, path)
SCHEMA_VERSION = 5
APPLICATION = "nanochat-workbench registry"
ENV_URL = "NANOCHAT_REGISTRY_URL"
ENV_BASE = "NANOCHAT_BASE_DIR"  # nanochat's own base-dir variable (nanochat.common.get_base_dir)
DEFAULT_FILENAME = "registry.sqlite"
BUSY_TIMEOUT_MS = 30_000


def _add_dataset_tables(conn: Connection) -> None:
    Base.metadata.create_all(conn, tables=[DatasetShard.__table__, ShardTokenCount.__table__])


def _add_eval_results(conn: Connection) -> None:
    """Version 3 adds eval_results (evaluations imported from upstream's logs and base_eval CSVs)."""
    from registry.models import EvalResult

    EvalResult.__table__.create(conn)


def _add_tokenizer_checks(conn: Connection) -> None:
    """Version 4 adds each run's token_bytes verdict (tokenizer_checks, runs.tokenizer_check_id)."""
    Base.metadata.create_all(conn, tables=[TokenizerCheck.__table__])
    # a nullable column with no default: SQLite and PostgreSQL both add it without rewriting the table
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN tokenizer_check_id INTEGER REFERENCES tokenizer_checks (id)"))


def _add_origins(conn: Connection) -> None:
    """Version 5: `runs.origin` and `scans.origin`, and runs unique per (origin, path) instead of per path.
    Existing runs get origin '' ("any": the next scan that finds the folder claims it for its origin)."""
    conn.exec_driver_sql("ALTER TABLE scans ADD COLUMN origin VARCHAR(255) DEFAULT '' NOT NULL")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN origin VARCHAR(255) DEFAULT '' NOT NULL")
        names = conn.exec_driver_sql(
            "SELECT c.conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY(c.conkey) "
            "WHERE t.relname = 'runs' AND t.relnamespace = to_regnamespace(current_schema()) AND c.contype = 'u' "
            "AND array_length(c.conkey, 1) = 1 AND a.attname = 'path'").scalars().all()
        for name in names:
            conn.exec_driver_sql(f'ALTER TABLE runs DROP CONSTRAINT "{name}"')
        conn.exec_driver_sql("ALTER TABLE runs ADD CONSTRAINT uq_runs_origin_path UNIQUE (origin, path)")
        return
    # SQLite: rebuild runs (Database.migrate runs this with foreign keys off, and checks them before committing)
    table_sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'runs'").scalar_one()
    indexes = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' "
                                   "AND sql IS NOT NULL").scalars().all()
    columns = [row[1] for row in conn.exec_driver_sql("PRAGMA table_info(runs)")]
    head = re.compile(r'^CREATE TABLE\s+"?runs"?\s*\(')  # quoted once SQLite has renamed the table
    unique = "UNIQUE (path)"
    if not head.match(table_sql) or table_sql.count(unique) != 1:
        raise RegistryError("cannot migrate: the runs table is not the one schema 4 created")
    new_sql = head.sub("CREATE TABLE runs_v4 (\n\torigin VARCHAR(255) DEFAULT '' NOT NULL, ", table_sql) \
        .replace(unique, "CONSTRAINT uq_runs_origin_path UNIQUE (origin, path)")
    conn.exec_driver_sql(new_sql)
    listed = ", ".join(columns)
    conn.exec_driver_sql(f"INSERT INTO runs_v4 ({listed}, origin) SELECT {listed}, '' FROM runs")
    conn.exec_driver_sql("DROP TABLE runs")
    conn.exec_driver_sql("ALTER TABLE runs_v4 RENAME TO runs")
    for sql in indexes:
        conn.exec_driver_sql(sql)


# from_version -> function(connection) that upgrades the schema to from_version + 1, inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _add_dataset_tables, 2: _add_eval_results, 3: _add_tokenizer_checks,
                                                        4: _add_origins}
_PG_SCHEMA_LOCK = 0x6E616E6F  # advisory lock id serialising schema creation and migration on PostgreSQL
_RETRYABLE_PG = {"40P01", "40001", "55P03"}  # deadlock, serialization failure, lock not available


@dataclass(frozen=True)
class RegistryLocation:
    """Which registry to open, and why (see `locate`)."""

    url: str  # a SQLite path or a database URL, as open_store takes it
    source: str  # the setting that chose it: "--db", "--base-dir", "$NANOCHAT_REGISTRY_URL", ... or the default's name
    scan_default: str  # the folder a scan starts at: the base dir, else the SQLite file's folder
    problem: str | None = None  # why it cannot be opened as it stands (a folder that does not exist); None: try it


def locate(db: str | None = None, base_dir: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
           default_base: str | os.PathLike = DEFAULT_BASE_DIR, default_source: str = "default",
           default_missing: str | None = None) -> RegistryLocation:
    """The one rule for which registry opens (the CLI passes --db; the app --db, --base-dir and the demo):
    `db` (a URL or a SQLite path), else `base_dir`/registry.sqlite, else $NANOCHAT_REGISTRY_URL, else
    $NANOCHAT_BASE_DIR/registry.sqlite, else `default_base`/registry.sqlite (`default_missing`: the
    problem to report when that file does not exist yet). Scans start at the base dir (`base_dir`, else
    $NANOCHAT_BASE_DIR), else at the SQLite file's folder. Never raises: a bad setting is `problem`."""
    env = os.environ if environ is None else environ
    base_env = Path(env[ENV_BASE]).expanduser() if env.get(ENV_BASE) else None
    base_flag = Path(base_dir).expanduser() if base_dir is not None else None
    if base_flag is not None and db is None:
        if not base_flag.is_dir():
            return RegistryLocation(str(base_flag / DEFAULT_FILENAME), "--base-dir", str(base_flag),
                                    f"--base-dir {base_flag} does not exist: give the folder that holds base_checkpoints/")
        return _sqlite_location(base_flag / DEFAULT_FILENAME, "--base-dir", base_flag)
    if db is not None or env.get(ENV_URL):
        source = "--db" if db is not None else f"${ENV_URL}"
        url = db if db is not None else env[ENV_URL]
        scan = base_flag or base_env
        if "://" in url:
            return RegistryLocation(url, source, str(scan or DEFAULT_BASE_DIR.expanduser()))
        return _sqlite_location(Path(url), source, scan or Path(url).expanduser().parent)
    if base_env is not None:
        if not base_env.is_dir():
            return RegistryLocation(str(base_env / DEFAULT_FILENAME), f"${ENV_BASE}", str(base_env),
                                    f"${ENV_BASE}={base_env} does not exist")
        return _sqlite_location(base_env / DEFAULT_FILENAME, f"${ENV_BASE}", base_env)
    base = Path(default_base).expanduser()
    return _sqlite_location(base / DEFAULT_FILENAME, default_source, base, missing=default_missing)


def _sqlite_location(path: Path, source: str, scan_default: Path, missing: str | None = None) -> RegistryLocation:
    path = path.expanduser()
    problem = None
    if missing and not path.exists():
        problem = missing
    elif not path.parent.is_dir():
        problem = f"{path.parent} does not exist (from {source}): create it or point at an existing folder"
    return RegistryLocation(str(path), source, str(scan_default.expanduser()), problem)


def _not_writable(path: Path) -> str | None:
    """Why this process cannot write the SQLite file (None: it can): the file, or its folder (SQLite creates
    its -wal, -shm or -journal file beside the database)."""
    if not os.access(path, os.W_OK):
        return f"{path.name} is not writable"
    if not os.access(path.parent, os.W_OK):
        return f"its folder {path.parent} is not writable"
    return None


def _read_only_uri(path: Path, immutable: bool) -> str:
    """A SQLite URI that opens `path` without ever writing: immutable when asked and no WAL file holds commits."""
    wal = path.with_name(path.name + "-wal")
    immutable = immutable and not (wal.exists() and wal.stat().st_size > 0)
    return f"file:{urllib.parse.quote(str(path))}?{'immutable=1' if immutable else 'mode=ro'}"


def default_url() -> str:
    """The registry to open when none is given: `locate()` (a CLI without --db)."""
    return locate().url


def to_url(url_or_path: str | os.PathLike | None) -> URL:
    """A SQLAlchemy URL from a URL string, a plain path (SQLite at that path) or None (the default)."""
    raw = os.fspath(url_or_path) if url_or_path is not None else default_url()
    if "://" in raw:
        try:
            return make_url(raw)
        except sa.exc.ArgumentError as e:
            raise RegistryError(f"invalid database URL {raw!r}: {e}") from None
    return URL.create("sqlite", database=str(Path(raw).expanduser().resolve()))


def named_placeholder(dialect: str) -> Callable[[str], str]:
    """The driver's own named-parameter style for plain SQL run with `exec_driver_sql` (the scanner's
    writes, metric points): sqlite3 takes :name, psycopg takes %(name)s."""
    return (lambda n: f"%({n})s") if dialect == "postgresql" else (lambda n: f":{n}")


class Database:
    """An engine plus the session scope, schema check and migrations. One per process and URL."""

    def __init__(self, url_or_path: str | os.PathLike | None = None, create: bool = True, read_only: bool = False):
        """read_only=True: never write (SQLite: opened `mode=ro`). A SQLite registry we cannot write is opened
        read-only whatever is asked; `self.read_only` then says why (None: we could write it)."""
        self.url = to_url(url_or_path)
        self.read_only: str | None = None
        self.reads_only = read_only
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise RegistryError(f"unsupported database {self.url.drivername!r}: use a SQLite path or a postgresql+psycopg:// URL")
        self.display_url = self.url.render_as_string(hide_password=True)
        self.path: Path | None = None
        if self.dialect == "sqlite":
            self.engine = self._sqlite_engine(create, read_only)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        self._write_engine = self.engine.execution_options(registry_begin="IMMEDIATE")

    def _sqlite_engine(self, create: bool, read_only: bool) -> sa.Engine:
        database = self.url.database or ""
        if database in ("", ":memory:"):
            engine = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            self.path = Path(database)
            if self.path.is_dir():
                raise NotARegistryError(f"{self.path} is a directory, not a registry database file")
            if not self.path.exists():
                if not create:
                    raise RegistryNotFoundError(f"no registry at {self.path} (scan a folder first: "
                                                f"python -m registry --db {self.path} scan PATH)")
                self.path.parent.mkdir(parents=True, exist_ok=True)
            why = _not_writable(self.path) if self.path.exists() else None
            if why or read_only:
                self.read_only, self.reads_only = why, True
                uri = _read_only_uri(self.path, immutable=why is not None and not os.access(self.path.parent, os.W_OK))
                connect = lambda: sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
                engine = sa.create_engine(self.url, creator=connect)
            else:
                engine = sa.create_engine(self.url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see the module docstring)
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection):
            connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get('registry_begin', 'DEFERRED')}")

        return engine

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ sessions

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on any exception, maps driver errors."""
        if write:
            self._check_writable()
        try:
            with Session(self._write_engine if write else self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except sa.exc.DBAPIError as e:
            raise self.translate(e) from None

    def write(self, fn: Callable[[Session], object], attempts: int = 8):
        """Run fn(session) in a write transaction, retrying PostgreSQL deadlocks and serialization failures."""
        self._check_writable()
        for attempt in range(attempts):
            try:
                with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except sa.exc.DBAPIError as e:
                if attempt + 1 < attempts and self._retryable(e):
                    time.sleep(random.uniform(0.01, 0.05) * (2 ** attempt))
                    continue
                raise self.translate(e) from None
        raise AssertionError("unreachable")

    def _check_writable(self) -> None:
        if self.reads_only:
            raise RegistryReadOnlyError(f"the registry {self.path} is read-only ({self.read_only or 'opened for reading'}): reading works; "
                                        "scanning, checks and imports need a registry you can write (--db another file)")

    def lock_run(self, session: Session, run_id: int) -> None:
        """Serialise writers of one run. SQLite's BEGIN IMMEDIATE already excludes every other writer."""
        self.lock_runs(session, [run_id])

    def lock_runs(self, session: Session, run_ids) -> None:
        """Row locks on several runs, taken in id order so two writers can never wait on each other."""
        if self.dialect == "postgresql" and run_ids:
            session.execute(sa.select(Run.id).where(Run.id.in_(sorted(run_ids))).order_by(Run.id).with_for_update())

    def sql(self, statement: str) -> str:
        """A statement written with ? placeholders in this driver's style (psycopg: %s)."""
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    def insert(self, table):
        """The dialect's INSERT, which has on_conflict_do_nothing / on_conflict_do_update."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def _retryable(self, e: sa.exc.DBAPIError) -> bool:
        return getattr(e.orig, "sqlstate", None) in _RETRYABLE_PG

    def translate(self, e: sa.exc.DBAPIError) -> RegistryError:
        text = str(e.orig if e.orig is not None else e).strip()
        msg = text.splitlines()[0] if text else type(e).__name__
        where = self.path or self.display_url
        if "database is locked" in msg or "database table is locked" in msg:
            return RegistryBusyError(f"the registry {where} stayed locked by another writer for "
                                     f"{BUSY_TIMEOUT_MS // 1000}s; try again")
        if "file is not a database" in msg or "file is encrypted" in msg:
            return NotARegistryError(f"{where} is not a SQLite database, so not a registry")
        if "unable to open database file" in msg:
            return RegistryDatabaseError(f"cannot open the registry {where} (check the folder exists and is writable)")
        if "readonly database" in msg:
            return RegistryDatabaseError(f"the registry {where} is read-only: {msg}")
        if self.dialect == "postgresql" and (e.connection_invalidated or "connection" in msg.lower()):
            return RegistryDatabaseError(f"cannot reach the registry database {self.display_url}: {msg}")
        return RegistryDatabaseError(f"registry database error ({where}): {msg}")

    # ------------------------------------------------------------------ schema

    def _state(self, conn: Connection) -> tuple[str, int | None, list[str]]:
        """("empty" | "registry" | "foreign", schema version, table names)."""
        tables = sorted(sa.inspect(conn).get_table_names())
        if not tables:
            return "empty", None, tables
        if RegistryInfo.__tablename__ not in tables:
            return "foreign", None, tables
        rows = dict(conn.execute(sa.select(RegistryInfo.key, RegistryInfo.value)).all())
        try:
            version = int(rows.get("schema_version", ""))
        except ValueError:
            return "foreign", None, tables
        return "registry", version, tables

    def _inspect(self) -> tuple[str, int | None, list[str]]:
        try:
            with self.engine.connect() as conn:
                return self._state(conn)
        except sa.exc.DBAPIError as e:
            raise self.translate(e) from None

    def ensure_schema(self, create: bool = True) -> int:
        """Check (or create) the schema; return its version. Raises for foreign, old or new schemas."""
        state, version, tables = self._inspect()
        if state == "empty":
            if not create:
                raise RegistryNotFoundError(f"{self.path or self.display_url} holds no registry yet "
                                            "(scan a folder first: python -m registry scan PATH)")
            self._create()
            state, version, tables = self._inspect()
        if state == "foreign":
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise NotARegistryError(f"{self.path or self.display_url} is a database but not a nanochat registry "
                                    f"(it holds tables {shown}); point --db at another file")
        assert version is not None
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(f"the registry {self.path or self.display_url} has schema version {version}, newer "
                                    f"than this code's {SCHEMA_VERSION}: upgrade nanochat-workbench to use it")
        if version < SCHEMA_VERSION:
            raise SchemaTooOldError(f"the registry {self.path or self.display_url} has schema version {version}, older than "
                                    f"this code's {SCHEMA_VERSION}: run `{self.migrate_command()}` to migrate it")
        self._ensure_wal()
        return version

    def migrate_command(self) -> str:
        target = str(self.path) if self.path else self.display_url
        return f"python -m registry --db {target} migrate"

    def _create(self) -> None:
        self._ensure_wal()

        def create(session: Session) -> None:
            conn = session.connection()
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            if self._state(conn)[0] != "empty":
                return  # another process created it while we waited for the lock
            Base.metadata.create_all(conn)
            conn.execute(sa.insert(RegistryInfo), [
                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                {"key": "application", "value": APPLICATION},
                {"key": "created_at", "value": f"{time.time():.3f}"},
            ])

        self.write(create)

    def _ensure_wal(self) -> None:
        """Switch a SQLite registry to WAL (persistent in the file). Never called on foreign files."""
        if self.dialect != "sqlite" or self.path is None or self.reads_only:
            return
        for attempt in range(50):
            raw = self.engine.raw_connection()
            try:
                mode = raw.driver_connection.execute("PRAGMA journal_mode").fetchone()[0]
                if mode.lower() != "wal":
                    raw.driver_connection.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 49:
                    raise RegistryBusyError(f"cannot switch {self.path} to WAL mode: {e}") from None
                time.sleep(0.1)
            finally:
                raw.close()

    def schema_version(self) -> int | None:
        return self._inspect()[1]

    def migrate(self) -> tuple[int, int, Path | None]:
        """Upgrade an older schema in place (SQLite: after a backup copy). Returns (from, to, backup)."""
        state, version, _ = self._inspect()
        if state == "empty":
            raise RegistryNotFoundError(f"{self.path or self.display_url} holds no registry to migrate")
        if state == "foreign":
            raise NotARegistryError(f"{self.path or self.display_url} is not a nanochat registry; nothing to migrate")
        assert version is not None
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(f"the registry has schema version {version}, newer than this code's {SCHEMA_VERSION}: "
                                    "upgrade nanochat-workbench instead")
        if version == SCHEMA_VERSION:
            return version, version, None
        missing = [v for v in range(version, SCHEMA_VERSION) if v not in MIGRATIONS]
        if missing:
            raise RegistryError(f"no migration from schema version {missing[0]}; this registry cannot be upgraded")
        backup = self._backup(version)

        def upgrade(conn: Connection) -> None:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            current = self._state(conn)[1]
            assert current is not None
            for v in range(current, SCHEMA_VERSION):
                MIGRATIONS[v](conn)
            if self.dialect == "sqlite" and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").all()):
                raise RegistryError(f"migration left {len(broken)} dangling reference(s) (first in {broken[0][0]}); "
                                    "nothing was changed")
            conn.execute(sa.update(RegistryInfo).where(RegistryInfo.key == "schema_version")
                         .values(value=str(SCHEMA_VERSION)))

        if self.dialect == "sqlite":
            self._sqlite_without_foreign_keys(upgrade)
        else:
            self.write(lambda session: upgrade(session.connection()))
        return version, SCHEMA_VERSION, backup

    def _sqlite_without_foreign_keys(self, fn: Callable[[Connection], None]) -> None:
        """fn(connection) in one write transaction with foreign-key enforcement off, as SQLite's documented
        table rebuild needs (dropping a table that others reference); the pragma only changes outside a
        transaction, so it is set before BEGIN and restored after. fn checks the references itself."""
        try:
            with self._write_engine.connect() as conn:
                raw = conn.connection.driver_connection
                raw.execute("PRAGMA foreign_keys = OFF")
                try:
                    with conn.begin():
                        fn(conn)
                finally:
                    raw.execute("PRAGMA foreign_keys = ON")
        except sa.exc.DBAPIError as e:
            raise self.translate(e) from None

    def _backup(self, version: int) -> Path | None:
        if self.path is None:
            return None
        target = self.path.with_name(f"{self.path.name}.v{version}.bak")
        src = sqlite3.connect(self.path)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # consistent copy even with other readers attached
        finally:
            dst.close()
            src.close()
        return target
