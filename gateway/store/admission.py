"""What a task must satisfy beyond its schema, checked at POST: configured limits
(``limits.*``), resource maxima (``resources.max_*``), URL schemes with a store, and
backend_parameters values. Each refusal is an AdmissionError whose message starts with
the field path and names the limit (the API answers HTTP 400). What depends on the
backend instance a task is routed to (gateway/store/placement.py) is that instance's
InstanceChecks: its kind's check_task, its backend_parameters allow-list and, when its
jobs run as their owners (``submit_as_owner``), the owner policy (backends/owners.py): a
refused owner is an OwnerRefused naming the rule (HTTP 403).

Cost: one walk over the validated task document (bounded by ``server.max_body_bytes``)
without field paths; a second one that names the field only when a string may be over
its limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from funnel_hpc.backends.owners import OwnerPolicy
from funnel_hpc.backends.registry import backend_class
from funnel_hpc.backends.templating import check_backend_parameters
from funnel_hpc.core.config import Config, Instance, SlurmOptions
from funnel_hpc.worker.storage import STORES
from funnel_hpc.worker.validation import IMAGE

# limits.* key -> the task field whose entries it counts (max_env: per executor, below)
_COUNTED = {"max_tags": "tags", "max_inputs": "inputs", "max_outputs": "outputs",
            "max_executors": "executors", "max_volumes": "volumes"}
# resources.max_* key -> the tesResources field it bounds
_RESOURCE_MAXIMA = {"max_cpu_cores": "cpu_cores", "max_ram_gb": "ram_gb",
                    "max_disk_gb": "disk_gb"}


_CONTENT = re.compile(r"inputs\.[0-9]+\.content")
_NUL = "\x00"
_SURROGATE = re.compile("[\ud800-\udfff]")


class AdmissionError(ValueError):
    """A task (or a listing request) the server will not take; the message names the field."""


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field path, string) of every string in a task document, keys included."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.{key}" if path else str(key), str(key)
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}.{index}")


def _any_suspect(value: Any, short: int) -> bool:
    """Whether a string of the document (keys included) is longer than ``short``, holds a
    NUL, or may hold a lone surrogate (only non-ASCII text can)."""
    if isinstance(value, str):
        return (len(value) > short or _NUL in value
                or (not value.isascii() and bool(_SURROGATE.search(value))))
    if isinstance(value, dict):
        return any(_any_suspect(key, short) or _any_suspect(item, short)
                   for key, item in value.items())
    if isinstance(value, list):
        return any(_any_suspect(item, short) for item in value)
    return False


def url_scheme(url: str) -> str:
    """The scheme the worker picks a store by (a bare absolute path is file)."""
    return "file" if url.startswith("/") else urlparse(url).scheme.lower()


class InstanceChecks:
    """What one backend instance accepts of a task: its kind's Backend.check_task, its
    backend_parameters allow-list, and who may own a task (jobs run as their owners)."""

    def __init__(self, instance: Instance):
        self.name = instance.name
        self.kind = instance.kind
        options = instance.options
        # jobs run as their owners: who may own a task is the owner policy's to say
        self.owners = OwnerPolicy.from_options(options) \
            if isinstance(options, SlurmOptions) and options.submit_as_owner else None
        allowed = options.backend_parameters if options is not None else {}
        # TES backend_parameters key -> scheduler option; keys match case-insensitively
        self.allowed_parameters: dict[str, Any] = {str(k): v for k, v in allowed.items()}
        self.parameter_keys = {key.lower() for key in self.allowed_parameters}

    def check_owner(self, owner: str | None) -> None:
        """Raises OwnerRefused when jobs run as their owners and this one may not own any."""
        if self.owners is not None:
            self.owners.account(owner)

    def check_kind(self, spec: dict) -> None:
        Admission.check_for_kind(self.kind, spec)

    def admit_backend_parameters(self, spec: dict) -> list:
        """Check a task's backend_parameters; return its first logs (a warning naming the
        dropped keys, or nothing). Values of allow-listed keys must fit on a scheduler
        directive line (backends.templating.directive, as the backend will render them);
        unsupported keys are refused when strict, else dropped (TES: never stored)."""
        resources = spec.get("resources") or {}
        params = resources.get("backend_parameters")
        if not params:
            return []
        try:
            check_backend_parameters(params, self.allowed_parameters, strict=False)
        except ValueError as exc:
            raise AdmissionError(f"resources.backend_parameters: {exc}") from None
        unknown = sorted(k for k in params if k.lower() not in self.parameter_keys)
        if not unknown:
            return []
        if resources.get("backend_parameters_strict"):
            raise AdmissionError(
                "resources.backend_parameters: unsupported by backend "
                f"{self.name!r}: {', '.join(unknown)} (supported: "
                f"{', '.join(sorted(self.parameter_keys)) or 'none'})")
        resources["backend_parameters"] = {k: v for k, v in params.items() if k not in unknown}
        warning = (f"backend_parameters not supported by backend {self.name!r} "
                   f"were ignored: {', '.join(unknown)}")
        return [{"logs": [], "outputs": [], "system_logs": [warning]}]


class Admission:
    """The checks of one server's configuration."""

    def __init__(self, config: Config):
        # limits.* and resources.* by key name (the checks below name the key they apply)
        self.limits: dict[str, int] = dict(vars(config.limits))
        self.maxima: dict[str, float] = dict(vars(config.resources))
        # each instance's own checks, asked of the instance a task is routed to
        self.instances = {instance.name: InstanceChecks(instance)
                          for instance in config.instances()}
        # a scheme works when it is allowed and the worker has a store for it
        self.schemes = sorted(set(config.storage.allowed_schemes) & set(STORES))
        self.allowed_dirs: list[str] = list(config.worker.allowed_dirs)

    # ---- tasks ----

    def check_task(self, spec: dict) -> None:
        """What any instance requires (its own checks come after routing: instances)."""
        self._check_counts(spec)
        self._check_strings(spec)
        self._check_executors(spec)
        self._check_resources(spec.get("resources") or {})
        self._check_urls(spec)

    @staticmethod
    def check_for_kind(kind: str, spec: dict) -> None:
        """What the backend kind the task goes to cannot run (Backend.check_task)."""
        try:
            cls = backend_class(kind)
        except ValueError:
            return  # a kind without a class here (a test double's)
        reason = cls.check_task(spec)
        if reason is not None:
            raise AdmissionError(reason)

    def _over(self, field: str, size: int, key: str, unit: str = "entries") -> None:
        limit = self.limits[key]
        if size > limit:
            raise AdmissionError(f"{field}: {size} {unit} exceed limits.{key} ({limit})")

    def _check_counts(self, spec: dict) -> None:
        for key, field in _COUNTED.items():
            self._over(field, len(spec.get(field) or ()), key)
        for index, executor in enumerate(spec.get("executors") or []):
            self._over(f"executors.{index}.env", len(executor.get("env") or ()), "max_env")

    def _check_strings(self, spec: dict) -> None:
        self._over("name", len(spec.get("name") or ""), "max_name_length", "characters")
        # a UTF-8 character takes at most 4 bytes: a shorter content is within its limit
        short = min(self.limits["max_string_length"], self.limits["max_content_bytes"] // 4)
        if not _any_suspect(spec, short):
            return  # the common case, without building a field path per string
        for path, text in _strings(spec, ""):
            # no string a task hands on may hold a NUL: the worker's argv, environment and
            # paths cannot carry one (a file's content can: it is written, not passed)
            if _NUL in text and not _CONTENT.fullmatch(path):
                raise AdmissionError(f"{path}: holds a NUL character")
            if _SURROGATE.search(text):  # JSON's "\ud800" decodes; UTF-8 cannot hold it
                raise AdmissionError(f"{path}: not valid Unicode (a lone surrogate)")
            if _CONTENT.fullmatch(path):
                self._over(path, len(text.encode()), "max_content_bytes", "bytes")
            else:
                self._over(path, len(text), "max_string_length", "characters")

    @staticmethod
    def _check_executors(spec: dict) -> None:
        """What the worker would refuse later of an executor, refused now with its field:
        an image that is no image reference (a newline, a space, a shell word); env names
        are the schema's (tes_schemas.py). (Newlines inside command arguments and env
        values are fine: multi-line ``sh -c`` scripts are common.)"""
        for index, executor in enumerate(spec.get("executors") or []):
            image = executor.get("image")
            if isinstance(image, str) and not IMAGE.fullmatch(image):
                raise AdmissionError(f"executors.{index}.image: {image!r} is not an image "
                                     "reference (letters, digits and ._/:@+- only)")

    def _check_resources(self, resources: dict) -> None:
        for key, field in _RESOURCE_MAXIMA.items():
            limit, value = self.maxima[key], resources.get(field)
            if limit and value is not None and value > limit:
                raise AdmissionError(f"resources.{field}: {value:g} exceeds the largest this "
                                     f"server runs (resources.{key}: {limit:g})")

    def _check_urls(self, spec: dict) -> None:
        for kind in ("inputs", "outputs"):
            for index, item in enumerate(spec.get(kind) or []):
                if kind == "inputs" and "content" in item:
                    continue  # TES: with content set, url is ignored (schemas.py drops an
                    # empty content that has a url beside it)
                scheme = url_scheme(item.get("url", ""))
                if scheme not in self.schemes:
                    raise AdmissionError(
                        f"{kind}.{index}.url: no storage for URL scheme {scheme or '(none)'!r} "
                        f"on this server (supported: {', '.join(self.schemes) or 'none'})")

    # ---- listings ----

    def check_list(self, name_prefix: str | None, tag_filters: int) -> None:
        self._over("name_prefix", len(name_prefix or ""), "max_name_length", "characters")
        self._over("tag_key", tag_filters, "max_tag_filters", "filters")

    # ---- service-info ----

    def advertised_storage(self) -> list[str]:
        """service_info.storage when the configuration gives none: file:// of each
        allowed directory, and scheme:// of every other scheme with a store."""
        out: list[str] = []
        for scheme in self.schemes:
            if scheme == "file":
                out += ["file://" + d.rstrip("/") + "/" for d in self.allowed_dirs]
            else:
                out.append(f"{scheme}://")
        return out
