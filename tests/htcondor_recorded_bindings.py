"""HTCondor bindings for a gateway under test: the real ``htcondor2`` module, except
that ``Schedd()`` is a client of the recorded-contract schedd a test serves over
XML-RPC (tests/htcondor_fake.py) at ``$RECORDED_SCHEDD_URL``.

A gateway uses it with ``backend.htcondor.bindings: tests.htcondor_recorded_bindings``
(run from the repository root). Submit descriptions are still parsed by the real
``htcondor2.Submit`` here, and ClassAds handed back to the backend are real
``classad2.ClassAd`` objects.
"""

from __future__ import annotations

import os
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import classad2
import htcondor2
from htcondor2 import Collector, DaemonTypes, HTCondorException, JobAction, Submit

from tests.htcondor_fake import FakeSubmitResult as SubmitResult

__all__ = ["Collector", "DaemonTypes", "HTCondorException", "JobAction", "Schedd", "Submit"]


class Schedd:
    """Same calls as htcondor2.Schedd, answered by the test's schedd."""

    def __init__(self, location: Any = None):
        self.url = os.environ["RECORDED_SCHEDD_URL"]

    def _call(self, name: str, *args: Any) -> Any:
        proxy = xmlrpc.client.ServerProxy(self.url, allow_none=True)
        try:
            return getattr(proxy, name)(*args)
        except (OSError, xmlrpc.client.Error) as exc:
            raise HTCondorException(f"Failed to connect to schedd: {exc}") from None

    def query(self, constraint: str = "True", projection: list[str] | None = None,
              **_kwargs: Any) -> list[classad2.ClassAd]:
        return [classad2.ClassAd(ad) for ad in
                self._call("query", str(constraint), list(projection or []))]

    def history(self, constraint: str | None = None, projection: list[str] | None = None,
                match: int = -1, **_kwargs: Any) -> Iterator[classad2.ClassAd]:
        ads = self._call("history", str(constraint or "True"), list(projection or []), match)
        return iter([classad2.ClassAd(ad) for ad in ads])

    def submit(self, description: htcondor2.Submit, count: int = 0,
               **_kwargs: Any) -> SubmitResult:
        return SubmitResult(self._call("submit", dict(description), count))

    def act(self, action: JobAction, job_spec: str, reason: str | None = None) -> classad2.ClassAd:
        return classad2.ClassAd(self._call("act", action.name, str(job_spec), reason or ""))
