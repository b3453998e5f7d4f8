"""Fixtures for the cloud backends: a fresh AWS Batch set-up on the session's real moto
server (tests/conftest.py). Options, requests and moto: tests/backend_helpers.py;
the HTCondor fake schedd: tests/htcondor_fake.py."""

from __future__ import annotations

import pytest

from tests.backend_helpers import MotoServer


@pytest.fixture
def moto_batch(moto_server: MotoServer) -> MotoServer:
    """A fresh moto state with a compute environment, queue and job definition."""
    moto_server.reset()
    moto_server.create_batch_environment()
    return moto_server
