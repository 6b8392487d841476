"""The node-local data path against a real node store, with real client processes.

Each node here is a NodeStoreService with its TCP data plane, its gRPC server
and its local channel, in this process; clients run in this process or as
subprocesses (one of them is SIGKILLed while it holds a lease or a slot).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvfabric import integrity
from kvfabric.config import load_config
from kvfabric.directory.service import DirectoryService
from kvfabric.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from kvfabric.rpc.client import Client, PutStatus
from kvfabric.transfer.local import protocol as p
from kvfabric.transfer.local.client import LocalClient
from kvfabric.types import BlockHash, BlockKey, Tier
from tests.rpcnode import RpcNode, hashes, random_blocks

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
SIZE = MiB
NS = "ns-local"
HOLDER = str(Path(__file__).with_name("_local_holder.py"))


def blocks(n: int, salt: str, size: int = SIZE) -> list[bytes]:
    return random_blocks(n, size, salt)


class Node(RpcNode):
    """A standalone node store with its gRPC server and its local channel."""

    def __init__(self, tmp: Path, directory: Any = None, node_id: str = "n-local",
                 **overrides: Any) -> None:  # fmt: skip
        super().__init__(tmp, directory, node_id, **overrides)
        assert self.service.start_local()
        self.local = self.service.local
        self.segment = Path("/dev/shm") / self.service.config.cpu_arena_shm_name

    def cpu_used(self) -> int:
        return self.service.core.tiers[Tier.CPU].used()


def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("local"), local_max_leases=3)
    yield n
    n.close()
    assert not n.segment.exists()  # the segment is unlinked with the node


@pytest.fixture
def client(node: Node) -> Iterator[Client]:
    with Client(node.server.address, timeout_s=10) as c:
        yield c


def test_put_and_get_go_through_the_shared_arena(node: Node, client: Client) -> None:
    hs, data = hashes(3, "arena"), blocks(3, "arena")
    assert client.put(NS, hs, [memoryview(d) for d in data]) == [PutStatus.STORED] * 3
    assert client.put(NS, hs[:1], data[:1]) == [PutStatus.EXISTS]
    assert client.get(NS, [*hs, *hashes(1, "never")]) == [*data, None]
    arrays = [np.zeros(SIZE, dtype=np.uint8) for _ in hs]
    assert client.get_into(NS, hs, arrays) == [True] * 3
    assert [a.tobytes() for a in arrays] == data
    # No byte went through gRPC or the TCP data plane.
    assert client._local is not None and client._local._client is not None
    counters = client.stats().counters
    assert not [k for k in counters if "method=Put" in k or "method=Get," in k]
    assert node.service.address not in client._reader._pool._idle
    eventually(lambda: node.local.held() == 0, "the read leases to be released")
    with pytest.raises(InvalidArgument) as err:  # the node's own check, as over gRPC
        client.put(NS, hashes(1, "small"), [b"x" * 4096])
    assert err.value.field == "block_bytes"


def test_client_process_round_trip(node: Node, client: Client) -> None:
    hs = hashes(4, "process")
    code = (
        "import sys, json, hashlib\n"
        "from kvfabric.rpc.client import Client\n"
        "addr, ns = sys.argv[1], sys.argv[2]\n"
        "hs = [bytes.fromhex(h) for h in json.loads(sys.argv[3])]\n"
        "data = [hashlib.sha256(h).digest() * (1 << 15) for h in hs]\n"
        "with Client(addr, timeout_s=10) as c:\n"
        "    st = c.put(ns, hs, data)\n"
        "    ok = c.get(ns, hs) == data\n"
        "    print(json.dumps([s.value for s in st] + [ok, c._local._client is not None]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, node.server.address, NS, json.dumps([h.hex() for h in hs])],
        capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["stored"] * 4 + [True, True]
    assert client.get(NS, hs) == [hashlib.sha256(h).digest() * (1 << 15) for h in hs]


def test_write_once_and_pulls_across_nodes_sharing_a_directory(tmp_path: Path) -> None:
    directory = DirectoryService(load_config(overrides={"data_dir": str(tmp_path / "dir")},
                                             env={}))  # fmt: skip
    a = Node(tmp_path / "a", directory, node_id="node-a")
    b = Node(tmp_path / "b", directory, node_id="node-b")
    try:
        hs, data = hashes(3, "cluster"), blocks(3, "cluster")
        with Client(a.server.address, timeout_s=10) as ca, Client(b.server.address,
                                                                  timeout_s=10) as cb:
            assert ca.put(NS, hs, data) == [PutStatus.STORED] * 3
            assert cb.put(NS, hs, data) == [PutStatus.EXISTS] * 3  # stored elsewhere: write once
            assert b.service.core.contains([BlockKey(NS, BlockHash(h)) for h in hs]) == [None] * 3
            assert cb.get(NS, hs) == data  # node B pulled them from A, then served them locally
            assert b.service.core.contains([BlockKey(NS, BlockHash(h)) for h in hs]) == [
                Tier.CPU] * 3  # fmt: skip
            assert ca._local and ca._local._client and cb._local and cb._local._client
            assert cb.lookup(NS, hs).matched == 3
            (h,), fresh = hashes(1, "cluster-killed"), blocks(1, "cluster-killed")
            proc = _hold(b, "reserve", h)
            try:
                assert ca.put(NS, [h], fresh) == [PutStatus.PENDING]  # B's writer holds the claim
            finally:
                _kill(proc)
            eventually(lambda: b.local.held() == 0, "the dead writer's reservation to end")
            assert ca.put(NS, [h], fresh) == [PutStatus.STORED]  # its claim was aborted
    finally:
        a.close()
        b.close()
        directory.close()


def _hold(node: Node, mode: str, h: bytes) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, HOLDER, node.service.node_id, node.service.address, mode, NS, h.hex(),
         str(SIZE)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("HELD"), line
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_killed_reader_releases_its_lease(node: Node, client: Client) -> None:
    (h,), data = hashes(1, "killed-reader"), blocks(1, "killed-reader")
    client.put(NS, [h], data)
    before = node.cpu_used()
    proc = _hold(node, "read", h)
    try:
        assert node.local.held() == 1
        assert node.service.core.evict([BlockKey(NS, BlockHash(h))]) == 1
        assert node.cpu_used() == before  # evicted, but its slot is still leased
    finally:
        _kill(proc)
    eventually(lambda: node.local.held() == 0, "the dead reader's lease to end")
    assert node.cpu_used() == before - SIZE  # the slot came back


def test_killed_writer_releases_its_slot(node: Node, client: Client) -> None:
    (h,), data = hashes(1, "killed-writer"), blocks(1, "killed-writer")
    before = node.cpu_used()
    proc = _hold(node, "reserve", h)
    try:
        assert node.local.held() == 1
        assert node.cpu_used() == before + SIZE
        assert client.put(NS, [h], data) == [PutStatus.EXISTS]  # being written meanwhile
    finally:
        _kill(proc)
    eventually(lambda: node.local.held() == 0, "the dead writer's reservation to end")
    assert node.cpu_used() == before
    assert client.get(NS, [h]) == [None]  # nothing half-written became visible
    assert client.put(NS, [h], data) == [PutStatus.STORED]
    assert client.get(NS, [h]) == data


def test_corrupt_bytes_in_the_segment_are_a_miss(node: Node, client: Client) -> None:
    hs, data = hashes(3, "corrupt"), blocks(3, "corrupt")
    client.put(NS, hs, data)
    offset = node.service.core.tiers[Tier.CPU].slot_offset(BlockKey(NS, BlockHash(hs[1])))
    assert offset is not None
    failures = node.service.stats().counters.checksum_failures
    with open(node.segment, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as seg:  # another process
        seg[offset + 1234] ^= 0x5A
    assert client.get(NS, hs) == [data[0], None, data[2]]
    eventually(lambda: node.service.core.contains([BlockKey(NS, BlockHash(hs[1]))]) == [None],
               "the corrupt block to be dropped")  # fmt: skip
    assert node.service.stats().counters.checksum_failures == failures + 1


def test_the_node_verifies_what_a_client_wrote(node: Node) -> None:
    (h,), (data,) = hashes(1, "liar"), blocks(1, "liar")
    before, failures = node.cpu_used(), node.service.stats().counters.checksum_failures
    client = LocalClient(node.service.node_id, node.service.address, timeout_s=5)
    try:
        with client._conn(time.monotonic() + 5) as sock:
            sock.sendall(p.encode([p.Op.RESERVE, NS, [h], SIZE, "GENERIC", ""]))
            ident, [[state, offset]] = p.check_reply(p.recv_message(sock))
            assert state == p.Slot.RESERVED
            client._view[offset : offset + SIZE] = data
            sock.sendall(p.encode([p.Op.COMMIT, ident, [integrity.checksum(data) ^ 1]]))
            assert p.check_reply(p.recv_message(sock)) == [["corrupt"]]
    finally:
        client.close()
    assert node.service.stats().counters.checksum_failures == failures + 1
    assert node.cpu_used() == before  # the slot was given back
    assert node.service.core.contains([BlockKey(NS, BlockHash(h))]) == [None]


def test_blocks_outside_the_arena_come_over_the_network(node: Node, client: Client) -> None:
    hs, data = hashes(2, "disk"), blocks(2, "disk")
    client.put(NS, hs, data)
    assert client.move(NS, hs[1:], Tier.DISK).moved == 1
    assert client.get(NS, hs) == data
    assert node.service.address in client._reader._pool._idle  # block 1 took the data plane


def test_lease_limit_per_connection(node: Node) -> None:
    h = hashes(1, "limit")
    client = LocalClient(node.service.node_id, node.service.address, timeout_s=5)
    try:
        with pytest.raises(ResourceExhausted) as err, client._conn(time.monotonic() + 5) as sock:
            for _ in range(4):
                sock.sendall(p.encode([p.Op.READ, NS, h]))
                p.check_reply(p.recv_message(sock))
        assert err.value.field == "local_max_leases"
        eventually(lambda: node.local.held() == 0, "the leases of a closed connection to end")
    finally:
        client.close()


def test_protocol_abuse_is_refused_and_the_server_stays_up(node: Node, client: Client) -> None:
    name = p.socket_name(node.service.node_id, node.service.address)
    for frame, code in (
        (p.encode([p.Op.READ, NS, []]), "UNAUTHENTICATED"),  # READ before HELLO
        (p.encode([p.Op.HELLO, 99, ""]), "FAILED_PRECONDITION"),
        (p.encode([p.Op.HELLO, "1", ""]), "INVALID_ARGUMENT"),
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(name)
            s.sendall(frame)
            reply = p.recv_message(s)
            assert reply is not None and reply[:2] == [p.ERR, code]
    # Not msgpack, an oversized frame, an op that is not a number: the node hangs up.
    for garbage in (b"\0\0\0\3\xc1\xc1\xc1", b"\xff\xff\xff\xff", p.encode([[1], 2])):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(name)
            s.sendall(garbage)
            assert s.recv(1) == b""
    hs, data = hashes(1, "after-abuse"), blocks(1, "after-abuse")
    assert client.put(NS, hs, data) == [PutStatus.STORED]


def test_timeouts_and_connection_limit(tmp_path: Path) -> None:
    node = Node(tmp_path, local_lease_timeout_s=0.3, local_max_connections=2)
    try:
        h = hashes(1, "timeout")
        with Client(node.server.address, timeout_s=10) as c:
            c.put(NS, h, blocks(1, "timeout"))
        eventually(lambda: node.local.connections() == 0, "the client's connection to close")
        first = LocalClient(node.service.node_id, node.service.address, timeout_s=5)
        second = LocalClient(node.service.node_id, node.service.address, timeout_s=5)
        with pytest.raises(FailedPrecondition) as err:
            LocalClient(node.service.node_id, node.service.address, timeout_s=5)
        assert err.value.field == "local_max_connections"
        with first._conn(time.monotonic() + 5) as sock:
            sock.sendall(p.encode([p.Op.READ, NS, h]))
            (lease, _) = p.check_reply(p.recv_message(sock))
            assert node.local.held() == 1
            eventually(lambda: node.local.held() == 0, "the lease to time out", 3.0)
            sock.sendall(p.encode([p.Op.RELEASE, lease, []]))  # too late: ignored
            sock.sendall(p.encode([p.Op.COMMIT, 12345, []]))
            with pytest.raises(FailedPrecondition):
                p.check_reply(p.recv_message(sock))
        assert first.read(NS, [BlockHash(h[0])], None, 5)[0] == blocks(1, "timeout")[0]
        first.close()
        second.close()
    finally:
        node.close()


def test_auth_needs_a_token_for_every_namespace(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"full-token": "*", "tenant-token": [NS]}))
    node = Node(tmp_path, auth_tokens_file=str(tokens))
    try:
        hs, data = hashes(2, "auth"), blocks(2, "auth")
        with Client(node.server.address, token="full-token", timeout_s=10) as full:
            assert full.put(NS, hs, data) == [PutStatus.STORED] * 2
            assert full._local is not None and full._local._client is not None
        with Client(node.server.address, token="tenant-token", timeout_s=10) as tenant:
            assert tenant.get(NS, hs) == data  # over the network, where its grant applies
            assert tenant._local is not None and tenant._local._client is None
        with Client(node.server.address, timeout_s=10) as anonymous:
            with pytest.raises(Unauthenticated):
                anonymous.put(NS, hashes(1, "anon"), blocks(1, "anon"))
            assert anonymous._local is not None and anonymous._local._client is None
        with pytest.raises(Unauthenticated):
            LocalClient(node.service.node_id, node.service.address, token="wrong", timeout_s=5)
    finally:
        node.close()


def test_segment_is_private_to_the_user(node: Node) -> None:
    st = os.stat(node.segment)
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o600
