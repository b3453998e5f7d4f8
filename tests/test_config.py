"""Configuration loading: defaults, file merge, environment overrides, unknown keys."""

from __future__ import annotations

import pytest

from gateway import config


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
    assert cfg["backend"]["local"]["backend_parameters"] == {"queue": "--queue"}


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(path, environ={})
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml", environ={})
