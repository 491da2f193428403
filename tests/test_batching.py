"""Dynamic batching: concurrent requests share session runs and each gets exactly its own rows back."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgefleet.agent.batching import Batcher, BatchPolicy
from edgefleet.agent.errors import ModelError
from edgefleet.agent.runtime import ModelRuntime, RuntimeOptions


class SlowDouble:
    """A model stand-in that records every batch it runs and takes a moment, so requests queue behind it."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.batches.append(feed["x"].shape[0])
        time.sleep(0.02)
        if self.fail:
            raise ModelError("the model failed to run")
        return {"y": feed["x"] * 2, "scale": np.array(2.0)}


def in_parallel(call, args: list) -> list:
    results: list = [None] * len(args)

    def one(i: int) -> None:
        try:
            results[i] = call(args[i])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_queued_requests_run_together_and_get_their_own_rows():
    model = SlowDouble()
    batcher = Batcher(model, BatchPolicy(max_batch_size=8))
    feeds = [{"x": np.full((1 + i % 2, 3), float(i), np.float32)} for i in range(12)]
    results = in_parallel(batcher.infer, feeds)
    for feed, result in zip(feeds, results, strict=True):
        assert np.array_equal(result["y"], feed["x"] * 2) and result["scale"] == 2.0
    assert sum(model.batches) == sum(f["x"].shape[0] for f in feeds)
    assert max(model.batches) > 2 and all(rows <= 8 for rows in model.batches)  # batches formed, none too big


def test_shapes_that_do_not_stack_are_never_mixed_and_big_requests_run_alone():
    model = SlowDouble()
    batcher = Batcher(model, BatchPolicy(max_batch_size=4))
    feeds = [{"x": np.ones((1, 3 + i % 2), np.float32) * i} for i in range(8)] + [{"x": np.ones((5, 3), np.float32)}]
    results = in_parallel(batcher.infer, feeds)
    assert all(np.array_equal(r["y"], f["x"] * 2) for f, r in zip(feeds, results, strict=True))
    assert 5 in model.batches


def test_a_full_batch_runs_without_waiting_out_the_delay_and_a_failure_reaches_every_request():
    model = SlowDouble(fail=True)
    batcher = Batcher(model, BatchPolicy(max_batch_size=3, max_queue_delay_us=60_000_000))  # a minute
    results = in_parallel(batcher.infer, [{"x": np.ones((1, 2), np.float32)}] * 3)
    assert model.batches == [3]
    assert all(isinstance(r, ModelError) for r in results)


def test_policy_bounds():
    with pytest.raises(ValueError, match="at least 2"):
        BatchPolicy(max_batch_size=1)
    with pytest.raises(ValueError, match="0 or more"):
        BatchPolicy(max_batch_size=4, max_queue_delay_us=-1)


def test_runtime_batches_a_model_with_a_batch_dimension(digits):
    runtime = ModelRuntime(RuntimeOptions(batching=BatchPolicy(max_batch_size=8)))
    loaded = runtime.load(digits.model)
    assert loaded.batcher is not None
    runtime.swap(loaded)
    xs = [np.random.default_rng(i).random((1, 64), dtype=np.float32) for i in range(16)]
    results = in_parallel(lambda x: runtime.infer({"input": x})[0], xs)
    for x, result in zip(xs, results, strict=True):
        assert np.allclose(result["probabilities"], loaded.run({"input": x})["probabilities"], atol=1e-6)
    assert runtime.counters().requests == 16
    runtime.close()


def test_a_model_without_a_batch_dimension_is_served_unbatched_with_a_warning(tmp_path, caplog):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    runtime = ModelRuntime(RuntimeOptions(batching=BatchPolicy(max_batch_size=8)))
    loaded = runtime.load(path)
    assert loaded.batcher is None and "fixed.onnx has an input without a dynamic first" in caplog.text
    runtime.swap(loaded)
    x = np.ones((2, 3), np.float32)
    assert np.array_equal(runtime.infer({"x": x})[0]["y"], x)
    runtime.close()
