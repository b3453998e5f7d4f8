"""A Server-Sent Events reader (the text/event-stream format of the WHATWG HTML spec),
for the client's ``watch`` of GET /funnel/v1/events. Stdlib only; cost: one pass over
the bytes received."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Message:
    """One dispatched SSE message."""

    data: str
    event: str = "message"
    id: str | None = None


def messages(chunks: Iterable[bytes]) -> Iterator[Message]:
    """The messages in a stream of byte chunks (split anywhere). Comments and ``retry:``
    are skipped; a block with an ``id`` but no data comes as a Message with data ""
    (EventSource dispatches nothing then but keeps the id: the caller may too)."""
    buffer = b""
    data: list[str] = []
    event, event_id = "", None
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data or event_id is not None:
                    yield Message("\n".join(data), event or "message", event_id)
                data, event, event_id = [], "", None
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                event_id = value
