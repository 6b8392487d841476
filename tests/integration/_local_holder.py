"""A local-channel client that opens a lease or a reservation and never ends it.

Usage: ``python _local_holder.py NODE_ID ADDRESS read|reserve NAMESPACE HASH_HEX SIZE``

It connects to the node's local channel as a real, separate process, sends
one READ (a read lease on the block) or one RESERVE (an arena slot for a new
block), prints ``HELD <answer>`` and sleeps until the test kills it — the
situation of an engine that crashed mid-copy. It exits by itself after 60 s
so it can never outlive a broken test run.
"""

from __future__ import annotations

import sys
import time

from kvfabric.transfer.local import protocol as p
from kvfabric.transfer.local.client import LocalClient


def main() -> None:
    node_id, address, mode, namespace, hash_hex, size = sys.argv[1:7]
    client = LocalClient(node_id, address, timeout_s=10)
    with client._conn(time.monotonic() + 10) as sock:
        if mode == "read":
            sock.sendall(p.encode([p.Op.READ, namespace, [bytes.fromhex(hash_hex)]]))
        else:
            message = [p.Op.RESERVE, namespace, [bytes.fromhex(hash_hex)], int(size), "GENERIC", ""]
            sock.sendall(p.encode(message))
        answer = p.check_reply(p.recv_message(sock))
        print("HELD", answer, flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
