#!/usr/bin/env sh
# Regenerate the gRPC code from edgesplit/transport/split.proto (called by `make proto`).
#
# protoc runs from the repository root with `-I .` and the proto given by its package path, so
# the generated grpc module imports `from edgesplit.transport import split_pb2` (a package
# import) instead of the top-level `import split_pb2` that only works from inside the folder.
#
# The output is committed: the base install needs grpcio and protobuf, never grpcio-tools.
# Regenerating with a newer grpcio-tools raises the minimum grpcio/protobuf versions the
# generated code accepts at import time (see GRPC_GENERATED_VERSION in split_pb2_grpc.py and
# ValidateProtobufRuntimeVersion in split_pb2.py) - keep pyproject.toml in step.
set -eu

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" -m grpc_tools.protoc \
    -I . \
    --python_out=. \
    --pyi_out=. \
    --grpc_python_out=. \
    edgesplit/transport/split.proto

echo "generated edgesplit/transport/split_pb2.py, split_pb2.pyi, split_pb2_grpc.py"
