"""The order history: a read model of every order, built only from the events (CQRS's query side)."""
