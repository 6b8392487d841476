from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_GPU: _ClassVar[Tier]
    TIER_CPU: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]

class BlockType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOCK_TYPE_UNSPECIFIED: _ClassVar[BlockType]
    BLOCK_TYPE_GENERIC: _ClassVar[BlockType]
    BLOCK_TYPE_SYSTEM_PROMPT: _ClassVar[BlockType]
    BLOCK_TYPE_TOOL_DEFINITION: _ClassVar[BlockType]
    BLOCK_TYPE_REASONING_BRANCH: _ClassVar[BlockType]
    BLOCK_TYPE_EXECUTION_CHECKPOINT: _ClassVar[BlockType]

class PutStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_STATUS_UNSPECIFIED: _ClassVar[PutStatus]
    PUT_STATUS_STORED: _ClassVar[PutStatus]
    PUT_STATUS_EXISTS: _ClassVar[PutStatus]
    PUT_STATUS_PENDING: _ClassVar[PutStatus]

class HintKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HINT_KIND_UNSPECIFIED: _ClassVar[HintKind]
    HINT_KIND_PROGRAM_START: _ClassVar[HintKind]
    HINT_KIND_PROGRAM_END: _ClassVar[HintKind]
    HINT_KIND_STEP_START: _ClassVar[HintKind]
    HINT_KIND_STEP_END: _ClassVar[HintKind]
    HINT_KIND_TOOL_CALL_START: _ClassVar[HintKind]
    HINT_KIND_TOOL_CALL_END: _ClassVar[HintKind]
    HINT_KIND_FORK: _ClassVar[HintKind]
    HINT_KIND_JOIN: _ClassVar[HintKind]
TIER_UNSPECIFIED: Tier
TIER_GPU: Tier
TIER_CPU: Tier
TIER_DISK: Tier
BLOCK_TYPE_UNSPECIFIED: BlockType
BLOCK_TYPE_GENERIC: BlockType
BLOCK_TYPE_SYSTEM_PROMPT: BlockType
BLOCK_TYPE_TOOL_DEFINITION: BlockType
BLOCK_TYPE_REASONING_BRANCH: BlockType
BLOCK_TYPE_EXECUTION_CHECKPOINT: BlockType
PUT_STATUS_UNSPECIFIED: PutStatus
PUT_STATUS_STORED: PutStatus
PUT_STATUS_EXISTS: PutStatus
PUT_STATUS_PENDING: PutStatus
HINT_KIND_UNSPECIFIED: HintKind
HINT_KIND_PROGRAM_START: HintKind
HINT_KIND_PROGRAM_END: HintKind
HINT_KIND_STEP_START: HintKind
HINT_KIND_STEP_END: HintKind
HINT_KIND_TOOL_CALL_START: HintKind
HINT_KIND_TOOL_CALL_END: HintKind
HINT_KIND_FORK: HintKind
HINT_KIND_JOIN: HintKind

class Location(_message.Message):
    __slots__ = ("node_id", "address", "tier")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    tier: Tier
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "local_only", "block_tokens")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    local_only: bool
    block_tokens: int
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., local_only: _Optional[bool] = ..., block_tokens: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("matched", "locations")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    matched: int
    locations: _containers.RepeatedCompositeFieldContainer[Location]
    def __init__(self, matched: _Optional[int] = ..., locations: _Optional[_Iterable[_Union[Location, _Mapping]]] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("namespace", "hashes", "block_bytes", "block_type", "program_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    block_bytes: int
    block_type: BlockType
    program_id: str
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., block_bytes: _Optional[int] = ..., block_type: _Optional[_Union[BlockType, str]] = ..., program_id: _Optional[str] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    data: BlockData
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., data: _Optional[_Union[BlockData, _Mapping]] = ...) -> None: ...

class BlockData(_message.Message):
    __slots__ = ("block_index", "offset", "data")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    offset: int
    data: bytes
    def __init__(self, block_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[PutStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[PutStatus, str]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "data_plane", "chunk_bytes", "inline_headers", "batch_headers")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    INLINE_HEADERS_FIELD_NUMBER: _ClassVar[int]
    BATCH_HEADERS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    data_plane: bool
    chunk_bytes: int
    inline_headers: bool
    batch_headers: bool
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., data_plane: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., inline_headers: _Optional[bool] = ..., batch_headers: _Optional[bool] = ...) -> None: ...

class GetHeader(_message.Message):
    __slots__ = ("block_index", "found", "size", "checksum", "location")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    found: bool
    size: int
    checksum: int
    location: Location
    def __init__(self, block_index: _Optional[int] = ..., found: _Optional[bool] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ..., location: _Optional[_Union[Location, _Mapping]] = ...) -> None: ...

class GetChunk(_message.Message):
    __slots__ = ("header", "data", "block_header", "headers")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HEADER_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    header: GetHeader
    data: BlockData
    block_header: GetHeader
    headers: _containers.RepeatedCompositeFieldContainer[GetHeader]
    def __init__(self, header: _Optional[_Union[GetHeader, _Mapping]] = ..., data: _Optional[_Union[BlockData, _Mapping]] = ..., block_header: _Optional[_Union[GetHeader, _Mapping]] = ..., headers: _Optional[_Iterable[_Union[GetHeader, _Mapping]]] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "tier", "node_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    tier: Tier
    node_id: str
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., tier: _Optional[_Union[Tier, str]] = ..., node_id: _Optional[str] = ...) -> None: ...

class MoveResponse(_message.Message):
    __slots__ = ("moved", "unchanged", "missing", "corrupt")
    MOVED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    moved: int
    unchanged: int
    missing: int
    corrupt: int
    def __init__(self, moved: _Optional[int] = ..., unchanged: _Optional[int] = ..., missing: _Optional[int] = ..., corrupt: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "owner", "ttl_s")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    owner: str
    ttl_s: float
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., owner: _Optional[str] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("pinned", "missing", "new_bytes", "missing_indexes")
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    MISSING_INDEXES_FIELD_NUMBER: _ClassVar[int]
    pinned: int
    missing: int
    new_bytes: int
    missing_indexes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pinned: _Optional[int] = ..., missing: _Optional[int] = ..., new_bytes: _Optional[int] = ..., missing_indexes: _Optional[_Iterable[int]] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "owner")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    owner: str
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., owner: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("namespace", "hashes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    def __init__(self, evicted: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "tier")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    tier: Tier
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class AnnotateRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "block_type", "program_id", "ttl_s")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    block_type: BlockType
    program_id: str
    ttl_s: float
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., block_type: _Optional[_Union[BlockType, str]] = ..., program_id: _Optional[str] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class AnnotateResponse(_message.Message):
    __slots__ = ("annotated",)
    ANNOTATED_FIELD_NUMBER: _ClassVar[int]
    annotated: int
    def __init__(self, annotated: _Optional[int] = ...) -> None: ...

class HintRequest(_message.Message):
    __slots__ = ("program_id", "kind", "namespace", "hashes", "step", "targets", "children", "expected_duration_s")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    kind: HintKind
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    step: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    children: int
    expected_duration_s: float
    def __init__(self, program_id: _Optional[str] = ..., kind: _Optional[_Union[HintKind, str]] = ..., namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., step: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., children: _Optional[int] = ..., expected_duration_s: _Optional[float] = ...) -> None: ...

class HintResponse(_message.Message):
    __slots__ = ("accepted", "copied")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    COPIED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    copied: int
    def __init__(self, accepted: _Optional[bool] = ..., copied: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "blocks", "used_bytes", "capacity_bytes")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    blocks: int
    used_bytes: int
    capacity_bytes: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., blocks: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("node_id", "address", "tiers", "counters", "pinned_bytes", "pinned_blocks", "blocks_by_type", "bytes_by_type", "namespaces")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BlocksByTypeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BytesByTypeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_BY_TYPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    counters: _containers.ScalarMap[str, int]
    pinned_bytes: int
    pinned_blocks: int
    blocks_by_type: _containers.ScalarMap[str, int]
    bytes_by_type: _containers.ScalarMap[str, int]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceStats]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., pinned_bytes: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., blocks_by_type: _Optional[_Mapping[str, int]] = ..., bytes_by_type: _Optional[_Mapping[str, int]] = ..., namespaces: _Optional[_Iterable[_Union[NamespaceStats, _Mapping]]] = ...) -> None: ...

class NamespaceStats(_message.Message):
    __slots__ = ("namespace", "block_bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    block_bytes: int
    def __init__(self, namespace: _Optional[str] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class ListBlocksRequest(_message.Message):
    __slots__ = ("namespace", "program_id", "block_type", "tier", "page_size", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    program_id: str
    block_type: BlockType
    tier: Tier
    page_size: int
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., program_id: _Optional[str] = ..., block_type: _Optional[_Union[BlockType, str]] = ..., tier: _Optional[_Union[Tier, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class BlockInfo(_message.Message):
    __slots__ = ("namespace", "hash", "tier", "block_type", "program_id", "size", "pins", "pin_owners", "idle_s", "access_count")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    PIN_OWNERS_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    ACCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hash: bytes
    tier: Tier
    block_type: BlockType
    program_id: str
    size: int
    pins: int
    pin_owners: _containers.RepeatedScalarFieldContainer[str]
    idle_s: float
    access_count: int
    def __init__(self, namespace: _Optional[str] = ..., hash: _Optional[bytes] = ..., tier: _Optional[_Union[Tier, str]] = ..., block_type: _Optional[_Union[BlockType, str]] = ..., program_id: _Optional[str] = ..., size: _Optional[int] = ..., pins: _Optional[int] = ..., pin_owners: _Optional[_Iterable[str]] = ..., idle_s: _Optional[float] = ..., access_count: _Optional[int] = ...) -> None: ...

class ListBlocksResponse(_message.Message):
    __slots__ = ("blocks", "next_page_token", "node_id")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockInfo]
    next_page_token: str
    node_id: str
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("from_seq", "follow")
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    from_seq: int
    follow: bool
    def __init__(self, from_seq: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "kind", "namespace", "hash", "node_id", "tier")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    namespace: str
    hash: bytes
    node_id: str
    tier: Tier
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., namespace: _Optional[str] = ..., hash: _Optional[bytes] = ..., node_id: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...
