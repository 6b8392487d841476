"""Write-once claims: who may write a block, and how a written block is published.

The lifecycle of a key: the first writer to :func:`claim` it is GRANTED a
claim until a deadline (claiming again refreshes it); every other writer gets
PENDING while that claim is live. The holder then publishes the block with
:func:`commit` (COMMITTED: it never changes again) or gives up with
:func:`abort`. A claim past its deadline is taken over by the next writer or
released by :func:`expire` (its writer is presumed dead). A committed key
answers a claim with COMMITTED and its replicas, and a commit of the same
bytes by any writer adds a replica.

Claims are not durable: a snapshot omits them and a restored directory drops
them (:func:`forget_all`), so writers retry after a directory restart. Each
function runs under ``DirectoryCore``'s lock; all but :func:`forget_all`
change the state only through :func:`~kvfabric.directory.apply.emit`.
"""

from __future__ import annotations

from collections.abc import Callable

from kvfabric.directory import model as m
from kvfabric.directory.apply import emit
from kvfabric.directory.events import Event, EventKind
from kvfabric.directory.model import ClaimStatus
from kvfabric.directory.replicas import place_replica
from kvfabric.directory.state import IndexState
from kvfabric.errors import FailedPrecondition
from kvfabric.types import BlockKey, BlockType, Tier


def claim(
    state: IndexState,
    key: BlockKey,
    node_id: str,
    writer_id: str,
    size: int,
    clock: Callable[[], float],
    timeout_s: float,
) -> m.ClaimResult:
    """GRANTED (a claim until ``clock() + timeout_s``), PENDING or COMMITTED; see above.

    ``clock`` is read only when the key is not committed.
    """
    state.node(node_id)
    entry = state.find(key)
    if entry is not None:
        return m.ClaimResult(ClaimStatus.COMMITTED, key, None, entry.sorted_locations())
    now = clock()
    out: list[Event] = []
    held = state.claims.get(key)
    if held is not None and held.writer_id != writer_id:
        if held.deadline > now:
            return m.ClaimResult(ClaimStatus.PENDING, key, held)
        emit(state, out, EventKind.ABORTED, key=key, node_id=held.node_id,
             writer_id=held.writer_id)  # fmt: skip
    emit(state, out, EventKind.CLAIMED, key=key, node_id=node_id, writer_id=writer_id,
         size=size, deadline=now + timeout_s)  # fmt: skip
    return m.ClaimResult(ClaimStatus.GRANTED, key, state.claims[key], (), tuple(out))


def commit(
    state: IndexState,
    key: BlockKey,
    node_id: str,
    writer_id: str,
    tier: Tier,
    size: int,
    checksum: int,
    block_type: BlockType,
    program_id: str | None,
) -> m.CommitResult:
    """Publish the block ``writer_id`` claimed, or add a replica of a committed one.

    FailedPrecondition (field ``writer_id``) without the claim; Corrupt when
    the key is committed with another checksum or size.
    """
    state.node(node_id).check_tier(tier)
    entry = state.find(key)
    out: list[Event] = []
    if entry is not None:
        entry.check_same(checksum, size)
        place_replica(state, out, entry, node_id, tier)
        return m.CommitResult(key, False, entry.sorted_locations(), tuple(out))
    held = state.claims.get(key)
    if held is None or held.writer_id != writer_id:
        owner = "nobody" if held is None else f"writer {held.writer_id!r}"
        raise FailedPrecondition(
            f"commit of {key.short()} by writer {writer_id!r}: the claim is held by "
            f"{owner}; claim the key first",
            "writer_id",
        )
    emit(state, out, EventKind.COMMITTED, key=key, node_id=node_id, tier=tier, size=size,
         checksum=checksum, block_type=block_type, program_id=program_id)  # fmt: skip
    return m.CommitResult(key, True, state.get(key).sorted_locations(), tuple(out))


def abort(state: IndexState, key: BlockKey, node_id: str, writer_id: str) -> list[Event]:
    """Release ``writer_id``'s claim on ``key`` (FailedPrecondition if another writer holds it)."""
    state.node(node_id)
    held = state.claims.get(key)
    if held is None:
        return []
    if held.writer_id != writer_id:
        raise FailedPrecondition(
            f"{key.short()} is claimed by writer {held.writer_id!r}, not {writer_id!r}",
            "writer_id",
        )
    out: list[Event] = []
    emit(state, out, EventKind.ABORTED, key=key, node_id=held.node_id, writer_id=writer_id)
    return out


def expire(state: IndexState, now: float) -> list[Event]:
    """Release every claim whose deadline is at or before ``now``."""
    out: list[Event] = []
    for c in [c for c in state.claims.values() if c.deadline <= now]:
        emit(state, out, EventKind.ABORTED, key=c.key, node_id=c.node_id, writer_id=c.writer_id)
    return out


def forget_all(state: IndexState) -> None:
    """Drop every claim without an event: a restored directory starts with none."""
    state.claims.clear()
    for node in state.nodes.values():
        node.claims.clear()
