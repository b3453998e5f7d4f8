"""The Python client of funnel-hpc's HTTP API (docs/reference.md "Python client").

``TesClient`` creates, reads, lists (page by page or all), cancels, waits for and
watches tasks (GET /funnel/v1/events, Server-Sent Events, resumed after a dropped
connection from the last event id). Credentials: a bearer token, or a user name and
password (HTTP Basic). With ``retries`` > 0, answers 429 and 503 are tried again after
the server's ``Retry-After`` (seconds or an HTTP date; capped by ``max_retry_wait``).
Every failure is a ``ClientError`` carrying the HTTP status and the server's message.
``TaskClient`` is the surface it shares with the gRPC client
(``funnel_hpc.proto.client.TesGrpcClient``, which lives there as it needs the stubs).
The `funnel task` commands and the worker use it; it imports ``requests`` only when a
client is made (the worker imports this module at every start).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

# requests is imported when a client is made: `funnel worker run` loads this module
# and, on a cluster, starts once per task (see docs/benchmarks.md)

DEFAULT_SERVER = "http://127.0.0.1:8000"


def is_transient(status: int | None) -> bool:
    """Worth trying again: no answer (None), too many requests, or a server-side error."""
    return status is None or status == 429 or status >= 500


class ClientError(RuntimeError):
    """One-line description of what went wrong talking to the server.

    ``status`` is the HTTP status, or None when the server could not be reached.
    """

    def __init__(self, message: str, status: int | None = None,
                 server_message: str | None = None):
        super().__init__(message)
        self.status = status
        self.server_message = server_message  # the server's own words, when it answered

    @property
    def transient(self) -> bool:
        return is_transient(self.status)


class TaskClient:
    """The calls of every funnel-hpc client: ``TesClient`` (HTTP, here) and
    ``funnel_hpc.proto.client.TesGrpcClient`` (gRPC). ``list_all`` and ``wait`` are built
    on each one's ``list_page`` and ``get``."""

    def create(self, task: Any) -> str:
        """Create a task (a tesTask document); return its id."""
        raise NotImplementedError

    def get(self, task_id: str, view: str = "MINIMAL") -> dict:
        """One task in a view: MINIMAL (id, state), BASIC or FULL."""
        raise NotImplementedError

    def list_page(self, **params: Any) -> dict:
        """One ListTasks page: {"tasks": [...], "next_page_token": ...}."""
        raise NotImplementedError

    def cancel(self, task_id: str) -> None:
        """Cancel a task (an ended task is left as it is)."""
        raise NotImplementedError

    def service_info(self) -> dict:
        """The server's GA4GH service-info document."""
        raise NotImplementedError

    def watch(self, task_id: str | None = None, *, last_event_id: int | None = None,
              reconnect: bool = True) -> Generator[dict, None, None]:
        """Events of the caller's tasks (or one task) as they are recorded."""
        raise NotImplementedError

    def list_all(self, **params: Any) -> Iterator[dict]:
        """Every task matching, page after page (newest first)."""
        token = None
        while True:
            page = self.list_page(**params, page_token=token)
            yield from page.get("tasks", [])
            token = page.get("next_page_token")
            if not token:
                return

    def wait(self, task_id: str, timeout: float | None = None, interval: float = 1.0,
             view: str = "MINIMAL") -> dict:
        """Poll until the task has ended; return it (in ``view``). ``timeout`` seconds
        (None: no limit) then raise ClientError (status None)."""
        import time

        from funnel_hpc.core.events import TERMINAL_STATES

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            task = self.get(task_id, view)
            if task["state"] in TERMINAL_STATES:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise ClientError(f"task {task_id} still {task['state']} after {timeout:g} s")
            time.sleep(interval)


class TesClient(TaskClient):
    """A TES server's HTTP API (TES 1.1 routes and funnel-hpc's event stream)."""

    def __init__(self, server: str = DEFAULT_SERVER, timeout: float = 30,
                 token: str | None = None, *, username: str | None = None,
                 password: str | None = None, retries: int = 0,
                 max_retry_wait: float = 60):
        self.base = server.rstrip("/") + "/ga4gh/tes/v1"
        self.server = server
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        import requests

        self._requests = requests
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"
        elif username is not None:
            self.http.auth = (username, password or "")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._send(method, self.base + path, **kwargs)
        try:
            return resp.json()
        except ValueError:
            raise ClientError(f"{self.server} did not answer with JSON", resp.status_code) from None

    def _send(self, method: str, url: str, **kwargs: Any) -> Any:
        """One request, tried again on 429/503 (and, for a GET, on a connection that
        failed: a busy or restarting server) while retries last; a ClientError for any
        failure."""
        import time

        kwargs.setdefault("timeout", self.timeout)
        for attempt in range(self.retries + 1):
            try:
                resp = self.http.request(method, url, **kwargs)
            except self._requests.RequestException as exc:
                if method == "GET" and attempt < self.retries:
                    time.sleep(retry_after(None, attempt, self.max_retry_wait))
                    continue
                raise ClientError(f"cannot reach {self.server}: {exc.__class__.__name__}") from None
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                resp.close()
                time.sleep(retry_after(resp.headers.get("Retry-After"), attempt,
                                       self.max_retry_wait))
                continue
            if resp.status_code >= 400:
                raise _error(resp)
            return resp
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def create(self, task: Any) -> str:
        """Create a task (a tesTask document); return its id."""
        return self._call("POST", "/tasks", json=task)["id"]

    def get(self, task_id: str, view: str = "MINIMAL") -> dict:
        """One task in a view: MINIMAL (id, state), BASIC or FULL."""
        return self._call("GET", f"/tasks/{task_id}", params={"view": view})

    def list_page(self, **params: Any) -> dict:
        """One ListTasks page: {"tasks": [...], "next_page_token": ...}. Parameters as the
        API's (name_prefix, state, tag_key, tag_value, page_size, page_token, view)."""
        return self._call("GET", "/tasks", params={k: v for k, v in params.items() if v})

    def cancel(self, task_id: str) -> None:
        """Cancel a task (an ended task is left as it is)."""
        self._call("POST", f"/tasks/{task_id}:cancel")

    def service_info(self) -> dict:
        """The server's GA4GH service-info document."""
        return self._call("GET", "/service-info")

    def watch(self, task_id: str | None = None, *, last_event_id: int | None = None,
              reconnect: bool = True) -> Generator[dict, None, None]:
        """Events of the caller's tasks (or one task) as they are recorded: dicts with
        id, task_id, owner, kind, time and payload. ``last_event_id``: go on after that
        event (None: from now; 0: from the oldest kept). A dropped connection is resumed
        from the last id seen while ``reconnect``; ``close()`` the generator to
        drop the connection."""
        import json

        from funnel_hpc.core.sse import messages

        url = self.server.rstrip("/") + WATCH_PATH
        params = {"task_id": task_id} if task_id else {}
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = str(last_event_id)
            resp = self._send("GET", url, params=params, headers=headers, stream=True,
                              timeout=(self.timeout, max(self.timeout, WATCH_READ_TIMEOUT)))
            try:
                for message in messages(resp.iter_content(chunk_size=None)):
                    if message.id is not None:  # the stream's position, also without data
                        last_event_id = int(message.id)
                    if message.data:
                        yield json.loads(message.data)
            except self._requests.RequestException:
                if not reconnect:
                    raise ClientError(f"event stream from {self.server} broke") from None
            finally:
                resp.close()
            if not reconnect:
                return


RETRY_STATUSES = (429, 503)
WATCH_PATH = "/funnel/v1/events"
WATCH_READ_TIMEOUT = 60  # seconds without a byte; the server sends keep-alives more often


def retry_after(header: str | None, attempt: int, cap: float) -> float:
    """Seconds to wait before trying again: the Retry-After header (delay-seconds or an
    HTTP date), else 1, 2, 4... by attempt; never more than cap."""
    if header:
        header = header.strip()
        if header.isdigit():
            return min(float(header), cap)
        from email.utils import parsedate_to_datetime

        try:
            import time

            return min(max(parsedate_to_datetime(header).timestamp() - time.time(), 0.0), cap)
        except (TypeError, ValueError):
            pass
    return min(float(2 ** attempt), cap)


def _error(resp: Any) -> ClientError:
    """A ClientError for an error answer, with the server's message when it sent one."""
    try:
        body = resp.json()
        message = (body.get("message") if isinstance(body, dict) else None) or resp.text
    except ValueError:
        message = resp.text.strip() or resp.reason
    return ClientError(f"{resp.status_code}: {message}", resp.status_code, message)
