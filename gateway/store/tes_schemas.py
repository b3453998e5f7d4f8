"""Marshmallow schemas of the TES 1.1 model: validation of what clients send,
and the OpenAPI description of what the server returns.

Field names follow the TES OpenAPI (snake_case). Booleans are JSON true or false only.
Unknown fields are ignored and named (``load_task_lenient``), or refused where the
server is configured strict (``server.strict_fields``) and by ``load_task``; the
read-only fields a client may echo back (id, state, logs, creation_time) are ignored
on create.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from funnel_hpc.core.states import ALL_STATES

VIEWS = ("MINIMAL", "BASIC", "FULL")
FILE_TYPES = ("FILE", "DIRECTORY")
READ_ONLY_TASK_FIELDS = ("id", "state", "logs", "creation_time")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # used with fullmatch
WILDCARD = re.compile(r"[*?\[]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_container_path(value: str, *, wildcards: bool = False) -> None:
    """A path inside the container: absolute, no `..`, no control characters."""
    if not value.startswith("/"):
        raise ValidationError(f"must be an absolute path, got {value!r}")
    if _CONTROL.search(value):
        raise ValidationError("must not contain control characters")
    if ".." in value.split("/"):
        raise ValidationError(f"must not contain '..', got {value!r}")
    if not wildcards and WILDCARD.search(value):
        raise ValidationError(f"wildcards are only allowed in output paths, got {value!r}")


class ContainerPath(fields.String):
    def __init__(self, *, wildcards: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.wildcards = wildcards

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        check_container_path(text, wildcards=self.wildcards)
        # A file directly under / is bound alone (worker/paths.py); / itself would hide
        # the image, so nothing may be bound there.
        if not posixpath.normpath(text).strip("/"):  # "/", "//", "/./"
            raise ValidationError("the container's root directory cannot be bound: use a "
                                  "directory below it (e.g. /data)")
        return text


class StrictBoolean(fields.Boolean):
    """JSON true or false, nothing else ("yes", 0 and 1 are refused: 1 == True in Python)."""

    default_error_messages = {"invalid": "must be true or false (a JSON boolean)"}

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


UNKNOWN_FIELD = "Unknown field."  # marshmallow's message for a field the schema lacks


class StrictSchema(Schema):
    """Refuse unknown fields; treat explicit JSON null like an absent field."""

    class Meta:
        unknown = RAISE
        ordered = True

    error_messages = {"unknown": UNKNOWN_FIELD}

    @pre_load
    def _drop_nulls(self, data, **kwargs):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


_text: dict[str, Any] = dict(validate=validate.Length(max=65536))
_string_map: dict[str, Any] = dict(keys=fields.String(validate=validate.Length(min=1, max=1024)),
                   values=fields.String(validate=validate.Length(max=65536)))


class InputSchema(StrictSchema):
    name = fields.String(**_text)
    description = fields.String(**_text)
    url = fields.String(validate=validate.Length(min=1, max=8192))
    path = ContainerPath(required=True, validate=validate.Length(max=4096))
    type = fields.String(validate=validate.OneOf(FILE_TYPES))
    content = fields.String()
    streamable = StrictBoolean()

    @validates_schema
    def _url_or_content(self, data, **kwargs):
        # TES 1.1: "If content is not empty, url must be ignored" -- both may be sent.
        if "url" not in data and "content" not in data:
            raise ValidationError("one of url or content is required", "url")
        if data.get("content") and data.get("type") == "DIRECTORY":
            raise ValidationError("content inputs must be of type FILE", "type")

    @post_load
    def _empty_content_with_url(self, data, **kwargs):
        """Empty content next to a url is not content: the url is fetched (the worker
        writes any content it is given, so the empty one is dropped here)."""
        if data.get("content") == "" and "url" in data:
            del data["content"]
        return data


class OutputSchema(StrictSchema):
    name = fields.String(**_text)
    description = fields.String(**_text)
    url = fields.String(required=True, validate=validate.Length(min=1, max=8192))
    path = ContainerPath(required=True, wildcards=True, validate=validate.Length(max=4096))
    path_prefix = ContainerPath(validate=validate.Length(max=4096))
    type = fields.String(validate=validate.OneOf(FILE_TYPES))

    @validates_schema
    def _prefix_for_wildcards(self, data, **kwargs):
        path = data.get("path", "")
        if WILDCARD.search(path):
            prefix = data.get("path_prefix")
            if not prefix:
                raise ValidationError("required when path contains wildcards", "path_prefix")
            if not path.startswith(prefix):
                raise ValidationError("must be a prefix of path", "path_prefix")


class ExecutorSchema(StrictSchema):
    image = fields.String(required=True, validate=validate.Length(min=1, max=1024))
    command = fields.List(fields.String(validate=validate.Length(max=131072)), required=True,
                          validate=validate.Length(min=1, max=4096))
    workdir = ContainerPath(validate=validate.Length(max=4096))
    stdin = ContainerPath(validate=validate.Length(max=4096))
    stdout = ContainerPath(validate=validate.Length(max=4096))
    stderr = ContainerPath(validate=validate.Length(max=4096))
    env = fields.Dict(**_string_map)
    ignore_error = StrictBoolean()

    @validates_schema
    def _env_names(self, data, **kwargs):
        for name in data.get("env", {}):
            if not ENV_NAME.fullmatch(name):
                raise ValidationError(f"invalid environment variable name {name!r}", "env")


class ResourcesSchema(StrictSchema):
    cpu_cores = fields.Integer(strict=True, validate=validate.Range(min=0, max=1_000_000))
    preemptible = StrictBoolean()
    ram_gb = fields.Float(validate=validate.Range(min=0, max=1e9))
    disk_gb = fields.Float(validate=validate.Range(min=0, max=1e12))
    zones = fields.List(fields.String(validate=validate.Length(min=1, max=256)),
                        validate=validate.Length(max=256))
    backend_parameters = fields.Dict(**_string_map)
    backend_parameters_strict = StrictBoolean()


class TaskCreateSchema(StrictSchema):
    """What a client may send to CreateTask."""

    name = fields.String(**_text)
    description = fields.String(**_text)
    inputs = fields.List(fields.Nested(InputSchema), validate=validate.Length(max=100_000))
    outputs = fields.List(fields.Nested(OutputSchema), validate=validate.Length(max=100_000))
    resources = fields.Nested(ResourcesSchema)
    executors = fields.List(fields.Nested(ExecutorSchema), required=True,
                            validate=validate.Length(min=1, max=1000))
    volumes = fields.List(ContainerPath(validate=validate.Length(max=4096)),
                          validate=validate.Length(max=1000))
    tags = fields.Dict(**_string_map)

    @pre_load
    def _drop_read_only(self, data, **kwargs):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in READ_ONLY_TASK_FIELDS}
        return data

    @post_load
    def _plain_dict(self, data, **kwargs):
        return dict(data)


# ---- response documentation (what the server returns) ----

class OutputFileLogSchema(Schema):
    url = fields.String(required=True)
    path = fields.String(required=True)
    size_bytes = fields.String(required=True)


class ExecutorLogSchema(Schema):
    start_time = fields.String()
    end_time = fields.String()
    stdout = fields.String()
    stderr = fields.String()
    # -1 while the executor runs, or when it was stopped before it ended (views.py)
    exit_code = fields.Integer(required=True)


class TaskLogSchema(Schema):
    logs = fields.List(fields.Nested(ExecutorLogSchema), required=True)
    metadata = fields.Dict(keys=fields.String(), values=fields.String())
    start_time = fields.String()
    end_time = fields.String()
    outputs = fields.List(fields.Nested(OutputFileLogSchema), required=True)
    system_logs = fields.List(fields.String())


class TaskSchema(TaskCreateSchema):
    """A task as returned; MINIMAL views carry only id and state, so nothing is required."""

    class Meta:
        unknown = EXCLUDE
        ordered = True

    executors = fields.List(fields.Nested(ExecutorSchema))

    id = fields.String(dump_only=True)
    state = fields.String(dump_only=True, validate=validate.OneOf(ALL_STATES))
    logs = fields.List(fields.Nested(TaskLogSchema), dump_only=True)
    creation_time = fields.String(dump_only=True)


class CreateTaskResponseSchema(Schema):
    id = fields.String(required=True)


class ListTasksResponseSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema), required=True)
    next_page_token = fields.String()


class CancelTaskResponseSchema(Schema):
    pass


class ApiErrorSchema(Schema):
    code = fields.Integer()
    message = fields.String()


class ServiceTypeSchema(Schema):
    group = fields.String()
    artifact = fields.String()
    version = fields.String()


class OrganizationSchema(Schema):
    name = fields.String()
    url = fields.String()


class ServiceInfoSchema(Schema):
    id = fields.String()
    name = fields.String()
    type = fields.Nested(ServiceTypeSchema)
    description = fields.String()
    organization = fields.Nested(OrganizationSchema)
    contactUrl = fields.String()
    documentationUrl = fields.String()
    createdAt = fields.String()
    updatedAt = fields.String()
    environment = fields.String()
    version = fields.String()
    storage = fields.List(fields.String())
    tesResources_backend_parameters = fields.List(fields.String())


# ---- query parameters ----

class ViewArgsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    view = fields.String(load_default="MINIMAL", validate=validate.OneOf(VIEWS))


class ListArgsSchema(ViewArgsSchema):
    name_prefix = fields.String(validate=validate.Length(max=65536))
    state = fields.String(validate=validate.OneOf(ALL_STATES))
    tag_key = fields.List(fields.String(validate=validate.Length(min=1, max=1024)))
    tag_value = fields.List(fields.String(validate=validate.Length(max=65536)))
    # TES 1.1: "Must be less than 2048"
    page_size = fields.Integer(validate=validate.Range(min=1, max=2047))
    page_token = fields.String(validate=validate.Length(max=256))

    @validates_schema
    def _tags_zip(self, data, **kwargs):
        if len(data.get("tag_value", [])) > len(data.get("tag_key", [])):
            raise ValidationError("more tag_value than tag_key parameters", "tag_value")


def flatten_errors(messages: Any, prefix: str = "") -> list[str]:
    """Turn marshmallow's nested error dict into 'a.b.0.c: message' lines."""
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            name = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else str(key))
            out.extend(flatten_errors(value, name))
        return out
    if isinstance(messages, (list, tuple)):
        if all(isinstance(m, str) for m in messages):
            return [f"{prefix}: {m}" if prefix else m for m in messages]
        out = []
        for item in messages:
            out.extend(flatten_errors(item, prefix))
        return out
    return [f"{prefix}: {messages}" if prefix else str(messages)]


_TASK_CREATE = TaskCreateSchema()


def load_task(document: Any) -> dict:
    """Validate a CreateTask body; raise ValidationError naming the bad field (an unknown
    field too)."""
    if not isinstance(document, dict):
        raise ValidationError({"body": ["must be a JSON object (a TES task)"]})
    return _TASK_CREATE.load(document)


def load_task_lenient(document: Any) -> tuple[dict, list[str]]:
    """Validate a CreateTask body, ignoring the fields the TES 1.1 model lacks (TES allows
    additional properties; later TES versions and vendors add some): (the task, the
    ignored fields' paths, e.g. "executors.0.foo"). Any other problem raises
    ValidationError naming its field. Cost: a second validation when a field is unknown."""
    try:
        return load_task(document), []
    except ValidationError as exc:
        unknown: list[tuple[str | int, ...]] = []
        others = _split_unknown(exc.messages, (), unknown)
        if others or not unknown:
            raise ValidationError(others or exc.messages) from None
    unknown.sort(key=lambda path: [(0, key, "") if isinstance(key, int) else (1, 0, key)
                                   for key in path])
    trimmed = _without(document, unknown)
    return load_task(trimmed), [".".join(map(str, path)) for path in unknown]


def _split_unknown(messages: Any, path: tuple[str | int, ...],
                   unknown: list[tuple[str | int, ...]]) -> Any:
    """marshmallow's error messages without the unknown-field ones (whose paths go to
    `unknown`); None when nothing else is left."""
    if isinstance(messages, dict):
        kept = {}
        for key, value in messages.items():
            rest = _split_unknown(value, (*path, key), unknown)
            if rest:
                kept[key] = rest
        return kept or None
    if isinstance(messages, list) and messages == [UNKNOWN_FIELD] and path:
        unknown.append(path)
        return None
    return messages


def _without(document: Any, paths: list[tuple[str | int, ...]]) -> Any:
    """A copy of the JSON document without the fields at `paths`; the original is kept
    (each node along the paths is copied once)."""
    copied: set[int] = set()

    def own(node: Any) -> Any:
        if id(node) in copied:
            return node
        node = dict(node) if isinstance(node, dict) else list(node)
        copied.add(id(node))
        return node

    out = own(document)
    for path in paths:
        node = out
        for key in path[:-1]:
            node[key] = own(node[key])
            node = node[key]
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


MAX_NAMED_FIELDS = 20   # unknown fields named in a notice; the rest are counted
MAX_FIELD_NAME = 100    # characters of a field path shown in a notice


def ignored_fields_notice(paths: list[str]) -> str:
    """'unknown fields ignored: a, b.0.c' for the Warning header and the system logs:
    printable ASCII only (a client's field names are escaped as JSON escapes them), at
    most MAX_NAMED_FIELDS names of MAX_FIELD_NAME characters."""
    shown = []
    for path in paths[:MAX_NAMED_FIELDS]:
        text = json.dumps(path, ensure_ascii=True)[1:-1]
        shown.append(text if len(text) <= MAX_FIELD_NAME else text[:MAX_FIELD_NAME] + "...")
    more = len(paths) - len(shown)
    return "unknown fields ignored: " + ", ".join(shown) + (f" and {more} more" if more else "")
