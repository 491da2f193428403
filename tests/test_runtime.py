"""ModelRuntime: loading, input validation, hot-swap under load, resource-preserving swap."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from edgefleet.agent.errors import GateError, ModelError, RequestError
from edgefleet.agent.runtime import ModelRuntime, RuntimeOptions
from edgefleet.common.protocol import ModelRef

X = np.random.default_rng(0).random((1, 64), dtype=np.float32)


def ref(version: str) -> ModelRef:
    return ModelRef(model="digits", version=version, variant="cpu-fp32")


class Load:
    """Client threads sending requests back to back until stopped; records every outcome."""

    def __init__(self, runtime: ModelRuntime, clients: int = 3) -> None:
        self.runtime = runtime
        self.stop = threading.Event()
        self.served: list[str] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                outputs, loaded = self.runtime.infer({"input": X})
                assert outputs["probabilities"].shape == (1, 10)
                with self.lock:
                    self.served.append(loaded.version)
            except BaseException as e:  # noqa: BLE001 - the test counts every failure
                with self.lock:
                    self.errors.append(e)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_load_reads_metadata_and_infers(digits):
    runtime = ModelRuntime(RuntimeOptions(intra_op_threads=1, allow_spinning=False))
    loaded = runtime.load(digits.model, ref("1"))
    assert [s.to_dict() for s in loaded.inputs] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {s.name for s in loaded.outputs} == {"label", "probabilities"}
    assert loaded.provider == "CPUExecutionProvider"
    runtime.swap(loaded)
    outputs, used = runtime.infer({"input": np.repeat(X, 5, axis=0)})  # a dynamic batch dimension
    assert used is loaded
    assert outputs["probabilities"].shape == (5, 10)
    assert np.allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-4)
    counters = runtime.counters()
    assert counters.requests == 1 and counters.failures == 0 and sum(counters.latency_counts) == 1


def test_broken_model_raises_one_line_model_error(broken_model):
    with pytest.raises(ModelError) as e:
        ModelRuntime().load(broken_model)
    assert broken_model.name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"input": X, "extra": X}, "unknown input(s) extra"),
        ({}, "missing input(s) input"),
        ({"input": X.astype(np.float64)}, "datatype FP64; the model expects FP32"),
        ({"input": X[:, :10]}, "shape [1, 10]"),
        ({"input": X[0]}, "shape [64]"),
    ],
)
def test_bad_inputs_raise_request_error(digits, inputs, message):
    runtime = ModelRuntime()
    runtime.swap(runtime.load(digits.model))
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        runtime.infer(inputs)
    assert runtime.counters().rejected == 1


def test_infer_without_a_model_is_refused():
    with pytest.raises(ModelError, match="no model is loaded"):
        ModelRuntime().infer({"input": X})


def test_swap_under_load_fails_no_request_and_releases_every_old_session(digits):
    runtime = ModelRuntime()
    runtime.swap(runtime.load(digits.model, ref("0")))
    retired = []
    with Load(runtime) as load:
        for i in range(1, 21):
            retired.append(runtime.swap(runtime.load(digits.model, ref(str(i)))))
    assert load.errors == []
    assert len(load.served) > 20
    assert all(old.wait_released(5) for old in retired)
    assert all(old.session is None for old in retired)
    assert runtime.active.version == "20" and not runtime.active.released
    assert {int(v) for v in load.served} <= set(range(21))


def test_in_flight_request_finishes_on_its_session_and_new_requests_use_the_new_one(digits, slow_model):
    runtime = ModelRuntime()
    old = runtime.load(slow_model, ref("1"))
    runtime.swap(old)
    new = runtime.load(digits.model, ref("2"))
    with runtime.pinned() as pinned:
        assert pinned is old
        assert runtime.swap(new) is old
        assert not old.released  # still in flight
        _, used = runtime.infer({"input": X})
        assert used is new
        assert pinned.run({"input": X})["probabilities"].shape == (1, 10)  # the old session still answers
    assert old.released and old.session is None
    assert not new.released


def test_retire_without_requests_releases_at_once(digits):
    loaded = ModelRuntime().load(digits.model)
    loaded.retire()
    assert loaded.released
    with pytest.raises(ModelError, match="released"):
        loaded.run({"input": X})


def test_replace_with_failing_check_keeps_the_old_model(digits, wrong_model):
    runtime = ModelRuntime()
    runtime.swap(runtime.load(digits.model, ref("1")))
    candidates = []

    def refuse(loaded):
        candidates.append(loaded)
        raise GateError("golden set failed")

    with pytest.raises(GateError):
        runtime.replace(wrong_model, ref("2"), check=refuse)
    assert runtime.active.version == "1"
    assert candidates[0].released


def test_replace_loads_beside_when_memory_allows(digits):
    runtime = ModelRuntime(free_memory=lambda: 1 << 40)
    runtime.swap(runtime.load(digits.model, ref("1")))
    outcome = runtime.replace(digits.model, ref("2"))
    assert outcome.preserved is False and outcome.previous == ref("1")
    assert runtime.active is outcome.loaded


def test_preserving_swap_when_memory_is_short_drains_first_and_drops_no_request(digits):
    runtime = ModelRuntime(free_memory=lambda: 0)
    old = runtime.load(digits.model, ref("1"))
    runtime.swap(old)
    seen_old_released = []

    def check(new):
        seen_old_released.append(old.released)  # the old session is gone before the new one serves

    with Load(runtime) as load:
        threading.Event().wait(0.05)
        outcome = runtime.replace(digits.model, ref("2"), check=check)
        threading.Event().wait(0.05)
    assert outcome.preserved is True and outcome.previous == ref("1")
    assert seen_old_released == [True]
    assert load.errors == []
    assert "1" in load.served and "2" in load.served


def test_preserving_swap_with_failing_check_restores_the_old_model(digits, wrong_model):
    runtime = ModelRuntime(free_memory=lambda: 0)
    runtime.swap(runtime.load(digits.model, ref("1")))

    def refuse(loaded):
        raise GateError("golden set failed")

    with Load(runtime) as load, pytest.raises(GateError):
        runtime.replace(wrong_model, ref("2"), check=refuse)
    assert load.errors == []
    assert runtime.active.ref == ref("1") and set(load.served) == {"1"}
