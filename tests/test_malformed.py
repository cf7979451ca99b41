"""Bytes that are not a valid message, sent to every method: OK or INVALID_ARGUMENT, one access line, no traceback.

(NOT_FOUND is also allowed for a valid request naming an unknown health service or model: the protocol's answer.)

A raw channel with identity serializers sends the bytes as they are, as a hostile caller would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reranker_proto import reranker_pb2 as pb
from tests.subprocess_server import ServerProcess

OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
# Valid requests that name something: a health service, a model. An unknown one is NOT_FOUND, the protocol's answer.
NAMING: dict[str, Any] = {
    "Health/Check": health_pb2.HealthCheckRequest,
    "Rerank": pb.RerankRequest,
    "GetModelInfo": pb.GetModelInfoRequest,
}
SEEN: Counter[str] = Counter()


def _raw(data: bytes) -> bytes:
    return data


VALID = [
    pb.RerankRequest(query="what is panda?", candidates=["hi", "a bear"], top_n=1, request_id="r").SerializeToString(),
    pb.RerankRequest(pairs=[pb.Pair(query="q", passage="p")], normalize=True, max_length=16).SerializeToString(),
    health_pb2.HealthCheckRequest(service="reranker.v1.Reranker").SerializeToString(),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message cut short, with bytes flipped, inserted, or a string byte made invalid UTF-8."""
    data = bytearray(draw(st.sampled_from(VALID)))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "bad utf-8"]))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        return bytes(data[:at])
    if kind == "flip":
        data[at] ^= draw(st.integers(1, 255))
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    else:
        data[-1] = 0xFF  # every message above ends inside a string field
    return bytes(data)


@pytest.fixture(scope="module")
def process(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("malformed") / "server.log", "--threads", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(process: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(process.target) as ch:
        yield ch


def _unary(channel: grpc.Channel, method: str) -> Callable[[bytes], grpc.StatusCode]:
    call = channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)

    def send(data: bytes) -> grpc.StatusCode:
        call(data, timeout=30)
        return OK

    return send


def _rerank_stream(channel: grpc.Channel) -> Callable[[bytes], grpc.StatusCode]:
    """The call itself must end OK; the message's own answer says OK or INVALID_ARGUMENT."""
    call = channel.stream_stream(
        "/reranker.v1.Reranker/RerankStream",
        request_serializer=_raw,
        response_deserializer=pb.RerankStreamResponse.FromString,
    )

    def send(data: bytes) -> grpc.StatusCode:
        (answer,) = list(call(iter([data]), timeout=30))
        if answer.HasField("error"):
            if answer.error.code == grpc.StatusCode.NOT_FOUND.value[0]:
                pb.RerankRequest.FromString(data)  # a valid request naming an unknown model
                return grpc.StatusCode.NOT_FOUND
            assert answer.error.code == INVALID.value[0], answer.error
            return INVALID
        return OK

    return send


def _watch(channel: grpc.Channel) -> Callable[[bytes], grpc.StatusCode]:
    call = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=_raw, response_deserializer=_raw)

    def send(data: bytes) -> grpc.StatusCode:
        responses = call(data, timeout=30)
        next(responses)  # a valid Watch streams until cancelled: its first answer is enough
        responses.cancel()
        return OK

    return send


def _reflection(channel: grpc.Channel) -> Callable[[bytes], grpc.StatusCode]:
    call = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=_raw,
        response_deserializer=_raw,
    )

    def send(data: bytes) -> grpc.StatusCode:
        list(call(iter([data]), timeout=30))
        return OK

    return send


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), mutated()))
def test_malformed_bytes_get_ok_or_invalid_argument_on_every_method(channel: grpc.Channel, data: bytes) -> None:
    methods = {
        "Rerank": _unary(channel, "/reranker.v1.Reranker/Rerank"),
        "GetModelInfo": _unary(channel, "/reranker.v1.Reranker/GetModelInfo"),
        "RerankStream": _rerank_stream(channel),
        "Health/Check": _unary(channel, "/grpc.health.v1.Health/Check"),
        "Health/Watch": _watch(channel),
        "ServerReflectionInfo": _reflection(channel),
    }
    for name, send in methods.items():
        try:
            code = send(data)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND and name in NAMING:
                NAMING[name].FromString(data)  # a valid request naming an unknown health service or model
            else:
                assert code == INVALID, f"{name}: {code}: {details}"
            if "not a valid" in details:
                assert details.startswith("the request is not a valid "), details
        SEEN[f"{name}:{code.name}"] += 1


def test_the_server_serves_after_malformed_bytes_and_logged_no_traceback(
    process: ServerProcess, channel: grpc.Channel
) -> None:
    # Runs after the property test in file order; on its own it still checks a fresh server.
    bad = VALID[0][:-1]  # the last string announces a byte that is not there
    with pytest.raises(grpc.RpcError) as err:
        _unary(channel, "/reranker.v1.Reranker/Rerank")(bad)
    assert err.value.code() == INVALID  # type: ignore[attr-defined]
    message = err.value.details()  # type: ignore[attr-defined]
    assert message.startswith("the request is not a valid reranker.v1.RerankRequest: ")
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    log = process.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    rejected = [line for line in log.splitlines() if "code=INVALID_ARGUMENT" in line and "method=Rerank " in line]
    assert rejected, "each refused call writes one access line"
    print(f"\nmalformed bytes: outcomes {dict(sorted(SEEN.items()))}")
