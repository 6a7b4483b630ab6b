"""The faults a soak injects, one after another, while the load runs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from chaos.driver import Driver
from chaos.shop import SERVICES, Shop

KILL, KAFKA_PAUSE, KAFKA_RESTART, PG_TERMINATE, RELAY_KILL, BLACKHOLE = (
    "kill",
    "kafka-pause",
    "kafka-restart",
    "pg-terminate",
    "relay-kill",
    "blackhole",
)


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str = ""
    seconds: float = 0.0
    """How long a pause or blackhole lasts."""


def _kills() -> list[Fault]:
    return [Fault(KILL, name) for name in SERVICES]


FULL = [
    *_kills(),
    Fault(PG_TERMINATE, "all"),
    Fault(RELAY_KILL, "orders"),
    Fault(KAFKA_PAUSE, "kafka", 10),
    *_kills(),
    Fault(RELAY_KILL, "customers"),
    Fault(BLACKHOLE, "orders", 20),
    Fault(PG_TERMINATE, "all"),
    Fault(KAFKA_RESTART, "kafka"),
    *_kills(),
    Fault(RELAY_KILL, "payments"),
    Fault(PG_TERMINATE, "all"),
]
SHORT = [
    Fault(KILL, "orders"),
    Fault(RELAY_KILL, "orders"),
    Fault(KAFKA_PAUSE, "kafka", 10),
    Fault(PG_TERMINATE, "all"),
    Fault(BLACKHOLE, "orders", 10),
    Fault(KAFKA_RESTART, "kafka"),
    Fault(RELAY_KILL, "customers"),
    Fault(KILL, "payments"),
]


@dataclass
class Injector:
    shop: Shop
    driver: Driver
    gap: float
    records: list[dict[str, Any]] = field(default_factory=list)
    unmarked: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Per relay kill: (topic, event id) of the due rows its outbox still had unmarked."""
    _next_victim: dict[str, int] = field(default_factory=dict)

    async def run(self, schedule: list[Fault], done: asyncio.Event) -> None:
        """Inject `schedule` in order, `gap` seconds apart; set `done` after the last one."""
        try:
            for fault in schedule:
                await asyncio.sleep(self.gap)
                began = time.monotonic()
                try:
                    detail = await getattr(self, fault.kind.replace("-", "_"))(fault)
                except Exception as error:  # the harness's own trouble (e.g. a slow connect): go on
                    detail = f"harness error, fault not (fully) injected: {type(error).__name__}: {error}"
                at = began - self.driver.started
                self.records.append(
                    {
                        "kind": fault.kind,
                        "target": fault.target,
                        "at": round(at, 1),
                        "seconds": round(time.monotonic() - began, 1),
                        "detail": detail,
                    }
                )
                print(f"  fault at {at:6.1f}s: {fault.kind} {fault.target}: {detail}", flush=True)
        finally:
            done.set()

    def _victim(self, service: str) -> Any:
        replicas = self.shop.of(service)
        index = self._next_victim.get(service, 0)
        self._next_victim[service] = index + 1
        return replicas[index % len(replicas)]

    async def _leader(self, service: str, wait: float = 10) -> Any:
        """The replica leading `service`'s relay, waiting for one (a takeover may be under way)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            leader = await self.shop.relay_leader(service)
            if leader is not None:
                return leader
            await asyncio.sleep(0.1)
        return None

    async def _restart(self, replica: Any, after: float = 1.0) -> None:
        await asyncio.sleep(after)
        replica.start()

    async def kill(self, fault: Fault) -> str:
        replica = self._victim(fault.target)
        replica.kill()
        await self._restart(replica)
        return f"SIGKILL {replica.name}, restarted 1 s later"

    async def relay_kill(self, fault: Fault) -> str:
        # Kill the process leading the relay while its produce request is on its way but not
        # acknowledged: a burst of orders fills the outbox, the broker is frozen for a second
        # (the relay's next batch waits unread in the broker's socket), the leader is killed,
        # then the broker resumes and appends the batch nobody will mark. The next leader must
        # publish those rows again: at-least-once, and in order.
        leader = await self._leader(fault.target)
        if leader is None:
            return "no relay leader found: skipped"
        self.driver.burst(60)
        conn = await self.shop.connect(self.shop.urls[fault.target])
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and await self.shop.backlog(conn) < 5:
                await asyncio.sleep(0.01)
        finally:
            await conn.close()
        self.shop.kafka.pause()
        try:
            await asyncio.sleep(1.0)
            leader.kill()
            # Read before the next leader can mark anything: the broker still answers nobody.
            unmarked = await self.shop.unpublished(fault.target)
        finally:
            self.shop.kafka.resume()
        self.unmarked[f"{fault.target} at {time.monotonic() - self.driver.started:.1f}s"] = unmarked
        await self._restart(leader)
        return f"broker frozen 1 s, SIGKILL relay leader {leader.name} with {len(unmarked)} due rows unmarked"

    async def kafka_pause(self, fault: Fault) -> str:
        self.shop.kafka.pause()
        try:
            await asyncio.sleep(fault.seconds)
        finally:
            self.shop.kafka.resume()
        return f"SIGSTOP broker for {fault.seconds:.0f} s, then SIGCONT"

    async def kafka_restart(self, fault: Fault) -> str:
        # In a worker thread so the load and the proxy go on; the JVM is then not tied to that
        # thread's life (Shop.close stops it).
        self.shop.kafka.die_with_parent = False
        began = time.monotonic()
        await asyncio.to_thread(self.shop.kafka.restart)
        return f"broker stopped and started on the same ports and log dir ({time.monotonic() - began:.1f} s)"

    async def pg_terminate(self, fault: Fault) -> str:
        services = SERVICES if fault.target == "all" else (fault.target,)
        counts = {name: await self.shop.terminate_backends(name) for name in services}
        return "pg_terminate_backend: " + ", ".join(f"{n} {c}" for n, c in counts.items())

    async def blackhole(self, fault: Fault) -> str:
        # The relay leader's replica if it is behind the proxy, so its lock holder goes silent.
        leader = await self._leader(fault.target)
        replica = leader if leader is not None and leader.proxy is not None else self.shop.of(fault.target)[0]
        assert replica.proxy is not None
        replica.proxy.blackhole()
        try:
            await asyncio.sleep(fault.seconds)
        finally:
            replica.proxy.resume()
        lead = "relay leader" if replica is leader else "not the relay leader"
        return f"PostgreSQL connections of {replica.name} ({lead}) blackholed {fault.seconds:.0f} s"
