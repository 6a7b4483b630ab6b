"""Two environments on one cluster, told apart by a prefix, share neither topics nor consumer groups."""

from __future__ import annotations

from pathlib import Path

from choreo import KafkaSettings
from tests.test_core_infra import eventually
from tests.toy import Toy, add_stock, make_toy, order_status, place_order


def generations(toy: Toy) -> list[int]:
    """The consumer-group generation each member of `toy` is in; a rebalance raises it."""
    found = []
    for service in (toy.shop, toy.stock):
        (member,) = service.transport._members
        assert member.consumer is not None
        found.append(member.consumer._coordinator.generation)  # aiokafka keeps no public accessor
    return found


def test_the_group_prefix_defaults_to_the_topic_prefix_and_can_be_set() -> None:
    assert KafkaSettings(topic_prefix="staging.").group("orders") == "staging.orders"
    assert KafkaSettings(topic_prefix="staging.", group_prefix="").group("orders") == "orders"
    env = {"CHOREO_KAFKA_TOPIC_PREFIX": "t.", "CHOREO_KAFKA_GROUP_PREFIX": "g-"}
    assert KafkaSettings.from_env("orders", env).group("orders") == "g-orders"


async def test_two_prefixed_shops_on_one_broker_keep_their_own_consumer_groups(
    tmp_path: Path, kafka_bootstrap: str, unique_name: str
) -> None:
    def settings(run: str) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=kafka_bootstrap, topic_prefix=f"{unique_name}-{run}.", partitions=2, fetch_max_wait_ms=100
        )

    first = make_toy(f"sqlite+aiosqlite:///{tmp_path}/a1.db", f"sqlite+aiosqlite:///{tmp_path}/a2.db", settings("a"))
    second = make_toy(f"sqlite+aiosqlite:///{tmp_path}/b1.db", f"sqlite+aiosqlite:///{tmp_path}/b2.db", settings("b"))
    async with first.shop.running(), first.stock.running():
        await add_stock(first.stock, "apple", 5)
        await place_order(first.shop, "o1", "apple", 1)
        await eventually(lambda: _confirmed(first.shop))
        before = generations(first)
        # The same service names under another prefix: were the groups shared, the second
        # shop's members would join the first one's groups, and each start or stop of one
        # shop would rebalance the other.
        async with second.shop.running(), second.stock.running():
            await add_stock(second.stock, "apple", 5)
            await place_order(second.shop, "o1", "apple", 1)
            await eventually(lambda: _confirmed(second.shop))
            assert generations(first) == before
        assert generations(first) == before


async def _confirmed(shop: object) -> bool:
    return await order_status(shop, "o1") == "CONFIRMED"  # type: ignore[arg-type]
