"""One database per service, through one code path: PostgreSQL (one schema per service)
when `BUSLINE_DATABASE_URL` is set, else a SQLite file per service under
`$BUSLINE_STATE/db/`, in WAL mode with a busy timeout. Queries use SQLAlchemy Core, so the
same statements run on both; migrations run at start, in order, each once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from busline.kit import state_dir

#: A migration: (version, what it does to a connection). Versions only ever grow.
Migration = tuple[int, Callable[[Connection], None]]

SQLITE_BUSY_TIMEOUT_MS = 10_000


def database_url() -> str | None:
    url = os.environ.get("BUSLINE_DATABASE_URL", "").strip()
    if not url:
        return None
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def engine_for(service: str, *, pool_size: int = 5, max_overflow: int = 5) -> Engine:
    """The engine of `service`'s own database (or schema), instrumented by the SDK."""
    url = database_url()
    if url is None:
        path = state_dir() / "db" / f"{service}.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            f"sqlite:///{path}",
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=10,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        # pysqlite's own transaction handling defers BEGIN; take it over so a
        # transaction starts when SQLAlchemy says (the documented recipe).
        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        @sa.event.listens_for(engine, "connect", insert=True)
        def _no_autobegin(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.isolation_level = None

    else:
        schema = service.replace("-", "_")
        bootstrap = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with bootstrap.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7140)"))
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        bootstrap.dispose()
        engine = sa.create_engine(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=10,
            pool_pre_ping=True,
            connect_args={"options": f"-csearch_path={schema}"},
        )
    import lookout.sdk

    lookout.sdk.instrument_sqlalchemy(engine, pool_name=service)
    from busline import fault_agent

    fault_agent.agent().install_db(engine)  # after the SDK's hooks: inside the span
    return engine


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


_migrations_table = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.Float, nullable=False),
)


def migrate(engine: Engine, migrations: Sequence[Migration]) -> int:
    """Apply the migrations not applied yet, in version order, each in its own
    transaction with its bookkeeping row; returns how many ran. Two processes migrating
    at once serialise (an advisory lock on PostgreSQL, the write lock on SQLite)."""
    import time

    ran = 0
    with engine.begin() as conn:
        if is_postgres(engine):  # two services starting at once: one creates the table
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7141)"))
        _migrations_table.create(conn, checkfirst=True)
    for version, apply in sorted(migrations, key=lambda m: m[0]):
        with engine.begin() as conn:
            if is_postgres(engine):
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7141)"))
            done = conn.execute(
                sa.select(_migrations_table.c.version).where(_migrations_table.c.version == version)
            ).first()
            if done is not None:
                continue
            apply(conn)
            conn.execute(_migrations_table.insert().values(version=version, applied_at=time.time()))
            ran += 1
    return ran


def create_tables(metadata: sa.MetaData, *tables: str) -> Callable[[Connection], None]:
    """A migration that creates `tables` of `metadata` as they are declared."""

    def apply(conn: Connection) -> None:
        metadata.create_all(conn, tables=[metadata.tables[name] for name in tables])

    return apply
