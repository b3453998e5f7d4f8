"""backends/slurm_rest_tokens.py: each owner's token is minted by one `scontrol token`,
kept in memory for half its life, and never taken from output that is not a token.
(The real slurmctld mints them in tests/backends/test_slurm_rest.py.)"""

from __future__ import annotations

import pytest

from funnel_hpc.backends.base import BackendError
from funnel_hpc.backends.commands import Result
from funnel_hpc.backends.slurm_rest_tokens import OwnerTokens
from tests.backend_helpers import FakeRunner

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ1biI6ImFsaWNlIn0.c2lnbmF0dXJl"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_is_minted_once_and_again_after_half_its_life():
    runner = FakeRunner({("scontrol", "token"): Result(0, f"SLURM_JWT={TOKEN}\n", "")})
    clock = Clock()
    tokens = OwnerTokens(runner, lifespan=600, clock=clock)
    assert tokens.token("alice") == TOKEN
    assert runner.commands == [["scontrol", "token", "username=alice", "lifespan=600"]]
    clock.now += 299
    assert tokens.token("alice") == TOKEN and runner.calls == 1
    assert tokens.token("bob") == TOKEN and runner.calls == 2  # each owner their own
    clock.now += 1
    tokens.token("alice")
    assert runner.calls == 3 and runner.commands[-1][2] == "username=alice"
    tokens.forget("bob")  # slurmrestd refused it: minted anew
    tokens.token("bob")
    assert runner.calls == 4 and runner.commands[-1][2] == "username=bob"


@pytest.mark.parametrize("result, words", [
    (Result(1, "", "scontrol: error: Permission denied"), "Permission denied"),
    (Result(0, "SLURM_JWT=\n", ""), "it printed no token"),
    (Result(0, "SLURM_JWT=abc; rm -rf /\n", ""), "it printed no token"),
])
def test_no_token_is_a_transient_error_naming_what_scontrol_said(result, words):
    tokens = OwnerTokens(FakeRunner({("scontrol", "token"): result}))
    with pytest.raises(BackendError, match="scontrol token for 'alice' failed") as info:
        tokens.token("alice")
    assert info.value.transient is True  # the gateway's rights: the submission waits
    assert words in str(info.value)
    assert "root or SlurmUser" in str(info.value)


@pytest.mark.parametrize("user", ["", "Alice", "a b", "root;id", "-u", "x" * 40])
def test_a_user_name_that_is_not_one_runs_nothing(user):
    runner = FakeRunner({})
    with pytest.raises(BackendError, match="not a user name"):
        OwnerTokens(runner).token(user)
    assert runner.calls == 0


class RefusingTransport:
    """slurmrestd refusing every request with a 401; records whom each was sent as."""

    where = "http://127.0.0.1:9"

    def __init__(self) -> None:
        self.acting: list[tuple[str, str] | None] = []

    def request(self, method, path, body=None, acting=None):
        from funnel_hpc.backends.slurm_rest_http import Answer

        self.acting.append(acting)
        return Answer(401, None, "Authentication failure")


def test_an_owners_submission_carries_their_token_and_a_refused_one_is_minted_anew(tmp_path):
    from funnel_hpc.backends.slurm_rest import SlurmRestClient

    runner = FakeRunner({("scontrol", "token"): Result(0, f"SLURM_JWT={TOKEN}\n", "")})
    transport = RefusingTransport()
    rest = SlurmRestClient(transport, "root", environment={}, cwd=str(tmp_path),  # type: ignore[arg-type]
                           version="v0.0.38", owner_tokens=OwnerTokens(runner))
    script = "#!/bin/sh\n#SBATCH --job-name=funnel-t1\ntrue\n"
    for _ in range(2):
        with pytest.raises(BackendError, match=r"\(401\)") as info:
            rest.submit(script, {}, owner="alice")
        assert info.value.transient is True  # waits for a good token
    assert transport.acting == [("alice", TOKEN), ("alice", TOKEN)]
    assert runner.calls == 2  # the refused token was not used again
    with pytest.raises(BackendError, match="only with submit_as_owner"):
        SlurmRestClient(transport, "root", environment={}, cwd=str(tmp_path),  # type: ignore[arg-type]
                        version="v0.0.38").submit(script, {}, owner="alice")
