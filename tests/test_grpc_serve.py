"""OIP over gRPC: a real `fleet-agent serve --grpc` process and unmodified tritonclient.grpc
(plus Triton's own generated stubs for what tritonclient never sends: typed contents)."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgefleet.agent.errors import AgentError
from edgefleet.agent.runtime import ModelRuntime
from edgefleet.agent.serve import ConnectionLimits, start_grpc
from tests.conftest import free_port

FLEET_AGENT = str(Path(sys.executable).with_name("fleet-agent"))
X = np.random.default_rng(3).random((2, 64), dtype=np.float32)


@pytest.fixture(scope="module")
def agent(digits):
    """`fleet-agent serve` with REST and gRPC, batching on (so concurrent calls go through the batcher)."""
    http, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([FLEET_AGENT, "serve", str(digits.model), "--name", "digits", "--version", "7",
                             "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc_port}",
                             "--max-batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert f"and gRPC 127.0.0.1:{grpc_port}" in line, proc.stderr.read()
    yield f"127.0.0.1:{grpc_port}"
    proc.terminate()
    assert proc.wait(20) == 0


@pytest.fixture(scope="module")
def expected(digits):
    runtime = ModelRuntime()
    loaded = runtime.load(digits.model)
    yield lambda x: loaded.run({"input": x})
    runtime.close()


def infer_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_tritonclient_health_metadata_and_infer(agent, expected):
    client = triton.InferenceServerClient(agent)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("digits", "7")
        assert not client.is_model_ready("other") and not client.is_model_ready("digits", "8")
        assert "binary_tensor_data" in client.get_server_metadata().extensions
        meta = client.get_model_metadata("digits", as_json=True)
        assert meta["versions"] == ["7"] and meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
        result = client.infer("digits", [infer_input(X)], request_id="r9")
        want = expected(X)
        assert np.allclose(result.as_numpy("probabilities"), want["probabilities"], atol=1e-6)
        assert np.array_equal(result.as_numpy("label"), want["label"]) and result.get_response().id == "r9"
        only = client.infer("digits", [infer_input(X)], outputs=[triton.InferRequestedOutput("label")])
        assert only.as_numpy("probabilities") is None and np.array_equal(only.as_numpy("label"), want["label"])
    finally:
        client.close()


def test_concurrent_clients_get_their_own_rows(agent, expected):
    # more than the server answers at once (max_bodies = the batch size, 4), fewer than it admits (8)
    xs = [np.random.default_rng(i).random((1 + i % 2, 64), dtype=np.float32) for i in range(6)]
    ok: dict[int, bool] = {}

    def one(i: int) -> None:
        client = triton.InferenceServerClient(agent)
        try:
            got = [client.infer("digits", [infer_input(xs[i])]).as_numpy("probabilities") for _ in range(20)]
            ok[i] = all(np.allclose(g, expected(xs[i])["probabilities"], atol=1e-6) for g in got)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ok == dict.fromkeys(range(len(xs)), True)


def test_typed_contents_through_tritons_own_proto(agent, expected):
    """tritonclient always sends raw bytes; other clients fill the typed contents field."""
    with grpc.insecure_channel(agent) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="digits")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
        tensor.contents.fp32_contents.extend(X.reshape(-1).tolist())
        response = stub.ModelInfer(request)
        got = np.frombuffer(response.raw_output_contents[1], np.float32).reshape(2, 10)
        assert [o.name for o in response.outputs] == ["label", "probabilities"]
        assert np.allclose(got, expected(X)["probabilities"], atol=1e-6)
        request.inputs[0].datatype = "FP16"  # half floats have no typed contents field
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must come in raw_input_contents" in refused.value.details()


@pytest.mark.parametrize(
    "build, code, message",
    [
        (lambda r: setattr(r, "model_name", "other"), "NOT_FOUND", "unknown model 'other'"),
        (lambda r: setattr(r, "model_version", "3"), "NOT_FOUND", "no version '3'"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 63), "INVALID_ARGUMENT", "needs 504"),
        (lambda r: r.inputs[0].shape.extend([2**40]), "INVALID_ARGUMENT", "declares shape"),
        (lambda r: setattr(r.inputs[0], "datatype", "COMPLEX"), "INVALID_ARGUMENT", "datatype 'COMPLEX'"),
        (lambda r: r.raw_input_contents.append(b"x"), "INVALID_ARGUMENT", "2 raw_input_contents for 1 inputs"),
        (lambda r: r.outputs.add(name="nope"), "INVALID_ARGUMENT", "unknown output 'nope'"),
        (lambda r: (r.inputs.add(name="input", datatype="FP32", shape=[2, 64]), r.raw_input_contents.append(X.tobytes())),
         "INVALID_ARGUMENT", "input 'input' is given twice"),
    ],
)
def test_bad_requests_get_a_status_and_the_server_keeps_serving(agent, expected, build, code, message):
    with grpc.insecure_channel(agent) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="digits")
        request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
        request.raw_input_contents.append(X.tobytes())
        build(request)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request)
        assert refused.value.code().name == code and message in refused.value.details()
        assert "\n" not in refused.value.details()
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ModelConfig(service_pb2.ModelConfigRequest(name="digits"))
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    client = triton.InferenceServerClient(agent)
    try:
        assert np.allclose(client.infer("digits", [infer_input(X)]).as_numpy("probabilities"),
                           expected(X)["probabilities"], atol=1e-6)
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_metadata("other")
    finally:
        client.close()


def test_a_taken_port_is_one_error_line(agent, digits):
    result = subprocess.run([FLEET_AGENT, "serve", str(digits.model), "--http", f"127.0.0.1:{free_port()}",
                             "--grpc", agent], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith(f"error: cannot serve gRPC on {agent}")
    assert result.stderr.count("\n") == 1


def test_without_the_grpc_extra_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "grpc", None)  # as if grpcio were not installed
    monkeypatch.delitem(sys.modules, "edgefleet.agent.grpc_serve", raising=False)
    with pytest.raises(AgentError, match=r"pip install 'edgefleet\[agent,grpc\]'"):
        start_grpc(ModelRuntime(), "127.0.0.1:0", 1024, ConnectionLimits())
