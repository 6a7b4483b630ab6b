"""Local infrastructure for tests and benchmarks: Apache Kafka from Maven Central jars."""
