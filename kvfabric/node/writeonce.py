"""Write once: a put claims its keys in the directory first and stores only what it won.

Every write into a node that takes part in the cluster follows one protocol
with the directory, under a writer id made fresh for the call:

1. claim every key (``claim_many``): "granted" means this writer stores the
   block; "committed" means a copy exists somewhere (the outcome is
   "exists"); any other answer means another writer holds the claim
   ("pending");
2. store the won blocks through the node-store core;
3. commit what was stored (``commit_many`` says per key whether this copy
   was the first: "stored", or "exists"), abort the claims of everything
   won but not stored, and report the core's changes;
4. ask the directory to replicate the blocks of a replicated type.

A store that fails aborts the claims of all won keys. :meth:`WriteOnce.put`
takes the bytes in the call; :meth:`WriteOnce.open` reserves arena slots for
a co-located writer (:mod:`kvfabric.transfer.local`) and returns a
:class:`ClaimedWrite` that ends in step 3 once the writer has copied the
bytes in. Without a directory every key counts as won and nothing is claimed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvfabric.config import KVFabricConfig
from kvfabric.errors import FailedPrecondition
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.port import DirectoryPort, stored_change
from kvfabric.tiers.base import BlockRecord
from kvfabric.types import BlockKey, BlockType


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """Per block: stored here, already stored somewhere, or being written by another writer."""

    key: BlockKey
    status: str  # "stored" | "exists" | "pending"


@dataclass
class ClaimedWrite:
    """Arena slots reserved for a co-located writer, its keys claimed in the directory.

    ``slots[j]`` receives the block of hash ``slot_index[j]``; ``outcomes[i]``
    is already decided ("exists" or "pending") for every other hash. Exactly
    one of :meth:`commit` and :meth:`abort` ends it.
    """

    slots: list[memoryview]
    slot_index: list[int]
    outcomes: list[str | None]
    _commit: Callable[[list[int]], list[str]] = field(repr=False)
    _abort: Callable[[], None] = field(repr=False)
    _done: bool = field(default=False, repr=False)

    def commit(self, checksums: list[int]) -> list[str]:
        """Verify each slot against the writer's checksum and publish it; a status per hash
        ("stored", "exists", "pending", or "corrupt" where the bytes did not match)."""
        if self._done:
            raise FailedPrecondition("the reservation was already ended", "reservation")
        self._done = True
        return self._commit(checksums)

    def abort(self) -> None:
        """Release the slots and the claims (idempotent after commit)."""
        if not self._done:
            self._done = True
            self._abort()


class WriteOnce:
    """The write-once protocol of one node with the directory (see the module docstring).

    ``report()`` sends the core's changes to the directory; ``config`` says
    which block types are replicated.
    """

    def __init__(
        self,
        node_id: str,
        core: NodeStoreCore,
        directory: DirectoryPort | None,
        config: KVFabricConfig,
        report: Callable[[], None],
    ) -> None:
        self._node_id = node_id
        self._core = core
        self._directory = directory
        self._config = config
        self._report = report

    def put(
        self,
        keys: list[BlockKey],
        datas: Sequence[bytes],
        block_type: BlockType,
        program_id: str | None,
    ) -> list[PutOutcome]:
        """Store blocks already checked by the core, claiming each key first."""
        if self._directory is None:
            results = self._core.put_many(keys, datas, block_type=block_type, program_id=program_id)
            return [PutOutcome(r.key, "stored" if r.stored else "exists") for r in results]
        writer = self._writer_id()  # one writer per put call
        claims = self._directory.claim_many(
            self._node_id, writer, [(k, len(d)) for k, d in zip(keys, datas, strict=True)]
        )
        won = [i for i, c in enumerate(claims) if c == "granted"]
        outcomes = [PutOutcome(k, "exists" if c == "committed" else "pending")
                    for k, c in zip(keys, claims, strict=True)]  # fmt: skip
        if not won:
            return outcomes
        try:
            results = self._core.put_many(
                [keys[i] for i in won], [datas[i] for i in won],
                block_type=block_type, program_id=program_id,
            )  # fmt: skip
        except BaseException:
            self._directory.abort_many(self._node_id, writer, [keys[i] for i in won])
            raise
        metas = [self._core.meta(r.key) for r in results if r.stored]
        commits = [stored_change(m) for m in metas if m is not None]
        ok = self._directory.commit_many(self._node_id, writer, commits)
        unstored = [r.key for r in results if not r.stored]
        if unstored:  # stored meanwhile by a local writer: release this writer's claims
            self._directory.abort_many(self._node_id, writer, unstored)
        self._report()
        position = {k: i for i, k in enumerate(keys)}
        for c, committed in zip(commits, ok, strict=True):
            outcomes[position[c.key]] = PutOutcome(c.key, "stored" if committed else "exists")
        if block_type in self._config.replicated_types:
            self._directory.replicate([c.key for c in commits])
        return outcomes

    def open(
        self, keys: list[BlockKey], size: int, block_type: BlockType, program_id: str | None
    ) -> ClaimedWrite:
        """Claim ``keys`` (blocks of ``size`` bytes, of a registered namespace of that size)
        and reserve an arena slot for each key won."""
        outcomes: list[str | None] = [None] * len(keys)
        won, writer = list(range(len(keys))), self._writer_id()
        if self._directory is not None and keys:
            claims = self._directory.claim_many(self._node_id, writer, [(k, size) for k in keys])
            won = [i for i, c in enumerate(claims) if c == "granted"]
            for i, c in enumerate(claims):
                if c != "granted":
                    outcomes[i] = "exists" if c == "committed" else "pending"
        records = [BlockRecord(keys[i], size, 0, block_type, program_id) for i in won]
        try:
            res = self._core.open_write(records)
        except BaseException:
            self._abort_claims(writer, [keys[i] for i in won])
            raise
        first: dict[BlockKey, int] = {}
        for i in won:
            first.setdefault(keys[i], i)
        slot_index = [first[r.key] for r in res.records]
        for i in set(won) - set(slot_index):
            outcomes[i] = "exists"  # stored or being stored here already, or a repeated hash
        self._abort_claims(writer, res.present)

        def commit(sums: list[int]) -> list[str]:
            results = res.commit(None, sums)
            out = ["exists" if o is None else o for o in outcomes]
            stored = [r.key for r in results if r is not None]
            failed = [r.key for r, got in zip(res.records, results, strict=True) if got is None]
            for k in failed:
                out[first[k]] = "corrupt"
            committed = [True] * len(stored)
            if self._directory is not None:
                changes = [stored_change(m) for k in stored if (m := self._core.meta(k))]
                committed = self._directory.commit_many(self._node_id, writer, changes)
                stored = [c.key for c in changes]
                self._abort_claims(writer, failed)
            self._report()
            for k, ok in zip(stored, committed, strict=True):
                out[first[k]] = "stored" if ok else "exists"
            if self._directory is not None and block_type in self._config.replicated_types:
                self._directory.replicate(stored)
            return out

        def abort() -> None:
            res.abort()
            self._abort_claims(writer, [r.key for r in res.records])

        return ClaimedWrite([memoryview(b) for b in res.buffers], slot_index, outcomes,
                            commit, abort)  # fmt: skip

    def _writer_id(self) -> str:
        return f"{self._node_id[:16]}:{uuid.uuid4().hex[:16]}"

    def _abort_claims(self, writer: str, keys: Sequence[BlockKey]) -> None:
        if self._directory is not None and keys:
            self._directory.abort_many(self._node_id, writer, list(keys))
