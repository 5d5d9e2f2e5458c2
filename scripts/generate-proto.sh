#!/usr/bin/env bash
# Regenerates Sources/WhittleONNX/Generated/onnx.pb.swift from proto/onnx.proto and
# Sources/WhittleProtocol/Generated/whittle.pb.swift from proto/whittle.proto.
#
# Run by hand, from anywhere inside the repository, whenever proto/onnx.proto
# changes. It is NEVER run in CI: the generated file is committed, and the
# build only needs the SwiftProtobuf runtime library (swift-protobuf 1.39.0).
#
# Requirements
#   * protoc (Debian: `apt-get install protobuf-compiler`; 3.21 is known to work).
#   * protoc-gen-swift built from apple/swift-protobuf at tag 1.39.0, the same
#     version as the SwiftProtobuf runtime the package depends on:
#
#       git clone https://github.com/apple/swift-protobuf /tmp/swift-protobuf
#       cd /tmp/swift-protobuf && git checkout 1.39.0
#       swift build -c release --product protoc-gen-swift     # ~2 minutes
#
#     which leaves the plugin at /tmp/swift-protobuf/.build/release/protoc-gen-swift
#     (the default below). Point PROTOC_GEN_SWIFT at it if it lives elsewhere.
#
# Usage
#   scripts/generate-proto.sh
#   PROTOC=/path/to/protoc PROTOC_GEN_SWIFT=/path/to/protoc-gen-swift scripts/generate-proto.sh
#
# Output: Sources/WhittleONNX/Generated/onnx.pb.swift with public visibility;
# the types are named Onnx_ModelProto, Onnx_TensorProto, ... (package `onnx`).
set -euo pipefail

EXPECTED_PLUGIN_VERSION="1.39.0"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROTOC="${PROTOC:-protoc}"
PROTOC_GEN_SWIFT="${PROTOC_GEN_SWIFT:-/tmp/swift-protobuf/.build/release/protoc-gen-swift}"
OUT_DIR="$ROOT/Sources/WhittleONNX/Generated"

if ! command -v "$PROTOC" >/dev/null 2>&1; then
  echo "error: protoc not found (set PROTOC or apt-get install protobuf-compiler)" >&2
  exit 1
fi
if [ ! -x "$PROTOC_GEN_SWIFT" ]; then
  echo "error: protoc-gen-swift not found at $PROTOC_GEN_SWIFT" >&2
  echo "       build it as described at the top of $0, or set PROTOC_GEN_SWIFT" >&2
  exit 1
fi

plugin_version="$("$PROTOC_GEN_SWIFT" --version 2>/dev/null | awk '{print $NF}')"
if [ "$plugin_version" != "$EXPECTED_PLUGIN_VERSION" ]; then
  echo "error: protoc-gen-swift is version '$plugin_version', expected $EXPECTED_PLUGIN_VERSION" >&2
  echo "       (generated code must match the SwiftProtobuf runtime version)" >&2
  exit 1
fi

mkdir -p "$OUT_DIR"
cd "$ROOT"
"$PROTOC" \
  --plugin=protoc-gen-swift="$PROTOC_GEN_SWIFT" \
  --proto_path=proto \
  --swift_out="$OUT_DIR" \
  --swift_opt=Visibility=Public \
  proto/onnx.proto

# Whittle's own wire messages (module WhittleProtocol).
PROTOCOL_DIR="$ROOT/Sources/WhittleProtocol/Generated"
mkdir -p "$PROTOCOL_DIR"
"$PROTOC" \
  --plugin=protoc-gen-swift="$PROTOC_GEN_SWIFT" \
  --proto_path=proto \
  --swift_out="$PROTOCOL_DIR" \
  --swift_opt=Visibility=Public \
  proto/whittle.proto

echo "generated $(realpath --relative-to="$ROOT" "$OUT_DIR/onnx.pb.swift") and $(realpath --relative-to="$ROOT" "$PROTOCOL_DIR/whittle.pb.swift") with $("$PROTOC" --version), protoc-gen-swift $plugin_version"
