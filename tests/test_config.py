"""Configuration loading: defaults, file merge, environment overrides, unknown keys."""

from __future__ import annotations

import pytest

from funnel_hpc.core import config


def test_defaults_give_sqlite_under_work_dir(tmp_path):
    cfg = config.load(environ={}, overrides={"work_dir": str(tmp_path)})
    assert cfg.database.url == f"sqlite:///{tmp_path}/funnel.db"
    assert cfg.backend.name == "local"
    assert cfg.server.public_url == "http://127.0.0.1:8000"


def test_file_merges_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  http_port: 8111\nreconciler:\n  interval_seconds: 1\n")
    cfg = config.load(path, environ={})
    assert cfg.server.http_port == 8111
    assert cfg.server.grpc_port == 9090  # untouched default
    assert cfg.reconciler.interval_seconds == 1


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  http_port: 8111\n")
    cfg = config.load(path, environ={"FUNNEL_SERVER__HTTP_PORT": "8222",
                                     "FUNNEL_DATABASE__URL": "postgresql+psycopg://u@h/d",
                                     "FUNNEL_SERVER": "http://ignored-client-setting"})
    assert cfg.server.http_port == 8222
    assert cfg.database.url == "postgresql+psycopg://u@h/d"


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
    assert cfg.backend.local.backend_parameters == {"gpus": "gpus", "queue": "--queue"}


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
    assert loaded.worker.container_driver == "proot"
    assert loaded.worker.log_tail_bytes == 99
    assert loaded.storage == full.storage and not hasattr(loaded, "server")
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
    assert config.load_worker(yaml_file, environ={}).worker.container_driver == "bwrap"  # YAML


@pytest.mark.parametrize("env,message", [
    ({"FUNNEL_BACKEND__SLURM__COMMAND_TIMEOUT": "sixty"},
     'backend.slurm.command_timeout: expected a number, got "sixty"'),
    ({"FUNNEL_SERVER__STRICT_FIELDS": "yes"},
     'server.strict_fields: expected true or false, got "yes"'),
    ({"FUNNEL_EVENTS__PUBLISH": "1"}, "events.publish: expected true or false, got 1"),
    ({"FUNNEL_SERVER__HTTP_PORT": "80.5"}, "server.http_port: expected an integer, got 80.5"),
    ({"FUNNEL_WORKER__AUTO_ORDER": "bwrap"}, 'worker.auto_order: expected a list, got "bwrap"'),
    ({"FUNNEL_AUTH__ADMINS": "[alice, 7]"}, "auth.admins[1]: expected a string, got 7"),
    ({"FUNNEL_BACKEND__SLURM__OWNER_MIN_UID": "x"},
     'backend.slurm.owner_min_uid: expected an integer or null, got "x"'),
    ({"FUNNEL_STORAGE__HTTP__HEADERS": "{h: {Authorization: 5}}"},
     "storage.http.headers.h.Authorization: expected a string, got 5"),
])
def test_a_wrong_type_is_refused_at_load_naming_the_key_and_the_value(env, message):
    with pytest.raises(config.ConfigError) as caught:
        config.load(environ=env)
    assert str(caught.value) == message


def test_sections_are_typed_and_read_only(tmp_path):
    cfg = config.load(environ={"FUNNEL_RECONCILER__INTERVAL_SECONDS": "2"},
                      overrides={"work_dir": str(tmp_path)})
    assert cfg.reconciler.interval_seconds == 2.0 and type(cfg.reconciler.interval_seconds) is float
    assert cfg.worker.auto_order[0] == "docker" and isinstance(cfg.worker.auto_order, tuple)
    assert cfg.backend.options("aws-batch") is cfg.backend.aws_batch
    assert cfg.backend.aws_batch.server_url == cfg.server.public_url  # derived at load
    with pytest.raises(AttributeError):
        cfg.server.http_port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.backend.local.backend_parameters["x"] = "y"  # type: ignore[index]
    assert config.convert(config.Config, config.plain(cfg), "") == cfg  # plain <-> typed


def test_named_s3_endpoints_take_the_default_keys_they_leave_out():
    cfg = config.load(environ={}, overrides={"storage": {"s3": {"endpoints": {
        "archive": {"endpoint_url": "https://s3.site.org", "buckets": ["arch-*"]}}}}})
    archive = cfg.storage.s3.endpoints["archive"]
    assert archive.endpoint_url == "https://s3.site.org" and archive.buckets == ("arch-*",)
    assert archive.multipart_chunk_mb == 16 and archive.host == ""
    with pytest.raises(config.ConfigError, match="unknown configuration key: "
                                                 r"storage\.s3\.endpoints\.archive\.bucket$"):
        config.load(environ={}, overrides={"storage": {"s3": {"endpoints": {
            "archive": {"bucket": ["x"]}}}}})


def test_a_worker_config_json_missing_keys_gets_the_defaults(tmp_path):
    sections = config.worker_sections(config.load(environ={}))
    del sections["worker"]["log_tail_bytes"]  # written by an older gateway
    path = tmp_path / "worker-config.json"
    import json

    path.write_text(json.dumps(sections))
    assert config.load_worker(path, environ={}).worker.log_tail_bytes == 10240
    sections["worker"]["log_tail_bytes"] = "big"
    path.write_text(json.dumps(sections))
    with pytest.raises(config.ConfigError, match='worker.log_tail_bytes: expected an integer'):
        config.load_worker(path, environ={})
