"""Request limits through the real server (issue 16, findings 8, 9, 14, 15): what exceeds
`limits.*` or `resources.max_*`, nests too deeply, or carries backend_parameters values a
scheduler directive cannot hold is HTTP 400 naming the field and the limit, and nothing
is stored; FULL listings are bounded in bytes, not only in tasks.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import requests

from tests.api_helpers import row_count
from tests.server_helpers import ServerProcess

LIMITS = {"max_content_bytes": 1000, "max_tags": 5, "max_inputs": 3, "max_outputs": 3,
          "max_executors": 2, "max_volumes": 2, "max_env": 3, "max_name_length": 50,
          "max_string_length": 2000, "max_tag_filters": 4, "max_list_bytes": 20000}
MAXIMA = {"max_cpu_cores": 8, "max_ram_gb": 64, "max_disk_gb": 100}
EXECUTOR = {"image": "busybox", "command": ["true"]}


@pytest.fixture(scope="module")
def limited(db_kind, databases, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"limits-{db_kind}")
    server = ServerProcess(work, databases.new(db_kind), overrides={
        "limits": LIMITS, "resources": MAXIMA,
        "backend": {"local": {"backend_parameters": {"queue": "--queue"}}}}).start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


def task(**fields: Any) -> dict:
    return {"executors": [EXECUTOR], **fields}


def inputs(count: int, content: str = "x") -> list[dict]:
    return [{"path": f"/data/{i}", "content": content} for i in range(count)]


def outputs(count: int) -> list[dict]:
    return [{"path": f"/out/{i}", "url": f"s3://b/{i}"} for i in range(count)]


# name -> (task at the limit: accepted, task over it, field named, limit named)
CASES: dict[str, tuple[dict, dict, str, str]] = {
    "content": (task(inputs=inputs(1, "é" * 500)), task(inputs=inputs(1, "é" * 501)),
                "inputs.0.content", "limits.max_content_bytes (1000)"),
    "tags": (task(tags={str(i): "" for i in range(5)}), task(tags={str(i): "" for i in range(6)}),
             "tags", "limits.max_tags (5)"),
    "inputs": (task(inputs=inputs(3)), task(inputs=inputs(4)), "inputs", "limits.max_inputs"),
    "outputs": (task(outputs=outputs(3)), task(outputs=outputs(4)), "outputs",
                "limits.max_outputs"),
    "executors": (task(executors=[EXECUTOR] * 2), task(executors=[EXECUTOR] * 3), "executors",
                  "limits.max_executors"),
    "volumes": (task(volumes=["/v1", "/v2"]), task(volumes=["/v1", "/v2", "/v3"]), "volumes",
                "limits.max_volumes"),
    "env": (task(executors=[{**EXECUTOR, "env": {f"E{i}": "" for i in range(3)}}]),
            task(executors=[EXECUTOR, {**EXECUTOR, "env": {f"E{i}": "" for i in range(4)}}]),
            "executors.1.env", "limits.max_env (3)"),
    "name": (task(name="n" * 50), task(name="n" * 51), "name", "limits.max_name_length"),
    "description": (task(description="d" * 2000), task(description="d" * 2001), "description",
                    "limits.max_string_length (2000)"),
    "command argument": (task(executors=[{**EXECUTOR, "command": ["echo", "a" * 2000]}]),
                         task(executors=[{**EXECUTOR, "command": ["echo", "a" * 2001]}]),
                         "executors.0.command.1", "limits.max_string_length"),
    "tag value": (task(tags={"k": "v" * 2000}), task(tags={"k": "v" * 2001}), "tags.k",
                  "limits.max_string_length"),
    "cpu_cores": (task(resources={"cpu_cores": 8}), task(resources={"cpu_cores": 9}),
                  "resources.cpu_cores", "resources.max_cpu_cores: 8"),
    "ram_gb": (task(resources={"ram_gb": 64.0}), task(resources={"ram_gb": 64.5}),
               "resources.ram_gb", "resources.max_ram_gb: 64"),
    "disk_gb": (task(resources={"disk_gb": 100}), task(resources={"disk_gb": 1e6}),
                "resources.disk_gb", "resources.max_disk_gb: 100"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_at_the_limit_accepted_over_it_400(limited, name):
    at_limit, over, field, limit = CASES[name]
    assert requests.post(limited.api + "/tasks", json=at_limit, timeout=30).ok
    before = row_count(limited)
    resp = requests.post(limited.api + "/tasks", json=over, timeout=30)
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"]
    assert message.startswith(field + ":") and limit in message, message
    assert row_count(limited) == before


def test_default_limits_refuse_the_reviewed_floods(api_server):
    """Finding 8: 200k tags and 300k env entries were accepted; finding 14:
    cpu_cores 1000000 was accepted and pended forever."""
    floods = {"tags": task(tags={f"t{i}": "" for i in range(200_000)}),
              "executors.0.env": task(executors=[{**EXECUTOR, "env": {
                  f"E{i}": "" for i in range(300_000)}}]),
              "inputs.0.content": task(inputs=inputs(1, "x" * (2 * 1024 * 1024))),
              "resources.cpu_cores": task(resources={"cpu_cores": 1_000_000})}
    for field, body in floods.items():
        resp = requests.post(api_server.api + "/tasks", json=body, timeout=60)
        assert resp.status_code == 400, (field, resp.text[:300])
        assert resp.json()["message"].startswith(field + ":"), resp.json()["message"][:300]


@pytest.mark.parametrize("body", ["[" * 100_000, '{"executors": ' + "[" * 5000 + "]" * 5000 + "}",
                                  '{"tags": ' + '{"a":' * 3000 + "1" + "}" * 3001])
def test_deep_nesting_is_400_not_500(api_server, body):
    """Finding 9: RecursionError in the JSON parser was a 500."""
    resp = requests.post(api_server.api + "/tasks", data=body, timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["message"].startswith("body")


def test_listing_filters_beyond_limits_are_400_not_503(api_server):
    """Finding 9: 3000 tag_key filters or a 60,000-character name_prefix were 503 "retry"."""
    resp = requests.get(api_server.api + "/tasks", timeout=60,
                        params={"tag_key": [f"k{i}" for i in range(3000)]})
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["message"].startswith("tag_key:") and "limits.max_tag_filters" in \
        resp.json()["message"]
    resp = requests.get(api_server.api + "/tasks", params={"name_prefix": "n" * 60_000},
                        timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    assert "limits.max_name_length" in resp.json()["message"]
    # at the limits the database answers (no "expression tree too large" 503)
    at_limits = {"tag_key": [f"k{i}" for i in range(64)], "tag_value": ["v"] * 64,
                 "name_prefix": "n" * 4096}
    resp = requests.get(api_server.api + "/tasks", params=at_limits, timeout=60)
    assert resp.status_code == 200 and resp.json()["tasks"] == [], resp.text[:300]


def test_full_listing_pages_end_at_the_byte_bound(limited):
    """Finding 8: a FULL page held page_size tasks whatever their size. With
    limits.max_list_bytes 20000 and ~3 KB tasks a page stops early, the next page token
    continues it, and every task comes exactly once."""
    mark = "big-" + json.dumps(id(limited))[-6:]
    ids = [requests.post(limited.api + "/tasks", timeout=30, json=task(
        name=f"{mark}-{i}", description="d" * 2000, inputs=inputs(1, "c" * 1000))).json()["id"]
        for i in range(20)]
    seen, pages, token = [], 0, None
    while True:
        params: dict[str, str] = {"view": "FULL", "page_size": "40", "name_prefix": mark}
        if token:
            params["page_token"] = token
        resp = requests.get(limited.api + "/tasks", params=params, timeout=30)
        page = resp.json()
        assert 1 <= len(page["tasks"]) < 20 and len(resp.content) < 20000 + 4000
        seen += [t["id"] for t in page["tasks"]]
        pages += 1
        token = page.get("next_page_token")
        if not token:
            break
    assert seen == list(reversed(ids)) and pages >= 3
    minimal = requests.get(limited.api + "/tasks", timeout=30,
                           params={"page_size": "40", "name_prefix": mark}).json()
    assert len(minimal["tasks"]) == 20  # MINIMAL pages are not byte-bounded


def test_backend_parameter_values_are_checked_at_post(api_server):
    """Finding 15: a value that cannot sit on a scheduler directive line was accepted and
    failed at render time (SYSTEM_ERROR); now 400 at POST, strict or not."""
    for strict, value in ((True, "high\n#SBATCH --uid=0"), (False, "high\n#SBATCH --uid=0"),
                          (False, "high\n"), (True, "a b")):
        resp = requests.post(api_server.api + "/tasks", timeout=30, json=task(resources={
            "backend_parameters": {"queue": value}, "backend_parameters_strict": strict}))
        assert resp.status_code == 400, resp.text
        assert resp.json()["message"].startswith("resources.backend_parameters:")
    resp = requests.post(api_server.api + "/tasks", timeout=30, json=task(resources={
        "backend_parameters": {"queue": "long:gpu=2,[a-b]"}, "backend_parameters_strict": True}))
    assert resp.ok, resp.text


def test_validators_refuse_a_trailing_newline(api_server):
    """Finding 15: `re.match` with `$` took "NAME\\n" as an environment variable name."""
    resp = requests.post(api_server.api + "/tasks", timeout=30, json=task(
        executors=[{**EXECUTOR, "env": {"NAME\n": "x"}}]))
    assert resp.status_code == 400, resp.text
    assert "executors.0.env" in resp.json()["message"]


@pytest.mark.parametrize("body,start,reason", [
    ('{"name": "\\ud800", "executors": [{"image": "b", "command": ["x"]}]}', "name:",
     "surrogate"),
    ('{"tags": {"\\udc00": "x"}, "executors": [{"image": "b", "command": ["x"]}]}',
     "tags.\udc00:", "surrogate"),
    ('{"executors": [{"image": "b", "command": ["x", "\\udfff"]}]}', "executors.0.command.1:",
     "surrogate"),
    # an unknown field named so is ignored and named escaped: test_interop.py
])
def test_lone_surrogates_are_400_not_500(api_server, body, start, reason):
    """JSON may escape half a surrogate pair; no database or file can hold it (a name or
    tag key with one was a 500 on SQLite and PostgreSQL, and so was any error message
    echoing one)."""
    resp = requests.post(api_server.api + "/tasks", data=body, timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    message = resp.json()["message"]
    assert message.startswith(start) and reason in message, message
