"""Configuration loading: defaults, file merge, environment overrides, unknown keys."""

from __future__ import annotations

import pytest

from funnel_hpc.core import config


def test_defaults_give_sqlite_under_work_dir(tmp_path):
    cfg = config.load(environ={}, overrides={"work_dir": str(tmp_path)})
    assert cfg["database"]["url"] == f"sqlite:///{tmp_path}/funnel.db"
    assert cfg["backend"]["name"] == "local"
    assert cfg["server"]["public_url"] == "http://127.0.0.1:8000"


def test_file_merges_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  http_port: 8111\nreconciler:\n  interval_seconds: 1\n")
    cfg = config.load(path, environ={})
    assert cfg["server"]["http_port"] == 8111
    assert cfg["server"]["grpc_port"] == 9090  # untouched default
    assert cfg["reconciler"]["interval_seconds"] == 1


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  http_port: 8111\n")
    cfg = config.load(path, environ={"FUNNEL_SERVER__HTTP_PORT": "8222",
                                     "FUNNEL_DATABASE__URL": "postgresql+psycopg://u@h/d",
                                     "FUNNEL_SERVER": "http://ignored-client-setting"})
    assert cfg["server"]["http_port"] == 8222
    assert cfg["database"]["url"] == "postgresql+psycopg://u@h/d"


@pytest.mark.parametrize("text,key", [
    ("servr:\n  http_port: 1\n", "servr"),
    ("server:\n  http_prot: 1\n", "server.http_prot"),
    ("backend:\n  local:\n    max_concurent: 3\n", "backend.local.max_concurent"),
])
def test_unknown_keys_are_named(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load(path, environ={})


def test_unknown_env_key_is_named():
    with pytest.raises(config.ConfigError, match="server.nope"):
        config.load(environ={"FUNNEL_SERVER__NOPE": "1"})


def test_free_form_mappings_accept_new_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backend:\n  local:\n    backend_parameters:\n      queue: --queue\n")
    cfg = config.load(path, environ={})
    assert cfg["backend"]["local"]["backend_parameters"] == {"gpus": "gpus", "queue": "--queue"}


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(path, environ={})
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml", environ={})


def test_worker_reads_the_gateways_json_sections_as_they_are(tmp_path):
    full = config.load(environ={}, overrides={"work_dir": str(tmp_path),
                                              "worker": {"container_driver": "proot"}})
    path = tmp_path / "worker-config.json"
    import json

    path.write_text(json.dumps(config.worker_sections(full)))
    loaded = config.load_worker(path, environ={
        "FUNNEL_WORKER__LOG_TAIL_BYTES": "99",       # a worker section: applied
        "FUNNEL_SERVER__HTTP_PORT": "1"})            # not the worker's: ignored
    assert loaded["worker"]["container_driver"] == "proot"
    assert loaded["worker"]["log_tail_bytes"] == 99
    assert loaded["storage"] == full["storage"] and "server" not in loaded
    with pytest.raises(config.ConfigError, match="unknown"):
        config.load_worker(path, environ={"FUNNEL_WORKER__NO_SUCH_KEY": "1"})
    path.write_text('{"worker": {}}')
    with pytest.raises(config.ConfigError, match="must hold the sections"):
        config.load_worker(path, environ={})
    path.write_text("{not json")
    with pytest.raises(config.ConfigError, match="not valid JSON"):
        config.load_worker(path, environ={})
    yaml_file = tmp_path / "w.yaml"
    yaml_file.write_text("worker:\n  container_driver: bwrap\n")
    assert config.load_worker(yaml_file, environ={})["server"]  # YAML: the full load
