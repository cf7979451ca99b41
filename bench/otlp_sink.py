"""A minimal OTLP/gRPC trace receiver on 127.0.0.1, standing in for an OpenTelemetry Collector: it accepts every
export, counts the spans and keeps them (for tests) or only counts them (for benchmarks). Needs the tracing extra."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass(frozen=True)
class Received:
    service: str  # the resource's service.name
    span: Span


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.count = 0
        self.spans: list[Received] = []
        self._lock = threading.Lock()

    def Export(  # noqa: N802  (the generated servicer's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope in resource_spans.scope_spans:
                with self._lock:
                    self.count += len(scope.spans)
                    if self.keep:
                        self.spans.extend(Received(service, s) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def start_sink(keep: bool = True) -> tuple[grpc.Server, int, Sink]:
    """A running receiver: (server, port, sink); stop it with `server.stop(0)`."""
    sink = Sink(keep)
    server = grpc.server(futures.ThreadPoolExecutor(2, thread_name_prefix="otlp-sink"))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, sink
