"""The server's side of store damage: a CRITICAL line and a count for every damaged file,
and, after startup, a check of every Parquet file's content against the digest in its name.

Startup checks what is cheap (store/recovery.py): the WAL replay, every table of the
database file, the framing of every Parquet file. Reading every Parquet file in full would
make startup as slow as the store is large, so the digests are checked here, off the event
loop, once the server is serving; a mismatch takes the file out of its view (on the writer
thread) and quarantines it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import lookout.sdk
from lookout.server.runtime import ServerRuntime
from lookout.store import Damage, Quarantine, digest_damage


def report(runtime: ServerRuntime, quarantine: Quarantine, damages: list[Damage]) -> None:
    """Log each damage at CRITICAL and count it in lookout_store_corruptions_total."""
    log = lookout.sdk.get_logger("lookout.server")
    for damage in damages:
        runtime.metrics.corruptions.labels(damage.kind).inc()
        log.critical(
            "store_corruption",
            file=damage.path,
            kind=damage.kind,
            reason=damage.reason,
            lost=damage.lost,
            quarantine=str(quarantine.folder),
            acknowledge=f"lookout store ack-corruption --data-dir {runtime.database.data_dir}",
        )


async def verify_parquet(runtime: ServerRuntime) -> list[Damage]:
    """Check every listed Parquet file against its digest; quarantine the ones that differ."""
    database = runtime.database
    with database.lock:
        listed = [p for days in database.files.values() for paths in days.values() for p in paths]
    quarantine = Quarantine(database.data_dir, datetime.now(UTC))
    for path in listed:
        damage = await asyncio.to_thread(digest_damage, database.data_dir, path)
        if damage is None:
            continue

        def set_aside(path: str = path, damage: Damage = damage) -> int:
            return int(database.quarantine_file(path, damage, quarantine))

        if await asyncio.wrap_future(runtime.writer.run_job(set_aside)):
            report(runtime, quarantine, [damage])
    return quarantine.damages
