"""Chaos soak of the demo shop: its services as separate processes on PostgreSQL and Apache Kafka,
thousands of sagas of every flow, faults injected meanwhile, invariants checked from the
databases and topics once the shop is quiet again (`python -m chaos`, `make chaos`)."""
