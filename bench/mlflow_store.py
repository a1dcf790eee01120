"""A sqlite MLflow store that a kill or a concurrent driver cannot brick.

MLflow builds a fresh sqlite store in place, in dozens of schema migrations that sqlite cannot wrap in one
transaction: a ``kill -9`` in the middle leaves a half-built ``mlflow.db`` (a leftover ``_alembic_tmp_*`` table, a
schema version short of head) that every later launch fails on, and several processes creating one store at once
race through the same migrations. Here a store is built under a temporary name beside its final one
(``mlflow.db.creating-<pid>-<random>``) and renamed into place only once MLflow has fully initialised it, all under a lock
file, so the final name only ever holds a complete store. A store that exists but is damaged (unreadable, not at
MLflow's schema head, migration leftovers, missing tables) is moved aside as ``mlflow.db.broken-<time>`` and built
afresh; the sweep driver then mirrors every ended trial again from the trial folders, which are the source of
truth. A store at an older schema revision (made by an older MLflow) is upgraded on a copy, renamed into place
the same way.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .locks import FileLock

CREATING = ".creating-"
"""Infix of a store being built: ``mlflow.db.creating-<pid>-<random>``. Only a killed build leaves one behind."""
BROKEN = ".broken-"
"""Infix of a damaged store moved aside: ``mlflow.db.broken-<YYYYmmdd-HHMMSS>-<pid>``."""
LOCK_DIR = ".locks"
"""The folder of lock files beside a sqlite store (and in a sweep's output folder)."""
BUSY_TIMEOUT_S = 60.0
"""How long a check waits for another process's sqlite write lock before giving up."""

_SIDE_FILES = ("-journal", "-wal", "-shm")  # sqlite's companions of a database file, named after it


@dataclass(frozen=True)
class StoreState:
    """What ``ensure_store`` found and did.

    Attributes:
        action: ``ok`` (healthy, untouched), ``created``, ``upgraded`` or ``rebuilt``.
        reason: why a store was upgraded or rebuilt ('' otherwise).
        broken: where a damaged store was moved (None unless rebuilt).
    """

    action: str
    reason: str = ""
    broken: Path | None = None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI; None for servers, other databases and in-memory sqlite.

    Args:
        uri: an MLflow tracking URI.

    Returns:
        The absolute path (a relative one is taken from the current directory, as sqlite does).
    """
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def store_lock(db: Path) -> Path:
    """The lock file held while ``db`` is checked, created or upgraded."""
    return db.parent / LOCK_DIR / f"{db.name}.store.lock"


def ensure_store(db: Path) -> StoreState:
    """Make ``db`` a complete MLflow store at the installed MLflow's schema head, safely against kills and races.

    Args:
        db: the sqlite file of the tracking URI (see ``sqlite_file``).

    Returns:
        What was found and done.

    Raises:
        UserError: the store's folder cannot be written, the store is held locked by another process for longer
            than ``BUSY_TIMEOUT_S``, or it was made by a newer MLflow than the one installed.
    """
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(db.parent, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise UserError(f"cannot write the MLflow store's folder {db.parent}; choose another --out or set "
                        "MLFLOW_TRACKING_URI to a writable place")  # fmt: skip
    with FileLock(store_lock(db)):
        for stale in db.parent.glob(f"{db.name}{CREATING}*"):  # a build killed before its rename; we hold the lock
            stale.unlink(missing_ok=True)
        if not db.exists():
            _build(db)
            _reconnect(db)
            return StoreState("created")
        problem = _problem(db)
        if problem is None:
            return StoreState("ok")
        reason, upgradable = problem
        if upgradable:
            try:
                _upgrade(db)
                _reconnect(db)
                print(f"MLflow store {db}: {reason}; upgraded it", file=sys.stderr)
                return StoreState("upgraded", reason)
            except Exception as e:  # a half-applied old migration: the copy is dropped, the store rebuilt below
                reason = f"{reason}; upgrading it failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        broken = _move_aside(db)
        print(f"MLflow store {db} is damaged ({reason}); moved it to {broken.name} and building a new one "
              "(the sweep mirrors its trials again from their folders)", file=sys.stderr)  # fmt: skip
        _build(db)
        _reconnect(db)
        return StoreState("rebuilt", reason, broken)


def problem(db: Path) -> str | None:
    """Why ``db`` is not a complete store at the installed MLflow's schema head, or None if it is one."""
    found = _problem(db)
    return None if found is None else found[0]


def _problem(db: Path) -> tuple[str, bool] | None:
    """``(reason, upgradable)`` for a store that needs work, None for a healthy one."""
    head, expected, known = _schema()
    try:
        # mode=rw: never create the file; opening also rolls back a hot journal a killed writer left.
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.OperationalError as e:
        raise UserError(f"cannot open the MLflow store {db}: {e}") from None
    try:
        check = con.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            return f"sqlite reports it malformed: {check[0][0] if check else 'no answer'}", False
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
        if leftovers:
            return f"a migration was cut short: table {leftovers[0]} is left", False
        if "alembic_version" not in tables:
            return "it has no schema version (not an MLflow store, or its creation was cut short)", False
        versions = [row[0] for row in con.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise UserError(f"the MLflow store {db} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s; "
                            "stop that process or wait for it, then run again") from None  # fmt: skip
        return f"sqlite cannot read it: {e}", False
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        return f"sqlite cannot read it: {e}", False
    finally:
        con.close()
    if len(versions) != 1:
        return f"its schema version table holds {len(versions)} rows", False
    (version,) = versions
    if head is not None and version != head:
        if known is not None and version not in known:
            raise UserError(f"the MLflow store {db} has schema version {version}, which the installed MLflow does "
                            "not know (a newer MLflow made it); upgrade mlflow or use another store")  # fmt: skip
        return f"schema version {version}, not the installed MLflow's {head}", True
    missing = sorted(expected - tables)
    if missing:
        return f"tables missing: {', '.join(missing[:5])}", False
    return None


def _schema() -> tuple[str | None, set[str], set[str] | None]:
    """The installed MLflow's schema head, the tables its models define, and every revision it knows.

    These live in MLflow's internals (``mlflow.store.db``); where a future MLflow moves them, the checks that need
    them are skipped rather than failing every launch.
    """
    try:
        from mlflow.store.db import utils
        from mlflow.store.db.base_sql_model import Base

        head = utils._get_latest_schema_revision()
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(utils._get_alembic_config(db_url=""))
        known = {rev.revision for rev in script.walk_revisions()}
        return head, set(Base.metadata.tables), known
    except (ImportError, AttributeError):  # pragma: no cover - MLflow internals moved
        return None, set(), None


def _creating(db: Path) -> Path:
    # Unique per build, not just per process: MLflow caches a store object per URI, and a second build in one
    # process under the same name would get the first one's, which believes its tables exist.
    return db.with_name(f"{db.name}{CREATING}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _build(db: Path) -> None:
    """A fresh, fully migrated store built under a temporary name and renamed to ``db``."""
    tmp = _creating(db)
    _remove_with_side_files(tmp)
    uri = f"sqlite:///{tmp}"
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creating the store runs every migration
    _close_engine(uri)
    reason = problem(tmp)
    if reason is not None:  # pragma: no cover - MLflow built something our check disowns
        raise RuntimeError(f"MLflow built an incomplete store at {tmp}: {reason}")
    _publish(tmp, db)


def _upgrade(db: Path) -> None:
    """``db`` migrated to the schema head on a consistent copy (sqlite's backup API), renamed into place."""
    tmp = _creating(db)
    _remove_with_side_files(tmp)
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    from mlflow.store.db.utils import _upgrade_db, create_sqlalchemy_engine

    engine = create_sqlalchemy_engine(f"sqlite:///{tmp}")
    try:
        _upgrade_db(engine)
    finally:
        engine.dispose()
    reason = problem(tmp)
    if reason is not None:
        _remove_with_side_files(tmp)
        raise RuntimeError(f"the upgraded copy is still incomplete: {reason}")
    _publish(tmp, db)


def _close_engine(uri: str) -> None:
    """Close MLflow's cached engine on a temporary store, so no connection stays open on the file we rename."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
    except (ImportError, AttributeError):  # pragma: no cover - MLflow internals moved
        return
    if engine is not None:
        engine.dispose()


def _reconnect(db: Path) -> None:
    """Close this process's pooled MLflow connections to ``db``: they hold the file that was there before.

    MLflow keeps one engine per URI for the life of the process; its next use opens the new file.
    """
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engines = list(SqlAlchemyStore._engine_map.items())
    except (ImportError, AttributeError):  # pragma: no cover - MLflow internals moved
        return
    for uri, engine in engines:
        if sqlite_file(uri) == db:
            engine.dispose()


def _publish(tmp: Path, db: Path) -> None:
    """Rename a complete store into place, durably: its bytes, then the folder entry."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, db)
    for side in _SIDE_FILES:  # a finished build has none; a stale one would be mistaken for db's own
        Path(f"{tmp}{side}").unlink(missing_ok=True)
    _fsync_dir(db.parent)


def _move_aside(db: Path) -> Path:
    """Rename a damaged store (with its journal, so the pair can still be inspected) out of the way."""
    broken = db.with_name(f"{db.name}{BROKEN}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(db, broken)
    for side in _SIDE_FILES:
        if Path(f"{db}{side}").exists():
            os.replace(f"{db}{side}", f"{broken}{side}")
    _fsync_dir(db.parent)
    return broken


def _remove_with_side_files(path: Path) -> None:
    path.unlink(missing_ok=True)
    for side in _SIDE_FILES:
        Path(f"{path}{side}").unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
