"""Open Inference Protocol over gRPC (``inference.GRPCInferenceService``) for the active model.

The REST server's twin for clients that speak gRPC (``tritonclient.grpc``
works unmodified): the same runtime, the same checks and one-line errors
(agent/oip.py), as gRPC status codes. Inputs arrive as ``raw_input_contents``
or typed contents; outputs leave as ``raw_output_contents``, as Triton sends
them. Needs the agent's ``grpc`` extra (grpcio, protobuf): a device that
serves only REST never imports this module.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

# gRPC's core would print its own lines to stderr beside the agent's one-line errors (a taken port
# gives two); it stays quiet unless the operator asks (GRPC_VERBOSITY=debug). Read at import.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # after its verbosity is set
import numpy as np

from ._proto import grpc_predict_v2_pb2 as pb
from .errors import AgentError, ModelError, RequestError
from .oip import (
    OnInference,
    check_tensor,
    from_bytes,
    from_values,
    model_metadata,
    notify,
    output_bytes,
)
from .runtime import LoadedModel, ModelRuntime, NotServingError
from .serve import EXTENSIONS, SERVER_NAME, SERVER_VERSION
from .served import NotLoaded, ServedModels, UnknownModel

log = logging.getLogger(__name__)  # unexpected errors, with their traceback

SERVICE = "inference.GRPCInferenceService"

# typed contents field for each datatype (FP16 travels only as raw bytes, as in Triton)
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}



class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Service:
    """The calls; each one a plain function of the request (errors raised as _Abort)."""

    def __init__(self, models: ServedModels, max_request_bytes: int, on_inference: OnInference | None) -> None:
        self.models = models
        self.max_request_bytes = max_request_bytes
        self.on_inference = on_inference

    def server_live(self, _: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self, _: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.models.ready)

    def server_metadata(self, _: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except _Abort:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        meta = model_metadata(self._model(request.name, request.version))
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]], outputs=[tensors(**t) for t in meta["outputs"]],
        )

    def model_infer(self, request: pb.ModelInferRequest) -> tuple[pb.ModelInferResponse, Callable[[], None]]:
        """The answer, and what to run once it is sent (the sampling hook)."""
        names = _outputs(request, self._model(request.model_name, request.model_version))  # before running
        inputs = self._inputs(request)
        outputs, loaded = self.models.runtime(request.model_name).infer(inputs)
        names = _outputs(request, loaded)  # again for the model that answered: a swap may have come between
        specs = loaded.output_specs
        response = pb.ModelInferResponse(model_name=loaded.name, model_version=loaded.version, id=request.id)
        for name in names:
            value = outputs[name]
            response.outputs.add(name=name, datatype=specs[name].datatype, shape=value.shape)
            response.raw_output_contents.append(output_bytes(value))
        return response, lambda: notify(self.on_inference, inputs, outputs, loaded)

    def _inputs(self, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise RequestError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; give one per input")
        inputs: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            name = tensor.name
            if name in inputs:
                raise RequestError(f"input {name!r} is given twice")
            dtype, shape, count = check_tensor(name, tensor.datatype, list(tensor.shape), self.max_request_bytes)
            if raw:
                inputs[name] = from_bytes(name, raw[i], dtype, shape, count)
                continue
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise RequestError(f"input {name!r} of datatype {tensor.datatype} must come in raw_input_contents")
            inputs[name] = from_values(name, getattr(tensor.contents, field), dtype, shape, count)
        if not inputs:
            raise RequestError("the request names no inputs")
        return inputs

    def _model(self, name: str, version: str) -> LoadedModel:
        try:
            return self.models.find(name, version)
        except UnknownModel as e:
            code = grpc.StatusCode.UNAVAILABLE if isinstance(e, NotLoaded) else grpc.StatusCode.NOT_FOUND
            raise _Abort(code, str(e)) from None


def _outputs(request: pb.ModelInferRequest, loaded: LoadedModel) -> list[str]:
    """The outputs a request asks for (all when it names none), each one the model gives."""
    specs = loaded.output_specs
    names = [o.name for o in request.outputs] or list(specs)
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise RequestError(f"unknown output {unknown[0]!r}; the model gives {', '.join(sorted(specs))}")
    return names


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("grpc's abort returns only by raising")


def _unary(call: Callable[[Any], Any], answered_hook: bool = False) -> Callable[[Any, grpc.ServicerContext], Any]:
    """A grpc handler around ``call``: agent errors become status codes with their one-line message."""
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = call(request)
        except _Abort as e:
            _abort(context, e.code, str(e))
        except RequestError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NotServingError as e:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except ModelError as e:
            _abort(context, grpc.StatusCode.INTERNAL, str(e))
        except Exception as e:  # one bad request must never stop the server
            log.exception("gRPC inference server: unexpected error")
            _abort(context, grpc.StatusCode.INTERNAL, f"internal error: {e}")
        if not answered_hook:
            return result
        response, after = result
        context.add_callback(after)  # runs once the call is over: off the request's latency
        return response
    return handle


def _handlers(service: _Service) -> grpc.GenericRpcHandler:
    def method(call: Callable[[Any, grpc.ServicerContext], Any], request: Any, response: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=request.FromString, response_serializer=response.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ServerLive": method(_unary(service.server_live), pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": method(_unary(service.server_ready), pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ServerMetadata": method(_unary(service.server_metadata), pb.ServerMetadataRequest,
                                 pb.ServerMetadataResponse),
        "ModelReady": method(_unary(service.model_ready), pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ModelMetadata": method(_unary(service.model_metadata), pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": method(_unary(service.model_infer, answered_hook=True), pb.ModelInferRequest,
                             pb.ModelInferResponse),
    })


class GrpcServer:
    """``inference.GRPCInferenceService`` on ``address`` (``HOST:PORT`` or ``unix:/path``).

    ``max_calls`` calls are answered at once and as many more wait their turn (each holds up
    to ``max_request_bytes``: a gRPC message is read whole before it can wait); past those, calls
    are refused with RESOURCE_EXHAUSTED. (Admitting no more than are answered would refuse a
    client's next call while the server still counts its last one as running.)
    """

    def __init__(self, models: ServedModels | ModelRuntime, address: str, max_request_bytes: int, max_calls: int = 4,
                 on_inference: OnInference | None = None) -> None:
        self.address = address
        self._service = _Service(ServedModels.of(models), max_request_bytes, on_inference)
        self._max_request_bytes = max_request_bytes
        self._max_calls = max_calls
        self._server: grpc.Server | None = None
        self.port = 0

    def start(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(self._max_calls, thread_name_prefix="oip-grpc"),
            handlers=[_handlers(self._service)],
            options=[("grpc.max_receive_message_length", self._max_request_bytes),
                     ("grpc.so_reuseport", 0)],  # a second server on a taken port must fail, not share it
            maximum_concurrent_rpcs=2 * self._max_calls,
        )
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise AgentError(f"cannot serve gRPC on {self.address}: the address is taken or not HOST:PORT or "
                             "unix:/path; use a free one") from e
        server.start()
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=1.0).wait()
