"""The demo shop's success flow, measured with real PostgreSQL and Apache Kafka: `python -m bench`.

Every service, the load driver and the ceiling run as separate OS processes; this package
orchestrates them (`bench.run`), drives load (`bench.driver`), reads timestamps back from the
services' own tables (`bench.measure`) and writes `bench/results/results.json`,
`docs/benchmarks.md` and `docs/benchmarks-latency.png` (`bench.report`).
"""
