"""Event sinks: where the outbox's events go (webhooks, Redis Streams) and the publisher
that delivers them.
"""
