"""The comparison: the same choreography written by hand on FastStream, without choreo.

Three services in three processes (`python -m bench.baseline orders|customers|payments`), each
a `KafkaBroker` with one subscriber, the demo shop's own SQLAlchemy models and the same row
locks as the demo's handlers. Each handler commits its transaction, then `broker.publish`es the
next event: a dual write, with no outbox, no inbox, no relay and no dead letters. This is what
a competent FastStream user writes first, and what choreo's guarantees cost is measured against.
"""
