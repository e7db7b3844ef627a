"""gRPC server reflection served as both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection ships only v1alpha; newer clients (grpcurl ≥ 1.9, Postman, grpcui) ask for
`grpc.reflection.v1.ServerReflection` first. Invariant this module relies on: the two reflection
protos are wire-identical — the same messages with the same field numbers and types, only the
proto package differs (nothing in a message names its package). So one grpcio-reflection
servicer, with the v1alpha message (de)serializers, answers `ServerReflectionInfo` under both
service names, and both names appear in its `list_services`.

For `describe`/`file_containing_symbol` of the v1 service itself, the default descriptor pool
needs a file declaring `grpc.reflection.v1`: derived here, once, from grpcio-reflection's v1alpha
FileDescriptorProto (file and package renamed, `.grpc.reflection.v1alpha.` type references
rewritten). A descriptor already in the pool (or a grpcio-reflection that ships
`grpc_reflection.v1`) is used instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection as v1alpha_reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
V1_PACKAGE = "grpc.reflection.v1"
V1ALPHA_SERVICE_NAME = f"{V1ALPHA_PACKAGE}.ServerReflection"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"
METHOD = "ServerReflectionInfo"


def _v1_type(name: str) -> str:
    prefix = f".{V1ALPHA_PACKAGE}."
    return f".{V1_PACKAGE}.{name.removeprefix(prefix)}" if name.startswith(prefix) else name


def _rewrite_messages(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            if field.HasField("type_name"):  # setting it, even to "", would mark it present
                field.type_name = _v1_type(field.type_name)
        _rewrite_messages(message.nested_type)


def derive_v1_file(v1alpha: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection file: v1alpha's, renamed, with its own type references rewritten."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.CopyToProto(proto)
    if proto.package != V1ALPHA_PACKAGE:
        raise ValueError(f"expected package {V1ALPHA_PACKAGE}, got {proto.package}")
    proto.name = V1_FILE_NAME
    proto.package = V1_PACKAGE
    _rewrite_messages(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = _v1_type(method.input_type)
            method.output_type = _v1_type(method.output_type)
    return proto


def v1_file_descriptor() -> FileDescriptor:
    """The default pool's file declaring `grpc.reflection.v1.ServerReflection`, adding the
    derived one if nothing declares it yet. Idempotent (adding the identical file again is a
    no-op for the pool, and a present declaration is found first)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileContainingSymbol(V1_SERVICE_NAME)
    except KeyError:
        pass
    try:  # a grpcio-reflection that ships v1 registers its own file on import
        importlib.import_module("grpc_reflection.v1.reflection_pb2")
    except ImportError:
        pool.AddSerializedFile(derive_v1_file(v1alpha_pb2.DESCRIPTOR).SerializeToString())
    return pool.FindFileContainingSymbol(V1_SERVICE_NAME)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` plus both reflection services, under both
    `grpc.reflection.v1` and `grpc.reflection.v1alpha`, from one grpcio-reflection servicer."""
    v1_file_descriptor()
    names = tuple(dict.fromkeys((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)))
    # grpcio-reflection's public asyncio servicer; its bundled stubs do not declare `aio`.
    servicer = v1alpha_reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    handlers = {
        METHOD: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, handlers)
            for name in (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
        )
    )
