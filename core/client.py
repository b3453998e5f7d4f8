"""A small HTTP client of the TES API, used by the `funnel task` commands."""

from __future__ import annotations

from typing import Any, Iterator

# requests is imported when a client is made: `funnel worker run` loads this module
# and, on a cluster, starts once per task (see benchmarks/README)

DEFAULT_SERVER = "http://127.0.0.1:8000"


def is_transient(status: int | None) -> bool:
    """Worth trying again: no answer (None), too many requests, or a server-side error."""
    return status is None or status == 429 or status >= 500


class ClientError(RuntimeError):
    """One-line description of what went wrong talking to the server.

    ``status`` is the HTTP status, or None when the server could not be reached.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return is_transient(self.status)


class TesClient:
    def __init__(self, server: str = DEFAULT_SERVER, timeout: float = 30,
                 token: str | None = None):
        self.base = server.rstrip("/") + "/ga4gh/tes/v1"
        self.server = server
        self.timeout = timeout
        import requests

        self._requests = requests
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, self.base + path, timeout=self.timeout, **kwargs)
        except self._requests.RequestException as exc:
            raise ClientError(f"cannot reach {self.server}: {exc.__class__.__name__}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("message") or resp.text
            except ValueError:
                message = resp.text.strip() or resp.reason
            raise ClientError(f"{resp.status_code}: {message}", resp.status_code)
        try:
            return resp.json()
        except ValueError:
            raise ClientError(f"{self.server} did not answer with JSON", resp.status_code) from None

    def create(self, task: Any) -> str:
        return self._call("POST", "/tasks", json=task)["id"]

    def get(self, task_id: str, view: str = "MINIMAL") -> dict:
        return self._call("GET", f"/tasks/{task_id}", params={"view": view})

    def list_page(self, **params: Any) -> dict:
        return self._call("GET", "/tasks", params={k: v for k, v in params.items() if v})

    def list_all(self, **params: Any) -> Iterator[dict]:
        token = None
        while True:
            page = self.list_page(**params, page_token=token)
            yield from page.get("tasks", [])
            token = page.get("next_page_token")
            if not token:
                return

    def cancel(self, task_id: str) -> None:
        self._call("POST", f"/tasks/{task_id}:cancel")

    def service_info(self) -> dict:
        return self._call("GET", "/service-info")
