"""Configuration: conf/default.yaml, merged with a user file and FUNNEL_ env vars, loaded
into frozen typed sections (one class per section) and validated once, at start.

conf/default.yaml holds every default (and documents every key); the Section classes below
hold only the types. `load` merges the YAML layers as plain mappings (a key the defaults
lack is an error, except inside free-form mappings: empty ones ``{}``, FREE_FORM and every
backend's `backend_parameters`), computes the derived values (`finalize`) and converts the
result with `convert`, which names the key path and the value of the first wrong one:
``backend.slurm.command_timeout: expected a number, got "sixty"``. Booleans are strict
(true/false, never "yes" or 1); a list becomes a tuple; a mapping a read-only mapping.
"""

import copy
import json
import os
import types
from collections.abc import Mapping
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start

# Neither typing nor yaml is imported here: a worker given the gateway's JSON config needs
# neither, and each costs every worker start. Annotations are evaluated (no
# `from __future__ import annotations`): `convert` reads the field types themselves.

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

# The type of a free-form mapping's values: any YAML value, kept as it is.
FreeForm = Mapping[str, object]
Strings = tuple[str, ...]
Options = Mapping[str, str]  # backend_parameters: TES key -> the scheduler's option


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class MissingKey(ConfigError):
    """A section lacks a key (a worker-config.json written by another version)."""


if TYPE_CHECKING:
    from typing import ClassVar, dataclass_transform

    from funnel_hpc.core.routing import Router
else:
    def dataclass_transform(**_options: object) -> object:
        return lambda cls: cls


@dataclass_transform(frozen_default=True, kw_only_default=True)  # what mypy then checks
class Section:
    """A frozen record of typed fields: what a frozen dataclass would be, as a plain class
    (importing dataclasses, which imports inspect, would cost every worker start ~10 ms,
    and making ~30 dataclasses ~15 ms more). FIELDS: field name -> type, from the class's
    annotations; instances are made by `convert`, which checks every value."""

    FIELDS: "ClassVar[dict[str, object]]" = {}  # not a field itself

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.FIELDS = {**cls.FIELDS, **cls.__dict__.get("__annotations__", {})}  # a parent's first

    def __init__(self, **values: object) -> None:
        if set(values) != set(self.FIELDS):
            raise TypeError(f"{type(self).__name__} takes exactly {', '.join(self.FIELDS)}")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, name) == getattr(other, name) for name in self.FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({values})"


# ---- the sections (field types only: the defaults are conf/default.yaml's) ----

class ServerSection(Section):
    """server: the HTTP and gRPC listeners."""
    host: str
    http_port: int
    grpc_port: int
    grpc_reflection: bool | str
    threads: int
    max_body_bytes: int
    rate_limit_per_second: float
    rate_limit_burst: int
    public_url: str
    cors_origins: Strings
    readyz_needs_reconciler: bool
    readyz_tick_intervals: float
    strict_fields: bool


class DatabaseSection(Section):
    """database: the SQL store."""
    url: str
    sqlite_busy_timeout: float


class OidcSection(Section):
    """auth.oidc: JWT bearer tokens."""
    jwks_file: str
    jwks_url: str
    issuer: str
    audience: str
    algorithms: Strings
    user_claim: str
    admin_claim: str
    admin_values: Strings


class AuthSection(Section):
    """auth: who may call the API, gRPC and the dashboard."""
    mode: str
    users: Mapping[str, str]
    htpasswd_file: str
    tokens: Mapping[str, str]
    admins: Strings
    session_secret: str
    session_max_age_seconds: int
    session_cookie_secure: bool
    login_rate_per_second: float
    login_burst: int
    login_free_failures: int
    login_backoff_seconds: float
    login_backoff_max_seconds: float
    oidc: OidcSection


class ServiceInfoSection(Section):
    """service_info: what GET /service-info says."""
    id: str
    name: str
    description: str
    organization_name: str
    organization_url: str
    contact_url: str
    documentation_url: str
    environment: str
    storage: Strings


class InstanceQuota(Section):
    """limits.per_owner.instances.<instance> (and an owner's or group's): one owner's
    bounds on one backend instance. null: not set at this level (a less specific one
    decides); 0: no limit."""
    max_tasks_in_flight: int | None
    max_cpu_cores_in_flight: int | None


class OwnerQuota(InstanceQuota):
    """limits.per_owner.owners.<name> and .groups.<unix group>: an owner's bounds, overall
    and per instance; a key left out is decided by the less specific level."""
    instances: Mapping[str, InstanceQuota]


class PerOwnerSection(OwnerQuota):
    """limits.per_owner: what one owner may have in flight (core/quotas.py resolves it)."""
    metrics_by_owner: bool
    groups: Mapping[str, OwnerQuota]
    owners: Mapping[str, OwnerQuota]


class LimitsSection(Section):
    """limits: bounds on one request, checked at POST; per_owner: at submission."""
    max_content_bytes: int
    max_tags: int
    max_inputs: int
    max_outputs: int
    max_executors: int
    max_volumes: int
    max_env: int
    max_name_length: int
    max_string_length: int
    max_tag_filters: int
    max_list_bytes: int
    max_list_bytes_in_flight: int
    per_owner: PerOwnerSection


class ResourcesSection(Section):
    """resources: the largest resources a task may request (0: no limit)."""
    max_cpu_cores: int
    max_ram_gb: float
    max_disk_gb: float


class LocalOptions(Section):
    """backend.local."""
    max_concurrent: int
    backend_parameters: Options
    cancel_grace_seconds: float


class SshOptions(Section):
    """backend.slurm.ssh: run the Slurm commands on a login node."""
    host: str
    port: int
    user: str
    key_file: str
    known_hosts: str


class SlurmSite(Section):
    """backend.slurm.site: the site's additions to every script."""
    account: str
    qos: str
    extra_directives: Strings
    modules: Strings
    prologue: Strings


class SlurmRestOptions(Section):
    """backend.slurm.rest: the slurmrestd that mode `rest` talks to."""
    socket: str       # unix socket, rest_auth/local (used when url is empty)
    url: str          # http(s)://host:port of a slurmrestd with rest_auth/jwt
    token_file: str   # with url: the file holding the JWT (scontrol token)
    user: str         # with url: the user the token is for ("": the gateway's account)
    timeout: float    # seconds per request


class SlurmOptions(Section):
    """backend.slurm."""
    mode: str  # cli | rest (SLURM_MODES)
    rest: SlurmRestOptions
    template: str
    partition: str
    backend_parameters: Options
    site: SlurmSite
    submit_as_owner: bool
    owner_min_uid: int | None
    owner_max_uid: int | None
    owner_group: str
    owner_storage_file: str
    command_timeout: float
    ssh: SshOptions
    array_max: int
    array_template: str


class AwsBatchOptions(Section):
    """backend.aws_batch."""
    region: str
    endpoint_url: str
    job_queue: str
    job_definition: str
    worker_image: str
    default_memory_mib: int
    worker_command: Strings
    server_url: str  # derived: server.public_url when empty
    environment: Mapping[str, str]
    backend_parameters: Options
    timeout_seconds: float
    max_attempts: int


class HTCondorSite(Section):
    """backend.htcondor.site."""
    extra_commands: Strings
    prologue: Strings


class HTCondorOptions(Section):
    """backend.htcondor."""
    template: str
    wrapper_template: str
    schedd_name: str
    collector: str
    bindings: str
    backend_parameters: Options
    site: HTCondorSite
    array_max: int  # tasks per cluster of N procs (1: one job per task)


class GridEngineSite(Section):
    """backend.gridengine.site."""
    account: str
    extra_directives: Strings
    modules: Strings
    prologue: Strings


class GridEngineOptions(Section):
    """backend.gridengine."""
    mode: str
    template: str
    drmaa_library: str
    sge_root: str
    sge_cell: str
    queue: str
    parallel_environment: str
    memory_resource: str
    backend_parameters: Options
    site: GridEngineSite
    command_timeout: float
    static_tls: int
    accounting_file: str
    array_max: int  # tasks per array job, qsub -t (1: one job per task)


class PbsSite(Section):
    """backend.pbs.site."""
    account: str
    extra_directives: Strings
    modules: Strings
    prologue: Strings


class PbsOptions(Section):
    """backend.pbs: OpenPBS / PBS Professional through qsub/qstat/qdel/qselect."""
    template: str
    queue: str
    walltime: str
    backend_parameters: Options
    site: PbsSite
    command_timeout: float
    max_ids_per_qstat: int
    array_max: int  # tasks per array job, qsub -J (1: one job per task)


class TesOptions(Section):
    """backend.tes: another TES 1.1 server the tasks are forwarded to."""
    url: str
    token_file: str
    username: str
    password_file: str
    tag_key: str
    tag_value: str
    page_size: int
    timeout_seconds: float
    verify_tls: bool
    ca_file: str
    backend_parameters: Options


BackendOptions = LocalOptions | SlurmOptions | AwsBatchOptions | HTCondorOptions \
    | GridEngineOptions | TesOptions | PbsOptions


class BackendSection(Section):
    """backend: which backend runs tasks, and each backend's options."""
    name: str
    local: LocalOptions
    slurm: SlurmOptions
    aws_batch: AwsBatchOptions
    htcondor: HTCondorOptions
    gridengine: GridEngineOptions
    tes: TesOptions
    pbs: PbsOptions

    def options(self, name: str | None = None) -> BackendOptions | None:
        """The section of backend `name` (default: the configured one; "aws-batch" is
        written aws_batch), or None for a backend without one (a test double's)."""
        key = (name or self.name).replace("-", "_")
        options: BackendOptions | None = getattr(self, key) if key in self.FIELDS else None
        return options


class Instance(Section):
    """backends.<name>: one named backend instance (the single `backend:` form is one
    instance named after its kind). Its options are its kind's backend.<kind> section with
    the instance's own keys over them."""
    name: str
    kind: str
    options: BackendOptions | None  # None: a kind without a section (a test double's)


class ReconcilerSection(Section):
    """reconciler: the loop that submits, polls and folds events."""
    enabled: bool
    interval_seconds: float
    max_attempts: int
    retry_on: Strings
    submit_per_tick: int
    submit_threads: int
    lease_seconds: float
    pass_server_url: bool
    listen: str
    overflow_after_failed_polls: int
    linger_seconds: float


class RetentionSection(Section):
    """retention: how long finished tasks are kept."""
    task_days: float


class RedisSection(Section):
    """events.redis: the Redis Streams sink."""
    url: str
    stream_prefix: str
    maxlen: int


class WatchSection(Section):
    """events.watch: GET /funnel/v1/events streams."""
    max_clients: int
    max_clients_per_user: int
    poll_seconds: float
    heartbeat_seconds: float


class EventsSection(Section):
    """events: the outbox and its sinks."""
    publish: bool
    batch_size: int
    nice: int
    poll_seconds: float
    retry_min_seconds: float
    retry_max_seconds: float
    gap_grace_seconds: float
    retention_hours: float
    webhooks: tuple[FreeForm, ...]  # checked by gateway/sinks.py, which names the entry
    redis: RedisSection
    watch: WatchSection


class SandboxUids(Section):
    """worker.sandbox_uids: one host identity per running task."""
    first: int
    count: int
    lock_dir: str
    subordinate: str  # auto | off: a non-root worker's /etc/subuid range (worker/subids.py)


class WorkerSection(Section):
    """worker: how a worker runs a task's executors."""
    command: Strings
    container_driver: str
    auto_order: Strings
    image_cache: str
    registries: FreeForm
    pull: str
    image_retry_seconds: float
    image_pull_seconds: float
    image_max_bytes: int
    image_max_entries: int
    image_max_ratio: int
    image_ratio_min_layer_bytes: int
    host_root: str
    sandbox_user: str
    sandbox_uids: SandboxUids
    writable_root: str
    allow_unfiltered_proot: bool
    network: str
    limit_resources: str
    tmpfs_mb: int
    max_pids: int
    disk_check_seconds: float
    cgroup_parent: str
    log_tail_bytes: int
    log_update_seconds: float
    keep_workdir: str
    scratch_dir: str
    allowed_dirs: Strings
    link_inputs: bool
    bind_inputs: bool
    poll_server_seconds: float
    server_wait_seconds: float
    gpu_devices: Strings
    drivers: FreeForm


class S3Connection(Section):
    """What storage.s3 and each of its named endpoints say about one S3 service."""
    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str
    profile: str
    sse: str
    sse_kms_key_id: str
    multipart_threshold_mb: float
    multipart_chunk_mb: float


class S3Endpoint(S3Connection):
    """storage.s3.endpoints.<name>: a named endpoint, for some buckets or one URL host
    (the keys it does not set are conf/default.yaml's storage.s3 ones)."""
    buckets: Strings
    host: str


class S3Options(S3Connection):
    """storage.s3: the default endpoint, and the named ones."""
    endpoints: Mapping[str, S3Endpoint]


class GsOptions(Section):
    """storage.gs."""
    endpoint_url: str
    credentials_file: str
    anonymous: bool
    project: str
    ranged_threshold_mb: float
    ranged_chunk_mb: float


class HttpOptions(Section):
    """storage.http."""
    headers: Mapping[str, Mapping[str, str]]
    upload_method: str
    timeout_seconds: float


class StorageSection(Section):
    """storage: the URL schemes of inputs and outputs, and each store's options."""
    allowed_schemes: Strings
    retry_seconds: float
    max_parallel_transfers: int
    s3: S3Options
    gs: GsOptions
    http: HttpOptions


class LoggingSection(Section):
    """logging: the service's own log."""
    level: str
    format: str
    file: str


class WorkerConfig(Section):
    """What a worker reads: the work dir and the worker and storage sections."""
    work_dir: str
    worker: WorkerSection
    storage: StorageSection


class Config(Section):
    """The whole configuration, as `load` returns it."""
    work_dir: str  # absolute
    server: ServerSection
    database: DatabaseSection
    auth: AuthSection
    service_info: ServiceInfoSection
    limits: LimitsSection
    resources: ResourcesSection
    backend: BackendSection
    # derived at load from `backends:` (or the single `backend:` form), in the file's order
    backends: Mapping[str, Instance]
    routing: tuple[FreeForm, ...]  # checked at load by core/routing.py (see router())
    reconciler: ReconcilerSection
    retention: RetentionSection
    events: EventsSection
    worker: WorkerSection
    storage: StorageSection
    logging: LoggingSection

    def instances(self) -> tuple[Instance, ...]:
        return tuple(self.backends.values())

    def instance(self, name: str) -> Instance:
        """The instance `name`; KeyError naming the known ones."""
        try:
            return self.backends[name]
        except KeyError:
            raise KeyError(f"no backend instance {name!r} (instances: "
                           f"{', '.join(self.backends)})") from None

    def router(self) -> "Router":
        """The routing rules, in order (checked at load: cannot fail here)."""
        from funnel_hpc.core.routing import Router, parse_rules

        names = list(self.backends)
        return Router(parse_rules(self.routing, names), default=names[0])

    def for_worker(self) -> WorkerConfig:
        return WorkerConfig(work_dir=self.work_dir, worker=self.worker, storage=self.storage)


# ---- conversion: plain values (YAML, JSON) <-> the sections ----

KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              type(None): "null"}


def _describe(kind: object) -> str:
    if isinstance(kind, types.UnionType):
        return " or ".join(_describe(arg) for arg in kind.__args__)
    origin = getattr(kind, "__origin__", None)
    if origin is tuple:
        return "a list"
    if origin is Mapping or _is_section(kind):
        return "a mapping"
    return KIND_NAMES.get(kind, str(kind))  # type: ignore[call-overload]


def _shown(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def convert(kind: object, value: object, path: str) -> object:
    """`value` (plain YAML/JSON data) as type `kind`: a Section class, int, float,
    bool, str, X | None, tuple[X, ...], Mapping[str, X] or object (kept as it is);
    ConfigError naming `path` and the value otherwise."""
    if _is_section(kind):
        return _section(kind, value, path)  # type: ignore[arg-type]
    if kind is object:
        return copy.deepcopy(value)
    if isinstance(kind, types.UnionType):
        for arg in kind.__args__:
            try:
                return convert(arg, value, path)
            except ConfigError:
                continue
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind in (bool, str, type(None)):
        if type(value) is kind:
            return value
    elif getattr(kind, "__origin__", None) is tuple:
        if isinstance(value, (list, tuple)):
            item_kind = kind.__args__[0]  # type: ignore[attr-defined]
            return tuple(convert(item_kind, item, f"{path}[{index}]")
                         for index, item in enumerate(value))
    elif getattr(kind, "__origin__", None) is Mapping:
        if isinstance(value, Mapping):
            value_kind = kind.__args__[1]  # type: ignore[attr-defined]
            for key in value:
                if not isinstance(key, str):
                    raise ConfigError(f"{_key(path, key)}: a key must be a string, "
                                      f"got {_shown(key)}")
            return types.MappingProxyType({key: convert(value_kind, item, _key(path, key))
                                           for key, item in value.items()})
    else:
        raise TypeError(f"{path}: no conversion to {kind!r}")
    raise ConfigError(f"{path}: expected {_describe(kind)}, got {_shown(value)}")


def _is_section(kind: object) -> bool:
    return isinstance(kind, type) and issubclass(kind, Section)


def _section(cls: type[Section], value: object, path: str) -> Section:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path or 'the configuration'}: expected a mapping, "
                          f"got {_shown(value)}")
    for key in value:
        if key not in cls.FIELDS:
            raise ConfigError(f"unknown configuration key: {_key(path, key)}")
    for name in cls.FIELDS:
        if name not in value:
            raise MissingKey(f"{_key(path, name)}: missing")
    return cls(**{name: convert(kind, value[name], _key(path, name))
                  for name, kind in cls.FIELDS.items()})


def plain(value: object) -> object:
    """A section (or any value of one) as plain JSON data: dicts, lists, scalars."""
    if isinstance(value, Section):
        return {name: plain(getattr(value, name)) for name in value.FIELDS}
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def replace(section: Section, path: str, **values: object) -> object:
    """A copy of `section` (at `path`) with some keys set to plain values, converted and
    checked like the file's (for tests and tools that build one section); a mapping given
    for a sub-section replaces only the keys it names."""
    data = plain(section)
    assert isinstance(data, dict)
    for key, value in values.items():
        current = getattr(section, key, None)
        data[key] = ({**data[key], **value}
                     if isinstance(current, Section) and isinstance(value, Mapping) else value)
    return convert(type(section), data, path)


# ---- the YAML layers ----

def _is_free_form(path: str, default: object) -> bool:
    return ((isinstance(default, dict) and not default) or path in FREE_FORM
            or path.endswith(".backend_parameters"))


def merge(base: dict, override: Mapping, path: str = "") -> dict:
    """Return base updated with override; unknown keys raise ConfigError."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = _key(path, key)
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
                raise ConfigError(f"{dotted}: expected a mapping, got {_shown(value)}")
            if _is_free_form(dotted, current):
                out[key] = {**current, **copy.deepcopy(dict(value))}
            else:
                out[key] = merge(current, value, dotted)
        else:
            out[key] = copy.deepcopy(value)
    return out


_LOADERS: list = []  # the YAML loader class, made on first use


def _yaml_loader() -> type:
    """yaml's safe loader (libyaml's parser when there) whose booleans are true and false
    only, as in YAML 1.2: yes, no, on and off stay strings (a bool key refuses them)."""
    if not _LOADERS:
        import re

        import yaml

        base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        bool_tag = "tag:yaml.org,2002:bool"
        loader = type("StrictBoolLoader", (base,), {"yaml_implicit_resolvers": {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
            for first, resolvers in base.yaml_implicit_resolvers.items()}})
        loader.add_implicit_resolver(  # type: ignore[attr-defined]
            bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
        _LOADERS.append(loader)
    return _LOADERS[0]


def _parse_yaml(text: str) -> object:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = _parse_yaml(path.read_text()) or {}
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
            value = _parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge_env(config: dict, env: dict) -> dict:
    try:
        return merge(config, env)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from a {ENV_PREFIX} environment variable)") from exc


def load_plain(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
               overrides: Mapping | None = None) -> dict:
    """The merged configuration as plain data, derived values computed, not yet checked:
    defaults <- file at path <- environment <- explicit overrides."""
    config = defaults = _read_yaml(DEFAULT_CONFIG)
    if path:
        config = merge(config, _read_yaml(Path(path)))
    env = env_overrides(os.environ if environ is None else environ)
    if env:
        config = _merge_env(config, env)
    if overrides:
        config = merge(config, overrides)
    _fill_endpoints(config["storage"], defaults)
    _fill_quotas(config["limits"].get("per_owner"))
    return finalize(config)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping | None = None) -> Config:
    """The typed configuration (see load_plain); ConfigError names the first bad key."""
    plain_config = load_plain(path, environ, overrides)
    declared = bool(plain_config.get("backends"))  # named instances, not `backend:` alone
    plain_config["backends"] = _instances(plain_config)
    config = convert(Config, plain_config, "")
    assert isinstance(config, Config)
    _check_quotas(config)
    _check_slurm(config, declared)
    from funnel_hpc.core.routing import RuleError, parse_rules

    try:
        parse_rules(config.routing, list(config.backends))
    except RuleError as exc:
        raise ConfigError(str(exc)) from None
    return config


def _instances(config: dict) -> dict:
    """backends.<name> as {name, kind, options}: the kind's backend.<kind> section with the
    instance's keys merged over it (an unknown key is named backends.<name>.<key>). No
    `backends:`: one instance, named after backend.name, of that kind."""
    import re

    backend = config["backend"]
    declared = config.get("backends") or {}
    if not isinstance(declared, Mapping):
        raise ConfigError(f"backends: expected a mapping, got {_shown(declared)}")
    if not declared:
        declared = {backend["name"]: {"kind": backend["name"]}}
    out = {}
    for name, entry in declared.items():
        path = _key("backends", name)
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
            raise ConfigError(f"{path}: an instance name is a lower-case letter, then up to "
                              "31 letters, digits, _ or - (it names leases, metrics, tags)")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("kind"), str):
            raise ConfigError(f"{path}.kind: every instance names its kind (local, slurm, "
                              f"gridengine, htcondor, aws-batch, tes...), got {_shown(entry)}")
        kind = entry["kind"]
        section = backend.get(kind.replace("-", "_")) if kind != "name" else None
        own = {key: value for key, value in entry.items() if key != "kind"}
        if isinstance(section, dict):
            options = merge(section, own, path)
            convert(BackendSection.FIELDS[kind.replace("-", "_")], options, path)  # names the key
        elif own:
            raise ConfigError(f"{path}: backend kind {kind!r} has no options "
                              f"(known kinds: {', '.join(k for k in backend if k != 'name')})")
        else:
            options = None
        out[name] = {"name": name, "kind": kind, "options": options}
    return out


def _fill_quotas(per_owner: object) -> None:
    """limits.per_owner's owner, group and instance entries with the keys they leave out
    (null: a less specific level decides, core/quotas.py)."""
    if not isinstance(per_owner, dict):
        return  # convert names what is wrong
    unset = {"max_tasks_in_flight": None, "max_cpu_cores_in_flight": None}

    def filled(entries: object, blank: dict) -> object:
        if not isinstance(entries, dict):
            return entries
        return {name: {**blank, **entry} if isinstance(entry, dict) else entry
                for name, entry in entries.items()}

    per_owner["instances"] = filled(per_owner.get("instances"), unset)
    for kind in ("groups", "owners"):
        per_owner[kind] = filled(per_owner.get(kind), {**unset, "instances": {}})
        for entry in (per_owner[kind] or {}).values():
            if isinstance(entry, dict):
                entry["instances"] = filled(entry["instances"], unset)


def _check_quotas(config: Config) -> None:
    """limits.per_owner: no negative bound, and instances that exist."""
    per_owner = config.limits.per_owner
    path = "limits.per_owner"
    levels = [(path, per_owner)]
    levels += [(f"{path}.{kind}.{name}", entry) for kind in ("groups", "owners")
               for name, entry in getattr(per_owner, kind).items()]
    for where, level in levels:
        places = [(where, level)] + [(f"{where}.instances.{name}", entry)
                                     for name, entry in level.instances.items()]
        for name in level.instances:
            if name not in config.backends:
                raise ConfigError(f"{where}.instances.{name}: no backend instance {name!r} "
                                  f"(instances: {', '.join(config.backends)})")
        for place, entry in places:
            for key in InstanceQuota.FIELDS:
                value = getattr(entry, key)
                if value is not None and value < 0:
                    raise ConfigError(f"{place}.{key}: 0 (no limit) or more, got {value}")


SLURM_MODES = ("cli", "rest")
# backend.slurm.rest.url: http(s)://host[:port], nothing after (the API paths are ours)
_REST_URL = r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?/?"


def _check_slurm(config: Config, declared: bool) -> None:
    """Every Slurm instance's mode, and in rest mode its rest section: one way to reach
    slurmrestd, and no option rest mode cannot honour."""
    import re

    for instance in config.instances():
        options = instance.options
        if instance.kind != "slurm" or not isinstance(options, SlurmOptions):
            continue
        path = f"backends.{instance.name}" if declared else "backend.slurm"
        if options.mode not in SLURM_MODES:
            raise ConfigError(f"{path}.mode: one of {', '.join(SLURM_MODES)}, "
                              f"got {_shown(options.mode)}")
        if options.mode != "rest":
            continue
        rest = options.rest
        if rest.url:
            if not re.fullmatch(_REST_URL, rest.url):
                raise ConfigError(f"{path}.rest.url: http(s)://host[:port], got "
                                  f"{_shown(rest.url)}")
            if not rest.token_file:
                raise ConfigError(f"{path}.rest.token_file: needed with rest.url "
                                  "(rest_auth/jwt: the file holding the token)")
        elif not rest.socket.startswith("/"):
            raise ConfigError(f"{path}.rest.socket: an absolute path (or set rest.url), "
                              f"got {_shown(rest.socket)}")
        if rest.user and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", rest.user):
            raise ConfigError(f"{path}.rest.user: a user name, got {_shown(rest.user)}")
        if not rest.timeout > 0:
            raise ConfigError(f"{path}.rest.timeout: more than 0 seconds, got {rest.timeout}")
        if options.submit_as_owner and not rest.url:  # rest_auth/local: its caller only
            raise ConfigError(f"{path}.submit_as_owner: with mode rest, needs rest.url "
                              "(rest_auth/jwt: each owner's token); over a unix socket "
                              "every job is slurmrestd's caller's")
        if options.ssh.host:
            raise ConfigError(f"{path}.ssh.host: not used with mode rest (reach a remote "
                              "slurmrestd with rest.url)")


def _fill_endpoints(storage: dict, defaults: dict) -> None:
    """Each named S3 endpoint with the keys it leaves out: the defaults' storage.s3."""
    s3 = storage.get("s3")
    if not isinstance(s3, dict) or not isinstance(s3.get("endpoints"), dict):
        return  # convert names what is wrong
    base = {key: value for key, value in defaults["storage"]["s3"].items() if key != "endpoints"}
    s3["endpoints"] = {name: {**base, "buckets": [], "host": "", **entry}
                       if isinstance(entry, dict) else entry
                       for name, entry in s3["endpoints"].items()}


def finalize(config: dict) -> dict:
    """Resolve derived values (absolute work dir, default database URL, public URL, the
    URL AWS Batch jobs are given)."""
    work_dir = Path(os.path.expanduser(str(config["work_dir"]))).resolve()
    config["work_dir"] = str(work_dir)
    if not config["database"]["url"]:
        config["database"]["url"] = f"sqlite:///{work_dir / 'funnel.db'}"
    server = config["server"]
    if not server["public_url"]:
        host = server["host"] if server["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
        server["public_url"] = f"http://{host}:{server['http_port']}"
    aws_batch = config["backend"]["aws_batch"]
    if not aws_batch["server_url"]:
        aws_batch["server_url"] = server["public_url"]
    return config


# ---- the worker's configuration ----

WORKER_SECTIONS = ("work_dir", "worker", "storage")
# in the per-task config of a worker that runs as the task's owner
# (gateway/reconcile/owner_worker.py): the owner's own storage settings file
# (backend.slurm.owner_storage_file)
OWNER_STORAGE_KEY = "owner_storage_file"


def worker_sections(config: Config | WorkerConfig) -> dict:
    """What a worker needs of a configuration, as plain data for its JSON file (see
    load_worker)."""
    sections = plain(config.for_worker() if isinstance(config, Config) else config)
    assert isinstance(sections, dict)
    return sections


def load_worker(path: str | Path | None = None,
                environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """A worker's configuration.

    A .json file is the gateway's own (`worker_sections` of its configuration, written
    to <work_dir>/worker-config.json, or an owner's per-task copy): taken as it is, with
    the owner's storage settings file (when it names one) and then the FUNNEL_ variables
    of those sections applied on top. Anything else goes through `load`."""
    if not path or not str(path).endswith(".json"):
        return load(path, environ).for_worker()
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
        config = _merge_env(config, env)
    config["work_dir"] = str(Path(os.path.expanduser(str(config["work_dir"]))).resolve())
    try:
        typed = convert(WorkerConfig, config, "")
    except MissingKey:  # written by an older gateway: the defaults fill the gaps
        defaults = _read_yaml(DEFAULT_CONFIG)
        typed = convert(WorkerConfig, merge({key: defaults[key] for key in WORKER_SECTIONS},
                                            config), "")
    assert isinstance(typed, WorkerConfig)
    return typed


def for_owner(config: dict) -> dict:
    """An owner's per-task config (plain, from the JSON file) as the owner's worker uses
    it: "~" in worker.image_cache and in the owner's storage settings file name is the
    running user's home (from the password database, not $HOME), and that file's
    `storage:` mapping is merged over the storage section (a missing file changes
    nothing). The file's name is taken out of the result."""
    import pwd

    home = pwd.getpwuid(os.getuid()).pw_dir

    def expand(name: str) -> str:
        return home + name[1:] if name == "~" or name.startswith("~/") else name

    config = dict(config)
    worker = config["worker"] = dict(config["worker"])
    worker["image_cache"] = expand(str(worker.get("image_cache") or ""))
    name = expand(str(config.pop(OWNER_STORAGE_KEY, None) or ""))
    if not name or not Path(name).exists():
        return config
    data = _read_yaml(Path(name))
    if set(data) - {"storage"}:
        raise ConfigError(f"config file {name} may hold only a storage: mapping "
                          f"(found {', '.join(sorted(map(str, data)))})")
    config = merge(config, {"storage": data.get("storage") or {}})
    _fill_endpoints(config["storage"], _read_yaml(DEFAULT_CONFIG))
    return config
