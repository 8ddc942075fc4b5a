"""Transports: move protocol messages between the client engine and a server handler.

* :mod:`edgesplit.transport.inprocess` — same process, same bytes, no sockets.
* :mod:`edgesplit.transport.grpc_client` / :mod:`edgesplit.transport.grpc_server` — the network
  (``split.proto``; generated ``split_pb2*`` modules are committed, regenerate with ``make proto``).

Nothing is imported here eagerly so ``import edgesplit.transport.inprocess`` stays cheap.
"""
