"""Several models behind one server: unmodified tritonclient (HTTP and gRPC) addresses each by
name against `fleet-agent serve` with two real models (the digits classifier and PP-OCR's
text-direction classifier), and each answers as its own raw ONNX Runtime session does."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from edgefleet.agent.runtime import ModelRuntime
from tests.conftest import free_port

FLEET_AGENT = str(Path(sys.executable).with_name("fleet-agent"))
DIGITS = np.random.default_rng(5).random((3, 64), dtype=np.float32)
TEXT_LINES = np.random.default_rng(6).random((2, 3, 48, 192), dtype=np.float32)


@pytest.fixture(scope="module")
def two_models(digits, ocr_models, tmp_path_factory) -> dict[str, Path]:
    """The two model files, named as the server will name them."""
    folder = tmp_path_factory.mktemp("two")
    found = {"digits": folder / "digits.onnx", "textdir": folder / "textdir.onnx"}
    shutil.copy(digits.model, found["digits"])
    shutil.copy(ocr_models["cls"], found["textdir"])
    return found


@pytest.fixture(scope="module")
def server(two_models) -> Iterator[tuple[str, str]]:
    http, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([FLEET_AGENT, "serve", str(two_models["digits"]), str(two_models["textdir"]),
                             "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc_port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving digits, textdir on "), proc.stderr.read()
    yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"
    proc.terminate()
    assert proc.wait(20) == 0


@pytest.fixture(scope="module")
def expected(two_models) -> Iterator[dict[str, dict[str, np.ndarray]]]:
    runtime = ModelRuntime()
    digits, textdir = runtime.load(two_models["digits"]), runtime.load(two_models["textdir"])
    yield {"digits": digits.run({"input": DIGITS}), "textdir": textdir.run({textdir.inputs[0].name: TEXT_LINES})}
    runtime.close()


def _inputs(module, name: str, x: np.ndarray) -> list:
    tensor = module.InferInput(name, list(x.shape), "FP32")
    if module is triton_http:
        tensor.set_data_from_numpy(x, binary_data=True)
    else:
        tensor.set_data_from_numpy(x)
    return [tensor]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_model_answers_by_name_as_its_own_session(server, expected, protocol):
    module = triton_http if protocol == "http" else triton_grpc
    client = module.InferenceServerClient(server[0] if protocol == "http" else server[1])
    try:
        assert client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("textdir")
        assert not client.is_model_ready("detector")
        text_input = client.get_model_metadata("textdir", as_json=True)["inputs"][0]["name"] \
            if protocol == "grpc" else client.get_model_metadata("textdir")["inputs"][0]["name"]
        digits = client.infer("digits", _inputs(module, "input", DIGITS))
        textdir = client.infer("textdir", _inputs(module, text_input, TEXT_LINES))
        assert np.allclose(digits.as_numpy("probabilities"), expected["digits"]["probabilities"], atol=1e-6)
        out = next(iter(expected["textdir"]))
        assert np.allclose(textdir.as_numpy(out), expected["textdir"][out], atol=1e-5)
        with pytest.raises(InferenceServerException, match="unknown model 'detector'; this server serves 'digits', 'textdir'"):
            client.infer("detector", _inputs(module, "input", DIGITS))
        with pytest.raises(InferenceServerException, match="input"):  # digits' input sent to the other model
            client.infer("textdir", _inputs(module, "input", DIGITS))
    finally:
        client.close()


def test_concurrent_clients_of_both_models_get_their_own_answers(server, expected):
    """Requests to the two models interleave on one server; none gets the other model's answer."""
    failures: list[str] = []

    def calls(model: str) -> None:
        client = triton_http.InferenceServerClient(server[0])
        name = "input" if model == "digits" else client.get_model_metadata("textdir")["inputs"][0]["name"]
        x = DIGITS if model == "digits" else TEXT_LINES
        out = "probabilities" if model == "digits" else next(iter(expected["textdir"]))
        try:
            for _ in range(15):
                got = client.infer(model, _inputs(triton_http, name, x)).as_numpy(out)
                if not np.allclose(got, expected[model][out], atol=1e-5):
                    failures.append(model)
        finally:
            client.close()

    threads = [threading.Thread(target=calls, args=(m,)) for m in ("digits", "textdir") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == [] and not any(t.is_alive() for t in threads)


def test_two_models_need_two_names(two_models):
    result = subprocess.run([FLEET_AGENT, "serve", str(two_models["digits"]), str(two_models["textdir"]),
                             "--name", "x"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--name takes one model" in result.stderr
