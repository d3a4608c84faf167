"""Server reflection that serves our descriptors with their comments, as ``grpc.reflection.v1``
and ``grpc.reflection.v1alpha``.

grpcio-reflection serves descriptors copied from the ``_pb2`` modules, which carry no comments,
and offers only v1alpha (grpc/grpc#38576). Here our files come from
``referral/v1/api_descriptor.binpb`` (``make generate`` writes it with ``--include_source_info``),
so ``grpcurl describe`` and ``buf curl`` show the proto comments; the files they import come from
the default descriptor pool. v1 and v1alpha are the same protocol under two package names (the
messages are identical on the wire): one servicer answers both, with v1alpha's message classes.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

DESCRIPTOR_SET = ("referral.v1", "api_descriptor.binpb")
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file under the v1 package (the two differ
    only in their names)."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = f".{file.package}.", ".grpc.reflection.v1."
    file.name, file.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # assigning sets presence, even to ""
                field.type_name = field.type_name.replace(old, new)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    return file


class Descriptors:
    """Our files (with source info), everything they import, and the reflection protos, in one
    pool for look-ups, each with the serialized ``FileDescriptorProto`` reflection sends."""

    def __init__(self, commented: Iterable[descriptor_pb2.FileDescriptorProto], roots: Iterable[str]) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self._serialized: dict[str, bytes] = {}
        self._dependencies: dict[str, list[str]] = {}
        self._given = {file.name: file for file in commented}
        for extra in (_v1_file(),):
            self._given[extra.name] = extra
        for name in [*self._given, *roots]:
            self._add(name)

    def _add(self, name: str) -> None:
        if name in self._serialized:
            return
        file = self._given.get(name)
        if file is None:
            file = descriptor_pb2.FileDescriptorProto()
            descriptor_pool.Default().FindFileByName(name).CopyToProto(file)
        for dependency in file.dependency:
            self._add(dependency)
        self.pool.Add(file)
        self._serialized[name] = file.SerializeToString()
        self._dependencies[name] = list(file.dependency)

    def with_dependencies(self, name: str) -> list[bytes]:
        """The file and everything it imports, transitively, the file first."""
        order: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop()
            if current not in order:
                order.append(current)
                pending.extend(self._dependencies[current])
        return [self._serialized[n] for n in order]


def load(roots: Iterable[str]) -> Descriptors:
    data = importlib.resources.files(DESCRIPTOR_SET[0]).joinpath(DESCRIPTOR_SET[1]).read_bytes()
    return Descriptors(descriptor_pb2.FileDescriptorSet.FromString(data).file, roots)


class ReflectionServicer(reflection_pb2_grpc.ServerReflectionServicer):
    def __init__(self, service_names: Sequence[str], descriptors: Descriptors) -> None:
        self._services = tuple(sorted({*service_names, *SERVICE_NAMES}))
        self._descriptors = descriptors

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext[Request, Response]
    ) -> AsyncIterator[Response]:
        async for request in request_iterator:
            yield self._answer(request)

    def _answer(self, request: Request) -> Response:
        pool = self._descriptors.pool
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                return Response(
                    original_request=request,
                    list_services_response=reflection_pb2.ListServiceResponse(
                        service=[reflection_pb2.ServiceResponse(name=name) for name in self._services]
                    ),
                )
            if kind == "file_by_filename":
                return self._files(request, pool.FindFileByName(request.file_by_filename).name)
            if kind == "file_containing_symbol":
                return self._files(
                    request, pool.FindFileContainingSymbol(request.file_containing_symbol).name
                )
            if kind == "file_containing_extension":
                wanted = request.file_containing_extension
                message = pool.FindMessageTypeByName(wanted.containing_type)
                extension = pool.FindExtensionByNumber(message, wanted.extension_number)
                return self._files(request, pool.FindFileContainingSymbol(extension.full_name).name)
            if kind == "all_extension_numbers_of_type":
                message = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(extension.number for extension in pool.FindAllExtensions(message))
                return Response(
                    original_request=request,
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers
                    ),
                )
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, "not found")
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "unknown request")

    def _files(self, request: Request, name: str) -> Response:
        return Response(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=self._descriptors.with_dependencies(name)
            ),
        )


def _error(request: Request, code: grpc.StatusCode, message: str) -> Response:
    return Response(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=code.value[0], error_message=message),
    )


def enable(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection (v1 and v1alpha) for ``service_names`` and itself on ``server``."""
    roots = [descriptor_pool.Default().FindFileContainingSymbol(name).name for name in service_names]
    # error_details.proto too: grpcurl and buf curl decode an error's details (ErrorInfo, BadRequest)
    extra = [reflection_pb2.DESCRIPTOR.name, error_details_pb2.DESCRIPTOR.name]
    servicer = ReflectionServicer(service_names, load([*roots, *extra]))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=Request.FromString,
        response_serializer=Response.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in SERVICE_NAMES
        ]
    )
