"""The kvfabric.v1 gRPC API: generated stubs (``v1/``), conversions, servicer, server, auth.

Server side: ``kvfabric.rpc.server.start_server(service, config)``. Nothing
is imported here, so ``import kvfabric.rpc`` does not load gRPC.
"""
