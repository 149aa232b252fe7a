from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("service", "spiffe_id", "address", "labels", "check_address")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHECK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    service: str
    spiffe_id: str
    address: str
    labels: _containers.ScalarMap[str, str]
    check_address: str
    def __init__(self, service: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., check_address: _Optional[str] = ...) -> None: ...

class RegisterUpdate(_message.Message):
    __slots__ = ("health", "detail", "mesh_revision")
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    MESH_REVISION_FIELD_NUMBER: _ClassVar[int]
    health: str
    detail: str
    mesh_revision: int
    def __init__(self, health: _Optional[str] = ..., detail: _Optional[str] = ..., mesh_revision: _Optional[int] = ...) -> None: ...

class WatchMeshRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MeshSnapshot(_message.Message):
    __slots__ = ("revision", "resources_json", "instances_json")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_JSON_FIELD_NUMBER: _ClassVar[int]
    revision: int
    resources_json: bytes
    instances_json: bytes
    def __init__(self, revision: _Optional[int] = ..., resources_json: _Optional[bytes] = ..., instances_json: _Optional[bytes] = ...) -> None: ...
