"""A loopback OTLP/HTTP receiver, as a collector listens for traces: every span POSTed to
/v1/traces (protobuf, plain or gzipped) kept, decoded with opentelemetry-proto, with the
resource it came with.

`python tests/otlp_receiver.py [PORT]` serves until interrupted."""

from __future__ import annotations

import gzip
from typing import Any

from loopback_server import LoopbackServer, serve_forever
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["OtlpReceiver", "attributes_of"]


class OtlpReceiver(LoopbackServer):
    label = "OTLP receiver"

    def __init__(self, port: int = 0) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []  # each span's resource's attributes
        super().__init__([Route("/v1/traces", self._traces, methods=["POST"])], port=port)

    def reset(self) -> None:
        super().reset()
        self.spans.clear()
        self.resources.clear()

    async def _traces(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.resources.append(resource)
                    self.spans.append(span)
        answer = ExportTraceServiceResponse().SerializeToString()
        return Response(answer, media_type="application/x-protobuf")


def attributes_of(pairs: Any) -> dict[str, Any]:
    """OTLP key-values as a dict of plain values (arrays as lists)."""
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


if __name__ == "__main__":
    serve_forever(OtlpReceiver)
