from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN: _ClassVar[State]
    QUEUED: _ClassVar[State]
    INITIALIZING: _ClassVar[State]
    RUNNING: _ClassVar[State]
    PAUSED: _ClassVar[State]
    COMPLETE: _ClassVar[State]
    EXECUTOR_ERROR: _ClassVar[State]
    SYSTEM_ERROR: _ClassVar[State]
    CANCELED: _ClassVar[State]
    PREEMPTED: _ClassVar[State]
    CANCELING: _ClassVar[State]

class FileType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE: _ClassVar[FileType]
    DIRECTORY: _ClassVar[FileType]

class View(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MINIMAL: _ClassVar[View]
    BASIC: _ClassVar[View]
    FULL: _ClassVar[View]
UNKNOWN: State
QUEUED: State
INITIALIZING: State
RUNNING: State
PAUSED: State
COMPLETE: State
EXECUTOR_ERROR: State
SYSTEM_ERROR: State
CANCELED: State
PREEMPTED: State
CANCELING: State
FILE: FileType
DIRECTORY: FileType
MINIMAL: View
BASIC: View
FULL: View

class Input(_message.Message):
    __slots__ = ("content", "description", "name", "path", "streamable", "type", "url")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STREAMABLE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    content: str
    description: str
    name: str
    path: str
    streamable: bool
    type: FileType
    url: str
    def __init__(self, content: _Optional[str] = ..., description: _Optional[str] = ..., name: _Optional[str] = ..., path: _Optional[str] = ..., streamable: _Optional[bool] = ..., type: _Optional[_Union[FileType, str]] = ..., url: _Optional[str] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("description", "name", "path", "path_prefix", "type", "url")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    description: str
    name: str
    path: str
    path_prefix: str
    type: FileType
    url: str
    def __init__(self, description: _Optional[str] = ..., name: _Optional[str] = ..., path: _Optional[str] = ..., path_prefix: _Optional[str] = ..., type: _Optional[_Union[FileType, str]] = ..., url: _Optional[str] = ...) -> None: ...

class Executor(_message.Message):
    __slots__ = ("command", "env", "ignore_error", "image", "stderr", "stdin", "stdout", "workdir")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    IGNORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    command: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    ignore_error: bool
    image: str
    stderr: str
    stdin: str
    stdout: str
    workdir: str
    def __init__(self, command: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., ignore_error: _Optional[bool] = ..., image: _Optional[str] = ..., stderr: _Optional[str] = ..., stdin: _Optional[str] = ..., stdout: _Optional[str] = ..., workdir: _Optional[str] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("backend_parameters", "backend_parameters_strict", "cpu_cores", "disk_gb", "preemptible", "ram_gb", "zones")
    class BackendParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BACKEND_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PARAMETERS_STRICT_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    DISK_GB_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIBLE_FIELD_NUMBER: _ClassVar[int]
    RAM_GB_FIELD_NUMBER: _ClassVar[int]
    ZONES_FIELD_NUMBER: _ClassVar[int]
    backend_parameters: _containers.ScalarMap[str, str]
    backend_parameters_strict: bool
    cpu_cores: int
    disk_gb: float
    preemptible: bool
    ram_gb: float
    zones: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, backend_parameters: _Optional[_Mapping[str, str]] = ..., backend_parameters_strict: _Optional[bool] = ..., cpu_cores: _Optional[int] = ..., disk_gb: _Optional[float] = ..., preemptible: _Optional[bool] = ..., ram_gb: _Optional[float] = ..., zones: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecutorLog(_message.Message):
    __slots__ = ("end_time", "exit_code", "start_time", "stderr", "stdout")
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    end_time: str
    exit_code: int
    start_time: str
    stderr: str
    stdout: str
    def __init__(self, end_time: _Optional[str] = ..., exit_code: _Optional[int] = ..., start_time: _Optional[str] = ..., stderr: _Optional[str] = ..., stdout: _Optional[str] = ...) -> None: ...

class OutputFileLog(_message.Message):
    __slots__ = ("path", "size_bytes", "url")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: str
    url: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class TaskLog(_message.Message):
    __slots__ = ("end_time", "logs", "metadata", "outputs", "start_time", "system_logs")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_LOGS_FIELD_NUMBER: _ClassVar[int]
    end_time: str
    logs: _containers.RepeatedCompositeFieldContainer[ExecutorLog]
    metadata: _containers.ScalarMap[str, str]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputFileLog]
    start_time: str
    system_logs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, end_time: _Optional[str] = ..., logs: _Optional[_Iterable[_Union[ExecutorLog, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., outputs: _Optional[_Iterable[_Union[OutputFileLog, _Mapping]]] = ..., start_time: _Optional[str] = ..., system_logs: _Optional[_Iterable[str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("creation_time", "description", "executors", "id", "inputs", "logs", "name", "outputs", "resources", "state", "tags", "volumes")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CREATION_TIME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    creation_time: str
    description: str
    executors: _containers.RepeatedCompositeFieldContainer[Executor]
    id: str
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    logs: _containers.RepeatedCompositeFieldContainer[TaskLog]
    name: str
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    resources: Resources
    state: State
    tags: _containers.ScalarMap[str, str]
    volumes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, creation_time: _Optional[str] = ..., description: _Optional[str] = ..., executors: _Optional[_Iterable[_Union[Executor, _Mapping]]] = ..., id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., logs: _Optional[_Iterable[_Union[TaskLog, _Mapping]]] = ..., name: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., state: _Optional[_Union[State, str]] = ..., tags: _Optional[_Mapping[str, str]] = ..., volumes: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateTaskResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("id", "view")
    ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    id: str
    view: str
    def __init__(self, id: _Optional[str] = ..., view: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("name_prefix", "state", "tag_key", "tag_value", "page_size", "page_token", "view")
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TAG_KEY_FIELD_NUMBER: _ClassVar[int]
    TAG_VALUE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    name_prefix: str
    state: State
    tag_key: _containers.RepeatedScalarFieldContainer[str]
    tag_value: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    view: str
    def __init__(self, name_prefix: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., tag_key: _Optional[_Iterable[str]] = ..., tag_value: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("next_page_token", "tasks")
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    next_page_token: str
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, next_page_token: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServiceInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceType(_message.Message):
    __slots__ = ("artifact", "group", "version")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    artifact: str
    group: str
    version: str
    def __init__(self, artifact: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("contactUrl", "createdAt", "description", "documentationUrl", "environment", "id", "name", "organization", "storage", "tesResources_backend_parameters", "type", "updatedAt", "version")
    class OrganizationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTACTURL_FIELD_NUMBER: _ClassVar[int]
    CREATEDAT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTATIONURL_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    TESRESOURCES_BACKEND_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    UPDATEDAT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    contactUrl: str
    createdAt: str
    description: str
    documentationUrl: str
    environment: str
    id: str
    name: str
    organization: _containers.ScalarMap[str, str]
    storage: _containers.RepeatedScalarFieldContainer[str]
    tesResources_backend_parameters: _containers.RepeatedScalarFieldContainer[str]
    type: ServiceType
    updatedAt: str
    version: str
    def __init__(self, contactUrl: _Optional[str] = ..., createdAt: _Optional[str] = ..., description: _Optional[str] = ..., documentationUrl: _Optional[str] = ..., environment: _Optional[str] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., organization: _Optional[_Mapping[str, str]] = ..., storage: _Optional[_Iterable[str]] = ..., tesResources_backend_parameters: _Optional[_Iterable[str]] = ..., type: _Optional[_Union[ServiceType, _Mapping]] = ..., updatedAt: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
