"""Configuration: conf/default.yaml, merged with a user file and FUNNEL_ env vars.

Every key a user sets must exist in the defaults, except inside mappings the
defaults leave empty (``{}``) or list in FREE_FORM: those are free-form.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

# yaml is imported where it is used: a worker given the gateway's JSON config never needs it

# The installed package holds conf/ and templates/ beside core/ (package data, see
# pyproject.toml); resolved, a strict editable install points at the checkout's folders.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PACKAGE_ROOT / "conf" / "default.yaml"
TEMPLATES_DIR = PACKAGE_ROOT / "templates"

ENV_PREFIX = "FUNNEL_"
# FUNNEL_SERVER / FUNNEL_CONFIG / FUNNEL_RETRY_SECONDS are client settings, not overrides.
ENV_RESERVED = {"FUNNEL_SERVER", "FUNNEL_CONFIG", "FUNNEL_WORKER_TOKEN", "FUNNEL_RETRY_SECONDS"}

# Dotted paths whose mappings accept keys the defaults do not list
# (besides empty mappings and every backend's `backend_parameters`).
FREE_FORM: set[str] = {
    "worker.drivers",
}


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def _is_free_form(path: str, default: Any) -> bool:
    return ((isinstance(default, dict) and not default) or path in FREE_FORM
            or path.endswith(".backend_parameters"))


def merge(base: dict, override: Mapping, path: str = "") -> dict:
    """Return base updated with override; unknown keys raise ConfigError."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in out:
            if _is_free_form(path, base):
                out[key] = copy.deepcopy(value)
                continue
            raise ConfigError(f"unknown configuration key: {dotted}")
        current = out[key]
        if isinstance(current, dict):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"configuration key {dotted} must be a mapping")
            if _is_free_form(dotted, current):
                out[key] = {**current, **copy.deepcopy(dict(value))}
            else:
                out[key] = merge(current, value, dotted)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when there
    try:
        data = yaml.load(path.read_text(), Loader=loader) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict:
    """Turn FUNNEL_A__B=v variables into {"a": {"b": v}}."""
    out: dict = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(f"malformed configuration variable: {name}")
        import yaml

        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping | None = None) -> dict:
    """Defaults <- file at path <- environment <- explicit overrides."""
    config = _read_yaml(DEFAULT_CONFIG)
    if path:
        config = merge(config, _read_yaml(Path(path)))
    env = env_overrides(os.environ if environ is None else environ)
    if env:
        try:
            config = merge(config, env)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from a {ENV_PREFIX} environment variable)") from exc
    if overrides:
        config = merge(config, overrides)
    return finalize(config)


WORKER_SECTIONS = ("work_dir", "worker", "storage")
# in the per-task config of a worker that runs as the task's owner
# (gateway/reconcile/owner_worker.py): the owner's own storage settings file
# (backend.slurm.owner_storage_file)
OWNER_STORAGE_KEY = "owner_storage_file"


def worker_sections(config: dict) -> dict:
    """What a worker needs of a full configuration (see load_worker)."""
    return {key: config[key] for key in WORKER_SECTIONS}


def load_worker(path: str | Path | None = None,
                environ: Mapping[str, str] | None = None) -> dict:
    """A worker's configuration.

    A .json file is the gateway's own (`worker_sections` of its merged configuration,
    written to <work_dir>/worker-config.json, or an owner's per-task copy): taken as it
    is, with the owner's storage settings file (when it names one) and then the FUNNEL_
    variables of those sections applied on top. Anything else goes through `load`."""
    if not path or not str(path).endswith(".json"):
        return load(path, environ)
    try:
        config = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or any(key not in config for key in WORKER_SECTIONS):
        raise ConfigError(f"config file {path} must hold the sections "
                          f"{', '.join(WORKER_SECTIONS)}")
    if OWNER_STORAGE_KEY in config:
        config = for_owner(config)
    env = env_overrides(os.environ if environ is None else environ)
    env = {key: value for key, value in env.items() if key in WORKER_SECTIONS}
    if env:
        try:
            config = merge(config, env)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from a {ENV_PREFIX} environment variable)") from exc
    config["work_dir"] = str(Path(os.path.expanduser(str(config["work_dir"]))).resolve())
    return config


def for_owner(config: dict) -> dict:
    """An owner's per-task config as the owner's worker uses it: "~" in worker.image_cache
    and in the owner's storage settings file name is the running user's home (from the
    password database, not $HOME), and that file's `storage:` mapping is merged over the
    storage section (a missing file changes nothing)."""
    import pwd

    home = pwd.getpwuid(os.getuid()).pw_dir

    def expand(name: str) -> str:
        return home + name[1:] if name == "~" or name.startswith("~/") else name

    worker = config["worker"]
    worker["image_cache"] = expand(str(worker.get("image_cache") or ""))
    name = expand(str(config.get(OWNER_STORAGE_KEY) or ""))
    if not name or not Path(name).exists():
        return config
    data = _read_yaml(Path(name))
    if set(data) - {"storage"}:
        raise ConfigError(f"config file {name} may hold only a storage: mapping "
                          f"(found {', '.join(sorted(map(str, data)))})")
    return merge(config, {"storage": data.get("storage") or {}})


def finalize(config: dict) -> dict:
    """Resolve derived values (absolute work dir, default database URL)."""
    work_dir = Path(os.path.expanduser(str(config["work_dir"]))).resolve()
    config["work_dir"] = str(work_dir)
    if not config["database"]["url"]:
        config["database"]["url"] = f"sqlite:///{work_dir / 'funnel.db'}"
    server = config["server"]
    if not isinstance(server["strict_fields"], bool):
        raise ConfigError(f"server.strict_fields must be true or false, got "
                          f"{server['strict_fields']!r}")
    if not server["public_url"]:
        host = server["host"] if server["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
        server["public_url"] = f"http://{host}:{server['http_port']}"
    return config
