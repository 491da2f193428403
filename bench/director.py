"""Benchmark 7, signed desired states: what the director role costs per desired state, in one run.

A fresh fleet home (``fleetctl init``: ed25519 keys, the director delegated in targets):

- sign: the controller's ``DirectorSigner.seal`` (one stat of HOME/keys, DSSE envelope, ed25519);
- verify: the agent's ``DirectorTrust.admit`` (envelope parse, python-tuf's delegation check of the
  signature, the DesiredSet decoded, device and generation checked);
- admit: the agent's ``Director.admit`` as the daemon calls it (verify, plus the stat of the cached
  targets.json and the fsynced write of the accepted envelope, which is the generation floor);
- trust load: ``DirectorTrust.from_metadata`` (targets checked against the root), paid when
  targets.json changes, not per desired state.

    python -m bench.director --repeat 2000
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench._common import table
from edgefleet.agent.director import Director
from edgefleet.agent.trust import DirectorTrust
from edgefleet.common import director
from edgefleet.common.protocol import Desired, DesiredSet, Gate, SamplingPolicy
from edgefleet.controller.director import DirectorSigner
from edgefleet.controller.home import init_home
from edgefleet.controller.signing import METADATA_PREFIX, Repository

DEVICE = "bench-device-0001"


def command(generation: int) -> DesiredSet:
    """A realistic install: model, variant, target, gate and sampling policy (one model's entry)."""
    install = Desired(device=DEVICE, generation=generation, deployment="rollout-20260101-abcdef",
                      model="digits", version="1.4.2", variant="cpu-int8", target="digits/1.4.2/cpu-int8.onnx",
                      sampling=SamplingPolicy(enabled=True, rate=0.01, low_confidence_below=0.6),
                      gate=Gate(p99_budget_ms=12.5, max_p99_regression=0.3))
    return DesiredSet(device=DEVICE, generation=generation, models=(install,))


def median_us(run: Callable[[int], object], repeat: int) -> float:
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


class _NoRefresh:
    def refresh(self) -> None:
        raise AssertionError("the benchmark's metadata is in place: no refresh")


@dataclass(frozen=True)
class Measured:
    steps: list[tuple[str, str, float]]  # (step, where, median µs)
    plain_bytes: int                     # a desired state unsigned
    signed_bytes: int                    # and in its envelope


def measure(repeat: int) -> Measured:
    """Each step above, on a fresh fleet home."""
    work = Path(tempfile.mkdtemp(prefix="bench-director-"))
    try:
        config = init_home(work / "home")
        repository = Repository.from_config(config)
        signer = DirectorSigner(repository)
        metadata = config.store_path / METADATA_PREFIX
        root, targets, timestamp = ((metadata / name).read_bytes()
                                    for name in ("root.json", "1.targets.json", "timestamp.json"))
        state = work / "device"
        (state / "tuf").mkdir(parents=True)
        (state / "tuf/root.json").write_bytes(root)  # as the updater's verified cache holds them
        (state / "tuf/targets.json").write_bytes(targets)
        (state / "tuf/timestamp.json").write_bytes(timestamp)

        sealed = [signer.seal(command(g)) for g in range(1, repeat + 1)]
        sign_us = median_us(lambda i: signer.seal(command(i + 1)), repeat)
        trust = DirectorTrust.from_metadata(root, targets, timestamp)
        verify_us = median_us(lambda i: trust.admit(director.open_envelope(sealed[i]), DEVICE, None), repeat)
        agent = Director(state, DEVICE, _NoRefresh())
        admit_us = median_us(lambda i: agent.admit(sealed[i], time.monotonic()), repeat)
        load_us = median_us(lambda i: DirectorTrust.from_metadata(root, targets, timestamp), max(50, repeat // 20))
        return Measured([
            ("sign (DirectorSigner.seal)", "controller", sign_us),
            ("verify (DirectorTrust.admit)", "agent", verify_us),
            ("admit (verify + fsynced generation floor)", "agent", admit_us),
            ("trust load (on a targets or timestamp change)", "agent", load_us),
        ], len(command(1).to_json()), len(sealed[0]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    measured = measure(args.repeat)
    print(f"### Signed desired states (median of {args.repeat}; ed25519, DSSE envelope)\n")
    print(table(["step", "where", "median µs"], measured.steps))
    plain, signed = measured.plain_bytes, measured.signed_bytes
    print(f"\ndesired state: {plain} bytes unsigned, {signed} bytes signed (+{signed - plain})")


if __name__ == "__main__":
    main()
