"""The node-local data path: co-located clients copy blocks through the shared arena.

An engine process on the same host as its NodeStore never moves block bytes
through an RPC payload (DESIGN.md, "Node-local data path"). The CPU tier's
arena is a named ``/dev/shm`` segment; a client maps it and a save or load
is one copy (that checksums as it copies) plus small control messages over a
Unix socket: READ → copy out → RELEASE, and RESERVE → copy in → COMMIT.

Discovery. The socket lives in Linux's abstract namespace under a name
derived from the node's id and data-plane address
(:func:`protocol.socket_name`), which any client learns from ``Stats``. A
client that is not on the node's host (or not in its network namespace)
simply finds no such socket and uses the network path. On connect each side
checks the other's user id with ``SO_PEERCRED``; the HELLO answer carries
the node id and address (to catch a name collision), the host's boot id, and
the segment's name, size, device and inode, which the client checks against
the file it opens (0600, owned by this user) before mapping it.

Security. Only the node's own user may connect (that user can read the
segment file anyway). A client maps the whole arena read-write, so the
channel cannot enforce namespaces per byte: when auth is on, HELLO must carry
a bearer token valid for every namespace (checked in constant time by
:class:`kvfabric.rpc.auth.Authorizer`); a namespace-limited token, or none,
is refused and that client keeps using gRPC, where its grant is enforced.
Thus the local path is never weaker than the gRPC path.

Integrity and bounds. The client verifies XXH3-64 of every block it copies
out (a mismatch is a miss, and the node re-verifies and drops the block); the
node verifies every block a client wrote before publishing it. Leases and
reservations are bounded per connection in count (``local_max_leases``) and
time (``local_lease_timeout_s``) and end when the connection does, so a
killed client never leaks arena slots or pins blocks.

Modules: :mod:`.protocol` (messages), :mod:`.sessions` (what a connection
holds), :mod:`.segment` (naming and mapping the segment), :mod:`.server`
(runs in the NodeStore process), :mod:`.client` (runs in the engine).
"""
