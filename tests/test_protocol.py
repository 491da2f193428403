"""The wire contract: every message round-trips JSON, and bad input is refused naming its field."""
from __future__ import annotations

import json
from typing import Any

import pytest

from edgefleet.common.errors import ProtocolError
from edgefleet.common.hardware import Requirements
from edgefleet.common.protocol import (
    Action,
    BenchmarkReport,
    Channel,
    Desired,
    DesiredSet,
    Event,
    ExecutionState,
    Gate,
    GateReport,
    GoldenCheck,
    Message,
    ModelRef,
    ModelStatus,
    Reported,
    SamplingPolicy,
    Status,
    TargetInfo,
    Telemetry,
    TelemetryKind,
    Window,
    decode,
    topic,
)
from edgefleet.common.record import decoder
from tests.support.messages import (
    benchmark_report,
    benchmark_result,
    heartbeat,
    model_counters,
)

REF = ModelRef(model="digits", version="1.0.0", variant="cpu-fp32", release=3)
GATE_REPORT = GateReport(
    p99_budget_ms=5.0, max_p99_regression=0.5, previous_p99_ms=1.0, paired=True,
    golden=GoldenCheck(passed=True, max_abs_diff=1e-6, atol=1e-4, rtol=1e-3, samples=16),
    benchmark=benchmark_result(1.2), p99_limit_ms=1.5,
)

MESSAGES: list[Message] = [
    Desired(device="d1", generation=4, action=Action.INSTALL, deployment="r1", model="digits", version="1.0.0",
            variant="cpu-fp32", target="digits/1.0.0/cpu-fp32.onnx",
            sampling=SamplingPolicy(enabled=True, rate=0.1, low_confidence_below=0.6),
            gate=Gate(p99_budget_ms=5.0), window=Window(cron="0 2 * * *", duration_s=3600)),
    Desired(device="d1", generation=5, action=Action.ROLLBACK, deployment="r1"),
    Desired(device="d1", generation=6, action=Action.NONE),
    Reported(device="d1", boot=2, seq=7, models=(
        ModelStatus(model="digits", generation=4, active=REF, previous=None, outcome=ExecutionState.SUCCEEDED,
                    memory_kb=2048),
        ModelStatus(model="ocr-cls", generation=7)),
             hardware={"arch": "x86_64", "cpu_features": ["avx2"]}, agent_version="0.1"),
    Event(device="d1", boot=2, seq=8, generation=4, state=ExecutionState.SUCCEEDED, deployment="r1",
          model="digits", version="1.0.0", variant="cpu-fp32", detail="swapped", gate=GATE_REPORT, ts=1.5),
    Event(device="d1", boot=2, seq=9, generation=4, state=ExecutionState.DOWNLOADING),
    Telemetry(device="d1", boot=2, seq=10, kind=TelemetryKind.HEARTBEAT, heartbeat=heartbeat(12.5)),
    Telemetry(device="d1", boot=2, seq=11, kind=TelemetryKind.BENCHMARK,
              benchmark=BenchmarkReport(model=REF, gate=GATE_REPORT)),
    Telemetry(device="d1", boot=2, seq=12, kind=TelemetryKind.COUNTERS, counters=model_counters(REF, 9, 1, 3.0)),
    Status(device="d1", boot=2, online=True, ts=3.0),
    DesiredSet(device="d1", generation=7, models=(
        Desired(device="d1", generation=4, action=Action.INSTALL, deployment="r1", model="digits", version="1.0.0",
                variant="cpu-fp32", target="digits/1.0.0/cpu-fp32.onnx"),
        Desired(device="d1", generation=7, action=Action.ROLLBACK, deployment="r2", model="ocr-cls"))),
    TargetInfo(model="digits", version="1.0.0", variant="cpu-fp32", release=3,
               requirements=Requirements(arch=("x86_64",), cpu_features=("avx2",), min_memory_mb=256),
               golden="digits/1.0.0/cpu-fp32.golden.npz", golden_sha256="ab" * 32,
               accuracy={"top1": 0.97, "agreement": 1.0}, p99_ms=0.4),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_json(message: Message) -> None:
    wire = message.to_json()
    assert type(message).from_json(wire) == message
    assert json.loads(wire)["v"] == 1


def test_enums_travel_as_their_values_and_come_back_as_members() -> None:
    event = json.loads(MESSAGES[4].to_json())
    assert event["state"] == "SUCCEEDED" and event["gate"]["benchmark"]["p99_ms"] == 1.2
    parsed = Event.from_json(MESSAGES[4].to_json())
    assert parsed.state is ExecutionState.SUCCEEDED
    assert Desired.from_json(MESSAGES[1].to_json()).action is Action.ROLLBACK
    assert Telemetry.from_json(MESSAGES[8].to_json()).kind is TelemetryKind.COUNTERS


def test_target_info_survives_canonical_json_and_reads_typed_fields() -> None:
    info = MESSAGES[-1]
    assert isinstance(info, TargetInfo)
    custom = info.to_custom()
    assert custom["edgefleet"]["accuracy"] == {"top1": "0.97", "agreement": "1.0"}  # TUF signs no floats
    parsed = TargetInfo.from_custom(json.loads(json.dumps(custom)))
    assert parsed == info and isinstance(parsed.requirements, Requirements)
    assert parsed.requirements.arch == ("x86_64",) and parsed.requirements.min_memory_mb == 256


def wire(message: Message, **changes: Any) -> dict[str, Any]:
    data = message.to_dict()
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = data
        for parent in parents:
            node = node[parent]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("message", "changes", "error"),
    [
        (MESSAGES[0], {"action": "reinstall"}, "Desired.action is 'reinstall'; use one of install, rollback, none"),
        (MESSAGES[4], {"state": "DONE"}, "Event.state is 'DONE'; use one of QUEUED"),
        (MESSAGES[6], {"kind": "log"}, "Telemetry.kind is 'log'; use one of heartbeat, benchmark, counters"),
        (MESSAGES[0], {"generation": True}, "Desired.generation must be an integer, got a boolean"),
        (MESSAGES[0], {"generation": 4.0}, "Desired.generation must be an integer, got a number"),
        (MESSAGES[0], {"gate": "fast"}, "Desired.gate: Gate must be a JSON object, got a string"),
        (MESSAGES[0], {"gate__bench_seconds": "1s"}, "Desired.gate: Gate.bench_seconds must be a number, got a string"),
        (MESSAGES[0], {"sampling__enabled": 1}, "SamplingPolicy.enabled must be true or false, got an integer"),
        (MESSAGES[4], {"gate__benchmark__queries": "many"}, "BenchmarkResult.queries must be an integer"),
        (MESSAGES[3], {"models": [{"model": "digits", "generation": 1, "active": {"model": None}}]},
         "Reported.models[0]: ModelStatus.active: ModelRef.model must be a string, got null"),
        (MESSAGES[3], {"models": [{"model": "digits", "generation": 1}] * 2}, "Reported names a model twice"),
        (MESSAGES[3], {"models": [{"model": "digits", "generation": 1, "outcome": "ACTIVATING"}]},
         "ModelStatus.outcome must be a terminal state"),
        (MESSAGES[-2], {"generation": 6}, "DesiredSet entry 'ocr-cls' has generation 7, above the set's 6"),
        (MESSAGES[-2], {"models": [MESSAGES[0].to_dict()] * 2}, "DesiredSet names model 'digits' twice"),
        (MESSAGES[-2], {"models": [MESSAGES[1].to_dict()]}, "every DesiredSet entry must name its model"),
        (MESSAGES[-2], {"models": [{**MESSAGES[0].to_dict(), "device": "d2"}]}, "DesiredSet for d1 has an entry for d2"),
        (MESSAGES[8], {"counters__latency_counts": [1, "2"]},
         "ModelCounters.latency_counts[1] must be an integer, got a string"),
        (MESSAGES[8], {"counters__latency_counts": 3}, "ModelCounters.latency_counts must be a list, got an integer"),
        (MESSAGES[-1], {"accuracy": {"top1": "high"}}, "TargetInfo.accuracy['top1'] must be a number, got a string"),
        (MESSAGES[-1], {"requirements__arch": "x86_64"}, "Requirements.arch must be a list, got a string"),
        (MESSAGES[3], {"hardware": ["x86_64"]}, "Reported.hardware must be an object, got a list"),
        (MESSAGES[0], {"priority": 1}, "Desired has unknown field(s) priority"),
        (MESSAGES[6], {"heartbeat__load": 1}, "Heartbeat has unknown field(s) load"),
        (MESSAGES[0], {"generation": DELETE}, "Desired.generation is required"),
        (MESSAGES[7], {"benchmark__gate": DELETE}, "BenchmarkReport.gate is required"),
        (MESSAGES[6], {"kind": "counters"}, "Telemetry.counters must carry the payload of kind 'counters'"),
        (MESSAGES[6], {"benchmark": benchmark_report(REF, 1.0).to_dict()}, "present: heartbeat, benchmark"),
        (MESSAGES[6], {"heartbeat": None}, "present: none"),
        (MESSAGES[0], {"v": 2}, "Desired has wire version 2; this side speaks 1"),
    ],
)
def test_bad_input_is_refused_naming_the_field(message: Message, changes: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtocolError) as e:
        type(message).from_dict(wire(message, **changes))
    assert error in str(e.value) and "\n" not in str(e.value)


def test_a_float_field_takes_an_integer_and_holds_a_float() -> None:
    gate = Gate.from_dict({"bench_seconds": 2, "p99_budget_ms": None})
    assert gate.bench_seconds == 2.0 and isinstance(gate.bench_seconds, float)


def test_integers_in_a_float_tuple_or_mapping_become_floats() -> None:
    data = wire(MESSAGES[8], counters__latency_buckets_ms=[1, 2.5], counters__latency_counts=[1, 2, 3])
    counters = Telemetry.from_dict(data).counters
    assert counters is not None
    assert counters.latency_buckets_ms == (1.0, 2.5) and all(type(b) is float for b in counters.latency_buckets_ms)
    assert counters.latency_counts == (1, 2, 3) and isinstance(counters.latency_counts, tuple)
    accuracy = TargetInfo.from_dict(wire(MESSAGES[-1], accuracy={"top1": 1})).accuracy
    assert accuracy == {"top1": 1.0} and type(accuracy["top1"]) is float


def test_decode_checks_the_device_against_the_topic_and_types_the_payload() -> None:
    message = MESSAGES[8]
    device, channel, parsed = decode(topic("d1", Channel.TELEMETRY), message.to_json())
    assert (device, channel) == ("d1", Channel.TELEMETRY)
    assert isinstance(parsed, Telemetry) and parsed.payload == model_counters(REF, 9, 1, 3.0)
    with pytest.raises(ProtocolError, match="names device 'd1'"):
        decode(topic("d2", Channel.TELEMETRY), message.to_json())


def test_a_field_type_the_decoder_does_not_know_is_a_schema_bug_not_bad_input() -> None:
    with pytest.raises(TypeError, match=r"only X \| None"):
        decoder(int | str)
    with pytest.raises(TypeError, match="not a type a Record can decode"):
        decoder(set[int])
