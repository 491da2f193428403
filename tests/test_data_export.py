"""fleetctl data export / stats through the real API, from the local store and from S3
(moto's S3 server over HTTP); shards are written by the agent's own sample encoder."""
from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from datetime import timedelta

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.agent.sampler import SampleMeta, encode_sample
from edgefleet.common.errors import GoldenFormatError
from edgefleet.common.golden import read_npz
from edgefleet.controller.cli import main
from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.dataset import SampleRecord, decode_shard, export
from edgefleet.controller.db.models import Sample, utcnow
from edgefleet.controller.errors import InvalidInput
from edgefleet.controller.store import open_store
from tests.rollout_fleet import seed
from tests.support.api_server import running_controller
from tests.test_store_s3 import make_bucket, s3_config, s3_endpoint  # noqa: F401  (fixture)

RNG = np.random.default_rng(7)


def npz_declaring(shape: tuple[int, ...]) -> bytes:
    """An .npz whose one member's .npy header declares ``shape`` of float64 and holds 64 bytes."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": shape})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("output/p.npy", member.getvalue() + b"\0" * 64)
    return out.getvalue()


def shard(device: str, version: str, confident: bool, rows: int = 3) -> bytes:
    inputs = {"x": RNG.random((rows, 64), dtype=np.float32)}
    logits = RNG.random((rows, 10))
    logits[:, 3 if confident else 5] += 20 if confident else 0.2
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    reason = "rate" if confident else "low_confidence"
    meta = SampleMeta("digits", version, "cpu-fp32", device, 0.0, reason, float(probabilities.max(axis=1).min()), 0.0)
    return encode_sample(inputs, {"probabilities": probabilities}, meta)


def add_samples(api) -> None:
    now = utcnow()
    plan = [("x1", "x86_64", "1.1.0", True), ("x2", "x86_64", "1.1.0", False), ("p1", "rpi-4", "1.1.0", True),
            ("p2", "rpi-4", "1.0.0", True)]
    with api.db.unit_of_work() as session:
        for i, (device, cls, version, confident) in enumerate(plan):
            data = shard(device, version, confident)
            key = f"samples/digits/{version}/{device}/{i}.npz"
            api.store.put_bytes(key, data)
            session.add(Sample(device_id=device, hardware_class=cls, model="digits", version=version,
                               variant="cpu-fp32", store_key=key, count=3, bytes=len(data),
                               ts=now - timedelta(hours=i)))


@pytest.fixture(params=["local", "s3"])
def api(request, tmp_path):
    store = None
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        config = ControllerConfig(home=tmp_path, store=s3_config(endpoint, make_bucket(endpoint)))
        store = open_store(config)
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}", store=store) as running:
        seed(running.db)
        add_samples(running)
        yield running


def fleetctl(api, *args: str):
    result = CliRunner().invoke(main, [*args, "--controller", api.url, "--token", api.token])
    assert result.exit_code == 0, result.output
    return result.output


def test_export_writes_npz_shards_and_index(api, tmp_path):
    out = tmp_path / "dataset"
    assert "wrote 9 row(s) from 3 sample shard(s)" in fleetctl(
        api, "data", "export", "--model", "digits", "--version", "1.1.0", "-o", str(out))
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 9 and {e["device"] for e in index} == {"x1", "x2", "p1"}
    assert {e["hardware_class"] for e in index} == {"x86_64", "rpi-4"}
    with np.load(out / index[0]["shard"], allow_pickle=False) as npz:
        assert npz["input/x"].shape == (9, 64) and npz["output/probabilities"].shape == (9, 10)
        first = npz["output/probabilities"][index[0]["row"]]
    assert index[0]["predicted"] == int(first.argmax()) and index[0]["top1"] == pytest.approx(float(first.max()))
    confident = [e for e in index if e["device"] != "x2"]
    assert all(e["predicted"] == 3 and e["top1"] > 0.99 for e in confident)


def test_export_low_confidence_only(api, tmp_path):
    out = tmp_path / "low"
    fleetctl(api, "data", "export", "--model", "digits", "--low-confidence", "-o", str(out))
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 3 and {e["device"] for e in index} == {"x2"}
    assert all(e["low_confidence"] and e["reason"] == "low_confidence" for e in index)


def test_export_of_an_unknown_model_fails_in_one_line(api, tmp_path):
    result = CliRunner().invoke(main, ["data", "export", "--model", "digts", "-o", str(tmp_path / "typo"),
                                       "--controller", api.url, "--token", api.token])
    assert result.exit_code == 1
    assert result.output == "error: model 'digts' is not published: see `fleetctl models list`\n"
    assert not (tmp_path / "typo").exists()


def test_stats_by_version_and_class(api):
    data = json.loads(fleetctl(api, "data", "stats", "--model", "digits", "--format", "json"))
    groups = {(g["version"], g["hardware_class"]): g for g in data["groups"]}
    assert set(groups) == {("1.0.0", "rpi-4"), ("1.1.0", "rpi-4"), ("1.1.0", "x86_64")}
    x86 = groups[("1.1.0", "x86_64")]
    assert x86["samples"] == 6 and x86["low_confidence"] == 3
    assert sum(x86["confidence_histogram"]) == 6 and x86["confidence_histogram"][-1] == 3
    assert x86["class_histogram"]["3"] == 3
    table = fleetctl(api, "data", "stats", "--model", "digits")
    assert "x86_64" in table and "3:" in table and "read 4 of 4 shard(s)" in table


def test_stats_hold_one_shard_at_a_time(tmp_path):
    """10 shards of ~4 MB of inputs each: the stats endpoint's peak memory is about one shard, not ten."""
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}") as api:
        seed(api.db)
        with api.db.unit_of_work() as session:
            for i in range(10):
                meta = SampleMeta("big", "1.0.0", "cpu-fp32", "x1", 0.0, "rate", 0.9, 0.0)
                data = encode_sample({"x": RNG.random((16, 65536), dtype=np.float32)},
                                     {"probabilities": np.full((16, 2), 0.5, np.float32)}, meta)
                api.store.put_bytes(f"samples/big/{i}.npz", data)
                session.add(Sample(device_id="x1", hardware_class="x86_64", model="big", version="1.0.0",
                                   variant="cpu-fp32", store_key=f"samples/big/{i}.npz", count=16,
                                   bytes=len(data), ts=utcnow()))
        tracemalloc.start()
        try:
            with api.client() as client:
                answer = client.get("/v1/data/stats", params={"model": "big"}).json()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert answer["shards_read"] == 10 and answer["groups"][0]["samples"] == 160
    assert peak < 24 << 20, f"peak {peak >> 20} MiB"  # all ten decoded at once: over 40 MiB


def test_untrusted_shards_are_refused(tmp_path):
    with pytest.raises(InvalidInput, match="not a readable npz"):
        decode_shard(b"PK\x03\x04 not really a zip")
    with pytest.raises(InvalidInput, match="above the 100-byte limit"):
        decode_shard(shard("x1", "1.1.0", True), max_bytes=100)
    for shape in [(2**40,), (2**62, 4), (2**40, 0)]:  # numpy would allocate the declared shape first
        with pytest.raises(InvalidInput, match=r"declares shape \("):
            decode_shard(npz_declaring(shape))
        (tmp_path / "hostile.npz").write_bytes(npz_declaring(shape))
        with pytest.raises(GoldenFormatError, match=r"hostile.npz: member output/p.npy declares shape \("):
            read_npz(tmp_path / "hostile.npz", 1 << 20)
    bad = SampleRecord(1, "k", "x1", "digits", "1.1.0", "cpu-fp32")
    result = export([bad], lambda _r: b"garbage", tmp_path / "out")
    assert result.rows == 0 and result.skipped and (tmp_path / "out" / "index.jsonl").read_text() == ""


def test_quantized_softmax_still_counts_as_probabilities():
    """int8 models dequantize their softmax to values like 1.0039 and rows summing to ~0.996."""
    from edgefleet.controller.dataset import predictions

    scores = np.array([[0.0, 1.0039216, 0.0], [0.2470588, 0.7490196, 0.0]], dtype=np.float32)
    top1, predicted = predictions({"output/probabilities": scores}, 2)
    assert top1 is not None and list(predicted) == [1, 1]
    assert top1.max() <= 1.0 and top1[1] == pytest.approx(0.749, abs=1e-3)
    logits = np.array([[3.0, -1.0, 0.5]], dtype=np.float32)
    assert predictions({"output/logits": logits}, 1)[0] is None, "logits are not probabilities"
