"""Namespace fingerprints: one short id for everything that makes KV bytes incompatible.

Two engines may share a block only if the model, its revision, the KV dtype
and layout, the block size, the tensor-parallel rank and size and the layer
group all match. ``namespace_id`` folds those fields into ``ns-`` plus 24 hex
characters of BLAKE2b over a canonical encoding (see ``docs/hashing.md``).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import KW_ONLY, dataclass
from typing import Any, TypeGuard

import numpy as np

from kvfabric.errors import InvalidArgument
from kvfabric.hashing.chain import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from kvfabric.types import validate_namespace

NAMESPACE_PERSON = b"kvfabric-ns-v1"
NAMESPACE_PREFIX = "ns-"
NAMESPACE_DIGEST_BYTES = 12
MAX_SPEC_STRING_CHARS = 256
MAX_TP_SIZE = 65536

NAMESPACE_MAGIC = b"kvfabric/v1/ns"

_U32 = struct.Struct("<I")
# (field, tag, is_int). Order and tags are part of every id: never reorder or
# renumber; a new field gets a new tag at the end.
_FIELDS = (
    ("model", 0x01, False),
    ("revision", 0x02, False),
    ("dtype", 0x03, False),
    ("kv_layout", 0x04, False),
    ("block_size", 0x05, True),
    ("tp_rank", 0x06, True),
    ("tp_size", 0x07, True),
    ("layer_group", 0x08, False),
)


def _check_string(value: object, field: str, *, required: bool = False) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, got {type(value).__name__}", field)
    if required and not value:
        raise InvalidArgument(f"{field} must be a non-empty string", field)
    if len(value) > MAX_SPEC_STRING_CHARS:
        raise InvalidArgument(
            f"{field} is {len(value)} characters; the limit is {MAX_SPEC_STRING_CHARS}", field
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidArgument(f"{field} is not valid Unicode text: {err}", field) from err


def _is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(value: object, field: str, low: int, high: int) -> None:
    if not _is_int(value) or not low <= int(value) <= high:
        raise InvalidArgument(f"{field} must be an integer in {low}..{high}, got {value!r}", field)


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    """Everything that makes KV bytes of one engine incompatible with another's.

    ``model`` and ``block_size`` may be given by position; the rest by keyword.
    Empty strings mean "not specified" and are still part of the fingerprint.
    """

    model: str
    block_size: int
    _: KW_ONLY
    revision: str = ""
    dtype: str = ""
    kv_layout: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    layer_group: str = ""

    def __post_init__(self) -> None:
        _check_string(self.model, "model", required=True)
        for name in ("revision", "dtype", "kv_layout", "layer_group"):
            _check_string(getattr(self, name), name)
        _check_int(self.block_size, "block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
        _check_int(self.tp_size, "tp_size", 1, MAX_TP_SIZE)
        _check_int(self.tp_rank, "tp_rank", 0, MAX_TP_SIZE - 1)
        if self.tp_rank >= self.tp_size:
            raise InvalidArgument(
                f"tp_rank must be below tp_size ({self.tp_size}), got {self.tp_rank}", "tp_rank"
            )
        for name in ("block_size", "tp_rank", "tp_size"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def canonical_bytes(self) -> bytes:
        """The byte string ``namespace_id`` hashes: one TLV record per field, in tag order."""
        out = [NAMESPACE_MAGIC]
        for name, tag, is_int in _FIELDS:
            value: Any = getattr(self, name)
            raw = _U32.pack(value) if is_int else value.encode("utf-8")
            out.append(bytes((tag,)) + _U32.pack(len(raw)) + raw)
        return b"".join(out)


def namespace_id(spec: NamespaceSpec) -> str:
    """The namespace id of ``spec``: ``ns-`` and 24 lowercase hex characters."""
    if not isinstance(spec, NamespaceSpec):
        raise InvalidArgument(f"spec must be a NamespaceSpec, got {type(spec).__name__}", "spec")
    digest = hashlib.blake2b(
        spec.canonical_bytes(), digest_size=NAMESPACE_DIGEST_BYTES, person=NAMESPACE_PERSON
    ).hexdigest()
    return validate_namespace(NAMESPACE_PREFIX + digest)
