"""The lean comparison: the same choreography on bare asyncpg and aiokafka, without choreo.

Three services in three processes (`python -m bench.lean orders|customers|payments`), each an
`AIOKafkaConsumer` feeding hand-written SQL on an asyncpg pool, and an `AIOKafkaProducer`
(acks=all, idempotent). The demo shop's tables, the same row locks as the demo's handlers; each
handler commits, then publishes the next event. No ORM, no outbox, no inbox: the least a strong
engineer would write for this flow, and what choreo's per-event cost is measured against.
"""
