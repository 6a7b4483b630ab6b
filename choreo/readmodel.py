"""Read models: services that only project events into their own tables, and their rebuild.

A read model (a CQRS query side) handles events and emits none, so it can be thrown away and
rebuilt from the topics at any time: `choreo rebuild module:service` with every instance of it
stopped, then start it again. It replays what the topics still hold: rebuild only from topics
whose retention keeps every event the read model needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete

from choreo.exceptions import SetupError
from choreo.kafka import rewind_group
from choreo.service import Service
from choreo.tables import inbox_table


@dataclass(frozen=True)
class Rebuilt:
    """What `rebuild` reset: the group, its topics (with their partition counts) and the tables."""

    group_id: str
    partitions: dict[str, int]
    tables: list[str]


def require_read_model(service: Service) -> None:
    """Raise SetupError unless `service` emits nothing (replaying it would emit its events again)."""
    emits = sorted({t.event_name for h in service.handlers for t in h.emits} | {t.event_name for t in service.declared})
    if emits or service.sagas:
        raise SetupError(
            f"{service.name} is not a read model: it emits {', '.join(emits) or 'saga timeouts'}, and replaying "
            "its topics would emit those again; only a service that emits nothing can be rebuilt"
        )


async def rebuild(service: Service) -> Rebuilt:
    """Rewind the read model's consumer group to the start of its topics, then empty its tables.

    `service` must have been started with `kafka=False` (the database alone) and no instance of
    it may be consuming. The group is rewound first: if this stops halfway, the tables are still
    whole and their inbox rows make the replay a no-op, so running it again finishes the job.
    """
    require_read_model(service)
    partitions = await rewind_group(service._kafka_settings(), service.group_id, service.subscribed_topics)
    tables: list[str] = []
    async with service.engine.begin() as conn:
        for metadata in service.metadata:
            await conn.run_sync(metadata.drop_all)
            await conn.run_sync(metadata.create_all)
            tables += sorted(metadata.tables)
        # Without its inbox rows every replayed event is new to the read model again.
        await conn.execute(delete(inbox_table))
    return Rebuilt(service.group_id, partitions, tables)
