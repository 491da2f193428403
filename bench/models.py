"""Real models made offline and reproducibly, cached on disk.

Nothing here downloads weights: the digits classifier is trained with
scikit-learn on its bundled data, the ResNet-50-shaped graph gets seeded random
weights, and the broken/slow/wrong models are derived from those. Each cached
file name carries its generator's version, so changing a generator regenerates.

    python -m bench.models OUT_DIR     # write every model (and the digits data) to OUT_DIR
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Bump a version when its generator changes: cached files under the old name are ignored.
DIGITS_VERSION = "digits-v1"
RESNET50_VERSION = "resnet50-v2"
BROKEN_VERSION = "broken-v1"
SLOW_VERSION = "slow-digits-v1"
WRONG_VERSION = "wrong-digits-v1"

DIGITS_INPUT = "input"
DIGITS_SCORES = "probabilities"
RESNET_INPUT = "pixel_values"
RESNET_OUTPUT = "logits"
OPSET = 17
SEED = 20240611


@dataclass(frozen=True)
class DigitsFiles:
    model: Path             # float input [N,64] in [0,1]; outputs label [N] and probabilities [N,10]
    eval_data: Path         # held-out split: "input" float32 [N,64], "labels" int64 [N]
    calibration_data: Path  # from the training split: "input" float32 [N,64]


# --- cache and atomic writes ------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through ``write(tmp)`` then fsync and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _save_model(model: onnx.ModelProto, path: Path) -> Path:
    return _atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))


def _save_npz(arrays: dict[str, Any], path: Path) -> Path:  # Any: np.savez(**arrays) would take allow_pickle too
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return _atomic_write(path, write)


# --- digits -------------------------------------------------------------------


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)  # pixel counts 0..16 -> [0, 1]
    y = data.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def _train_digits(x_train: np.ndarray, y_train: np.ndarray) -> onnx.ModelProto:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0)
    clf.fit(x_train, y_train)
    model = to_onnx(
        clf,
        initial_types=[(DIGITS_INPUT, FloatTensorType([None, x_train.shape[1]]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 1},
    )
    model.graph.name = "digits"
    return model


def digits(cache: Path) -> DigitsFiles:
    cache = Path(cache)
    files = DigitsFiles(
        model=cache / f"{DIGITS_VERSION}.onnx",
        eval_data=cache / f"{DIGITS_VERSION}.eval.npz",
        calibration_data=cache / f"{DIGITS_VERSION}.calibration.npz",
    )
    if all(p.exists() for p in (files.model, files.eval_data, files.calibration_data)):
        return files
    x_train, x_test, y_train, y_test = _digits_split()
    pick = np.random.default_rng(SEED).choice(len(x_train), size=200, replace=False)
    _save_npz({DIGITS_INPUT: x_test, "labels": y_test}, files.eval_data)
    _save_npz({DIGITS_INPUT: x_train[np.sort(pick)]}, files.calibration_data)
    _save_model(_train_digits(x_train, y_train), files.model)
    return files


def _cached(path: Path, make: Callable[[], onnx.ModelProto]) -> Path:
    if not path.exists():
        _save_model(make(), path)
    return path


def wrong_digits(cache: Path) -> Path:
    """Same inputs and outputs as digits, but the classes are rotated by one."""

    def make() -> onnx.ModelProto:
        model = onnx.load(str(digits(cache).model))
        weight, bias = _last_layer(model.graph)
        for tensor in (weight, bias):
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.roll(array, 1, axis=-1), tensor.name))
        return model

    return _cached(Path(cache) / f"{WRONG_VERSION}.onnx", make)


def _last_layer(graph: onnx.GraphProto) -> tuple[onnx.TensorProto, onnx.TensorProto]:
    """The weight of the last MatMul and the bias Added right after it."""
    inits = {t.name: t for t in graph.initializer}
    matmul = [n for n in graph.node if n.op_type == "MatMul"][-1]
    add = next(n for n in graph.node if n.op_type == "Add" and matmul.output[0] in n.input)
    bias = next(name for name in add.input if name in inits)
    return inits[matmul.input[1]], inits[bias]


def slow_digits(cache: Path, steps: int = 48, width: int = 512) -> Path:
    """Same inputs and outputs as digits, >=10x slower per request.

    A chain of MatMul+Tanh fed by the input is multiplied by zero and added to
    the probabilities: the result is unchanged, and because the chain depends on
    the input no optimizer level can constant-fold it away.
    """

    def make() -> onnx.ModelProto:
        model = onnx.load(str(digits(cache).model))
        graph = model.graph
        rng = np.random.default_rng(SEED + 1)
        features = graph.input[0].type.tensor_type.shape.dim[1].dim_value
        graph.initializer.extend([
            numpy_helper.from_array(
                (rng.standard_normal((features, width)) / np.sqrt(features)).astype(np.float32), "slow_w_in"),
            numpy_helper.from_array(
                (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "slow_w"),
            numpy_helper.from_array(np.zeros((1, 1), np.float32), "slow_zero"),
            numpy_helper.from_array(np.array([1], np.int64), "slow_axes"),
        ])
        producer = next(n for n in graph.node if DIGITS_SCORES in n.output)
        producer.output[list(producer.output).index(DIGITS_SCORES)] = "fast_probabilities"
        nodes = [helper.make_node("MatMul", [graph.input[0].name, "slow_w_in"], ["slow_0"])]
        for i in range(steps):
            nodes.append(helper.make_node("MatMul", [f"slow_{i}", "slow_w"], [f"slow_mm_{i}"]))
            nodes.append(helper.make_node("Tanh", [f"slow_mm_{i}"], [f"slow_{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"slow_{steps}", "slow_axes"], ["slow_sum"], keepdims=1),
            helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
            helper.make_node("Add", ["fast_probabilities", "slow_nothing"], [DIGITS_SCORES]),
        ]
        graph.node.extend(nodes)
        return model

    return _cached(Path(cache) / f"{SLOW_VERSION}.onnx", make)


def broken(cache: Path) -> Path:
    """A valid ONNX protobuf that ONNX Runtime refuses to load (unknown operator)."""

    def make() -> onnx.ModelProto:
        x = helper.make_tensor_value_info(DIGITS_INPUT, TensorProto.FLOAT, ["N", 64])
        y = helper.make_tensor_value_info(DIGITS_SCORES, TensorProto.FLOAT, ["N", 10])
        node = helper.make_node("EdgefleetNoSuchOp", [DIGITS_INPUT], [DIGITS_SCORES])
        graph = helper.make_graph([node], "broken", [x], [y])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])

    return _cached(Path(cache) / f"{BROKEN_VERSION}.onnx", make)


# --- ResNet-50 ----------------------------------------------------------------


class _GraphBuilder:
    """Appends Conv/BN/ReLU nodes with seeded weights to one ONNX graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def _param(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        std = np.sqrt(2.0 / (cin * k * k))  # He init keeps ReLU activations at unit scale
        w = self._param(f"{name}.weight", self.rng.standard_normal((cout, cin, k, k)) * std)
        self.nodes.append(helper.make_node(
            "Conv", [x, w], [f"{name}.out"], name=name, kernel_shape=[k, k],
            strides=[stride, stride], pads=[k // 2] * 4,
        ))
        return f"{name}.out"

    def batchnorm(self, name: str, x: str, channels: int, gain: float = 1.0) -> str:
        """A BatchNorm with non-trivial statistics, left as its own node for the optimizer to fold."""
        r = self.rng
        params = [
            self._param(f"{name}.{p}", v) for p, v in (
                ("scale", gain * r.uniform(0.8, 1.2, channels)),
                ("bias", r.normal(0.0, 0.05, channels)),
                ("mean", r.normal(0.0, 0.05, channels)),
                ("var", r.uniform(0.8, 1.2, channels)),
            )
        ]
        self.nodes.append(helper.make_node(
            "BatchNormalization", [x, *params], [f"{name}.out"], name=name, epsilon=1e-5))
        return f"{name}.out"

    def relu(self, name: str, x: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    def conv_bn(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1,
                relu: bool = True, gain: float = 1.0) -> str:
        y = self.batchnorm(f"{name}.bn", self.conv(f"{name}.conv", x, cin, cout, k, stride), cout, gain)
        return self.relu(f"{name}.relu", y) if relu else y

    def bottleneck(self, name: str, x: str, cin: int, width: int, stride: int) -> str:
        cout = width * 4
        y = self.conv_bn(f"{name}.a", x, cin, width, 1)
        y = self.conv_bn(f"{name}.b", y, width, width, 3, stride)  # v1.5: stride on the 3x3
        # A small gain on the last BN keeps the residual sum from growing block after block.
        y = self.conv_bn(f"{name}.c", y, width, cout, 1, relu=False, gain=0.2)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.conv_bn(f"{name}.shortcut", x, cin, cout, 1, stride, relu=False)
        self.nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.sum"], name=f"{name}.add"))
        return self.relu(f"{name}.relu", f"{name}.sum")


# (bottleneck width, blocks, first stride) per stage, as in microsoft/resnet-50.
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def _build_resnet50(classes: int = 1000) -> onnx.ModelProto:
    b = _GraphBuilder(SEED)
    y = b.conv_bn("stem", RESNET_INPUT, 3, 64, 7, 2)
    b.nodes.append(helper.make_node(
        "MaxPool", [y], ["stem.pool"], name="stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    y, cin = "stem.pool", 64
    for s, (width, blocks, stride) in enumerate(RESNET50_STAGES):
        for i in range(blocks):
            y = b.bottleneck(f"stage{s + 1}.{i}", y, cin, width, stride if i == 0 else 1)
            cin = width * 4
    b.nodes.append(helper.make_node("GlobalAveragePool", [y], ["pool"], name="pool"))
    b.nodes.append(helper.make_node("Flatten", ["pool"], ["features"], name="flatten", axis=1))
    w = b._param("classifier.weight", b.rng.standard_normal((classes, cin)) / np.sqrt(cin))
    bias = b._param("classifier.bias", np.zeros(classes))
    b.nodes.append(helper.make_node(
        "Gemm", ["features", w, bias], [RESNET_OUTPUT], name="classifier", transB=1))
    graph = helper.make_graph(
        b.nodes, "resnet50",
        [helper.make_tensor_value_info(RESNET_INPUT, TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info(RESNET_OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgefleet-bench")
    model.ir_version = 8  # readable by every ORT the agent supports (>= 1.18)
    onnx.checker.check_model(model)
    _center_classifier(model, cin)
    return model


def _center_classifier(model: onnx.ModelProto, features: int) -> None:
    """Set the classifier bias so logits vary with the input.

    Post-ReLU features of a random network share a large common component that
    would make every image the same class; subtracting it (measured on seeded
    noise) gives top-1 agreement between variants a meaning.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    noise = np.random.default_rng(SEED + 2).standard_normal((8, 3, 224, 224)).astype(np.float32)
    mean = session.run(["features"], {RESNET_INPUT: noise})[0].mean(axis=0)
    inits = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(inits["classifier.weight"])
    inits["classifier.bias"].CopyFrom(
        numpy_helper.from_array((-(weight @ mean)).astype(np.float32), "classifier.bias"))


def resnet50(cache: Path) -> Path:
    """ResNet-50 v1.5 layer structure (stem, 3/4/6/3 bottlenecks, FC 1000), seeded weights.

    Input ``pixel_values`` float32 [batch,3,224,224]; output ``logits`` float32 [batch,1000].
    """
    return _cached(Path(cache) / f"{RESNET50_VERSION}.onnx", _build_resnet50)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.models OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    made = [*vars(digits(out)).values(), resnet50(out), broken(out), slow_digits(out), wrong_digits(out)]
    for path in made:
        print(f"{path}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
