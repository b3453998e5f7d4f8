"""An executor's stdout/stderr tails, and the live updates that send what they gained.

``Tail`` keeps the last ``limit`` bytes of a stream and counts every byte written. While
an executor runs, ``LiveLogs`` wakes every ``worker.log_update_seconds`` and emits one
``executor_log`` event (core/events.py) with the text each stream gained since the last
event, at most ``limit`` bytes of it (``reset`` when more was written), never splitting a
UTF-8 character; nothing is sent when nothing changed. Off (0), no thread is started and
the pumps' only extra cost is one uncontended lock per chunk read.
"""

from __future__ import annotations

import threading

from funnel_hpc.core.events import MAX_TEXT

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from funnel_hpc.worker.events import EventLog


class Tail:
    """Keeps the last `limit` bytes written to it; `total` counts all of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.buffer = bytearray()
        self.total = 0
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.buffer += data
            self.total += len(data)
            if len(self.buffer) > 2 * self.limit:
                del self.buffer[: len(self.buffer) - self.limit]

    def text(self) -> str:
        return bytes(self.buffer[-self.limit:]).decode("utf-8", errors="replace") \
            if self.limit else ""

    def snapshot(self) -> tuple[str, int]:
        """(the tail as text, bytes written so far), consistent with each other."""
        with self.lock:
            return self.text(), self.total

    def since(self, sent: int) -> tuple[bytes, int, bool]:
        """(the bytes written after the first `sent`, at most `limit` of them, the new
        `sent`, whether some were skipped). A trailing partial UTF-8 character is held
        back for the next call."""
        with self.lock:
            gained = self.total - sent
            skipped = gained > self.limit
            data = bytes(self.buffer[len(self.buffer) - min(gained, self.limit):]) \
                if gained > 0 and self.limit else b""
            total = self.total
        cut = _complete_utf8(data)
        return data[:cut], total - (len(data) - cut), skipped


def _complete_utf8(data: bytes) -> int:
    """Length of `data` without a UTF-8 sequence cut off at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: is its sequence whole?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


class LiveLogs:
    """Sends one executor's tail updates every `interval` seconds until stopped."""

    def __init__(self, events: EventLog, index: int, tails: dict[str, Tail],
                 interval: float):
        self.events = events
        self.index = index
        self.tails = tails  # {"stdout": Tail, "stderr": Tail}
        self.interval = interval
        self.sent = dict.fromkeys(tails, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval > 0 and self.tails["stdout"].limit > 0:  # no tails: nothing to send
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"live-logs-{self.index}")
            self._thread.start()

    def stop(self) -> None:
        """Stop before executor_end is emitted (no update may follow it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.update()

    def update(self) -> None:
        gained = {name: tail.since(self.sent[name]) for name, tail in self.tails.items()}
        fields: dict[str, str | bool] = {}
        if any(skipped for _data, _sent, skipped in gained.values()):
            # more than a tail was written: both tails replace what the fold holds
            for name, tail in self.tails.items():
                fields[name], self.sent[name] = tail.snapshot()
            fields["reset"] = True
        else:
            for name, (data, sent, _skipped) in gained.items():
                self.sent[name] = sent
                if data:
                    fields[name] = data.decode("utf-8", errors="replace")
        if fields:
            self.events.emit("executor_log", index=self.index,
                             limit=min(self.tails["stdout"].limit, MAX_TEXT), **fields)
