"""Event sinks: where the publisher (gateway/sinks/publisher.py) sends outbox events.

A sink is one small interface: ``publish(events)`` delivers a batch in order, or
raises, and the publisher sends the same batch again later (at least once: a sink may
see an event twice after a failure, never out of order for a task). ``accepts(event,
tags)`` filters; a filtered-out event still advances the sink's cursor; the tasks' tags
are read for sinks that set ``wants_tags``. Kafka or Pub/Sub would be one more class
here and one more branch in ``make_sinks``.

- ``WebhookSink``: one HTTP POST per event, JSON body, ``X-Funnel-Signature:
  sha256=<hex HMAC of the body>`` with the configured secret; any status but 2xx is a
  failure (redirects too). Cost: one request per event on a kept-alive connection
  (http.client: about a quarter of the CPU requests takes; no proxy from the
  environment, certificates checked against the system's CAs).
- ``RedisStreamSink``: XADD to the stream ``<prefix><kind>``, entry id ``<outbox id>-1``,
  so a batch sent again after a partial failure adds nothing twice (Redis refuses an id
  not above the stream's newest). Cost: one pipelined round trip per batch.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from funnel_hpc.core.config import EventsSection
from funnel_hpc.gateway.store.outbox import REDIS_SINK, Event, webhook_name

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Funnel-Signature"
EVENT_ID_HEADER = "X-Funnel-Event-Id"
USER_AGENT = "funnel-hpc-events"
# a kept-alive connection the receiver closed while idle fails the next request like this
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Sink(Protocol):
    """Where events go: ``publish`` delivers a batch in order or raises."""

    name: str
    wants_tags: bool  # accepts() looks at the task's tags (the publisher reads them)

    def accepts(self, event: Event, tags: Mapping[str, str]) -> bool: ...

    def publish(self, events: Sequence[Event]) -> None: ...


class SinkError(RuntimeError):
    """A batch was not (wholly) delivered; the publisher retries it."""


def signature(secret: str, body: bytes) -> str:
    """The X-Funnel-Signature value of a body: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode(event: Event) -> bytes:
    return json.dumps(event.document(), separators=(",", ":"), sort_keys=True).encode()


class WebhookSink:
    """HTTP POST of each event to one URL, signed, filtered by owner and tags."""

    def __init__(self, name: str, url: str, secret: str = "", owners: Sequence[str] = (),
                 tags: Mapping[str, str] | None = None, timeout: float = 10):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{name}: the webhook URL must be http(s)://host/..., not {url!r}")
        self.name = name
        self.url = url
        self.secret = secret
        self.owners = frozenset(owners)
        self.tags = dict(tags or {})
        self.wants_tags = bool(self.tags)
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._connection: http.client.HTTPConnection | None = None

    def accepts(self, event: Event, tags: Mapping[str, str]) -> bool:
        if self.owners and event.owner not in self.owners:
            return False
        return all(tags.get(key) == value for key, value in self.tags.items())

    def publish(self, events: Sequence[Event]) -> None:
        for event in events:
            body = encode(event)
            headers = {"Content-Type": "application/json", EVENT_ID_HEADER: str(event.id),
                       "User-Agent": USER_AGENT}
            if self.secret:
                headers[SIGNATURE_HEADER] = signature(self.secret, body)
            status, text = self._post(body, headers)
            if not 200 <= status < 300:
                raise SinkError(f"POST {self.url}: {status} {text[:300]}")

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        """One POST on the kept-alive connection: (status, body text). A kept connection
        the receiver has closed meanwhile is replaced once (a new one fails: SinkError)."""
        for attempt in (1, 2):
            reused = self._connection is not None
            connection = self._connection or self._connect()
            try:
                connection.request("POST", self._target, body=body, headers=headers)
                response = connection.getresponse()
                text = response.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if reused and attempt == 1 and isinstance(exc, _STALE_CONNECTION):
                    continue
                raise SinkError(f"POST {self.url}: {exc.__class__.__name__}") from None
            if response.will_close:
                self.close()
            return response.status, text
        raise AssertionError("unreachable")  # the second attempt returns or raises

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout,
                context=ssl.create_default_context())
        else:
            self._connection = http.client.HTTPConnection(self._host, self._port,
                                                          timeout=self.timeout)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class RedisStreamSink:
    """XADD of each event to a Redis stream per event kind."""

    def __init__(self, name: str, url: str, prefix: str, maxlen: int):
        import redis

        self.name = name
        self.wants_tags = False
        self.prefix = prefix
        self.maxlen = maxlen or None
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._redis = redis

    def accepts(self, event: Event, tags: Mapping[str, str]) -> bool:
        return True

    def stream(self, kind: str) -> str:
        return self.prefix + kind

    def publish(self, events: Sequence[Event]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for event in events:
            fields: dict[Any, Any] = {"event": encode(event)}
            pipe.xadd(self.stream(event.kind), fields, id=f"{event.id}-1",
                      maxlen=self.maxlen, approximate=True)
        try:
            results = pipe.execute(raise_on_error=False)
        except self._redis.RedisError as exc:
            raise SinkError(f"redis: {exc}") from None
        for result in results:
            # "equal or smaller than the target stream top item": sent before a failure
            if isinstance(result, Exception) and "equal or smaller" not in str(result):
                raise SinkError(f"redis XADD: {result}")


def make_sinks(events_config: EventsSection) -> list[Sink]:
    """The sinks the ``events:`` configuration names (docs/internals.md "Task events out")."""
    sinks: list[Sink] = []
    hooks: Sequence[Mapping[str, Any]] = events_config.webhooks  # entries are free-form
    for index, hook in enumerate(hooks):
        sinks.append(WebhookSink(webhook_name(index, hook), hook["url"],
                                 secret=hook.get("secret") or "",
                                 owners=hook.get("owners") or (), tags=hook.get("tags"),
                                 timeout=float(hook.get("timeout_seconds") or 10)))
    redis_config = events_config.redis
    if redis_config.url:
        sinks.append(RedisStreamSink(REDIS_SINK, redis_config.url, redis_config.stream_prefix,
                                     redis_config.maxlen))
    return sinks
