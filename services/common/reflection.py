"""gRPC server reflection under both of its names: ``grpc.reflection.v1`` (the current one: grpcurl, Postman and
grpc-go's clients ask for it first) and ``grpc.reflection.v1alpha`` (what older clients and grpcio-reflection's
own client speak).

Why this module: grpcio-reflection (1.85) implements only v1alpha. The two protocols are the same proto under
two package names (every message, field and number alike; grpc-proto's v1 file is the v1alpha one renamed), so
v1 is served by the very servicer grpcio-reflection provides, behind a handler registered under v1's method name,
its messages read and written with v1alpha's classes (the bytes on the wire are identical). So that a client can
describe the v1 service itself, its file descriptor, ``grpc/reflection/v1/reflection.proto``, is added to the
process's descriptor pool, made from v1alpha's by renaming the package: nothing is vendored or generated.
"""

from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME           # grpc.reflection.v1alpha.ServerReflection
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto`` as a FileDescriptorProto: v1alpha's, with its package renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old = "." + proto.package + "."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")                    # v1alpha's say v1alpha (java_package, go_package, deprecated)

    def renamed(type_name: str) -> str:
        return "." + V1_PACKAGE + "." + type_name[len(old):] if type_name.startswith(old) else type_name

    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):            # messages only: a scalar field must not gain an empty one
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    return proto


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Once per process (the pool refuses a file twice)."""
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(v1_file_descriptor().SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection on ``server`` under v1 and v1alpha, listing ``service_names`` and both reflection services."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    servicer = v1alpha.ReflectionServicer(tuple(service_names) + SERVICE_NAMES, pool=pool)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1ALPHA_SERVICE_NAME, _handlers(servicer)),
                                     grpc.method_handlers_generic_handler(V1_SERVICE_NAME, _handlers(servicer))))


def _handlers(servicer: v1alpha.ReflectionServicer) -> dict[str, grpc.RpcMethodHandler]:
    return {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString)}
