"""The kill test: SIGKILL the agent at >= 50 random moments during updates.

After every kill the state on disk names a complete, verified slot; after every
restart the agent serves the old or the new model (never a partial one), and
the update completes. Kill moments are drawn over the update's measured
duration, so they land in download, verify, stage and activate.
"""
import hashlib
import random
import time

import numpy as np
import pytest

from edgefleet.agent.slots import Slots, model_dir
from edgefleet.common.protocol import Gate
from tests.conftest import free_port
from tests.support.fleet import AgentProcess, ModelRepo, Observer, agent_config, desired

KILLS = 50
GATE = Gate(bench_seconds=0.05, bench_min_queries=10, max_p99_regression=1000.0)  # the kills are the point here


def assert_serves_a_verified_slot(state_dir, signed_sha256: dict[str, str]) -> str:
    """The active slot is complete and its bytes are exactly what TUF signed; returns its version."""
    slots = Slots(model_dir(state_dir, "digits"))
    active = slots.active()
    assert active is not None, "the pointer names no complete slot"
    digest = hashlib.sha256(active.model.read_bytes()).hexdigest()
    assert digest == active.meta.model_sha256 == signed_sha256[active.meta.ref.version]
    assert active.golden.is_file()
    return active.meta.ref.version


@pytest.mark.slow
def test_sigkill_at_random_moments_during_updates(tmp_path, digits, mosquitto_url):
    rng = random.Random(20261126)
    repo = ModelRepo.create(tmp_path / "fleet", np.load(digits.eval_data)["input"], digits.model)
    infos = [repo.publish(digits.model, f"1.0.{i}") for i in range(2 * KILLS)]
    # every version publishes the digits bytes: what TUF signed is their digest
    signed = {i.version: hashlib.sha256(digits.model.read_bytes()).hexdigest() for i in infos}
    config = agent_config(tmp_path / "state", repo, mosquitto_url, f"127.0.0.1:{free_port()}")
    agent = AgentProcess(config, tmp_path)
    observer = Observer(mosquitto_url, config.device_id, repo.seal)
    landed: dict[str, int] = {}
    try:
        agent.start()
        agent.wait_live()
        # the first update, unharmed, measures how long one takes
        started = time.monotonic()
        observer.publish(desired(config.device_id, 1, infos[0], gate=GATE))
        assert observer.wait_terminal(1, 60)["state"] == "SUCCEEDED", agent.log()
        duration = time.monotonic() - started

        kills, generation = 0, 1  # kills counts only those that landed inside an update step
        while kills < KILLS:
            generation += 1
            old, new = infos[generation - 2].version, infos[generation - 1].version
            observer.publish(desired(config.device_id, generation, infos[generation - 1], gate=GATE))
            # one kill while the update runs, sometimes a second one while the restarted agent resumes it
            # the tail of the measured time is MQTT delivery of the last event: draw over the rest
            window = 0.75 * duration
            for delay in [rng.uniform(0, window)] + ([rng.uniform(0, window)] if rng.random() < 0.6 else []):
                time.sleep(delay)
                agent.kill()
                journal = Slots(model_dir(config.state_dir, "digits")).journal()
                step = journal.state.value if journal and journal.generation == generation else "before"
                landed[step] = landed.get(step, 0) + 1
                kills += not (step == "before" or journal.state.terminal)
                assert assert_serves_a_verified_slot(config.state_dir, signed) in (old, new)
                agent.start()
                agent.wait_live()
                assert agent.serving_version() in (old, new), agent.log()
            done = observer.wait_terminal(generation, 60)
            assert done["state"] == "SUCCEEDED", (done, agent.log())
            observer.wait(lambda: agent.serving_version() == new, 10, f"{new} to be served")  # noqa: B023 - waited on here
            assert assert_serves_a_verified_slot(config.state_dir, signed) == new
        # the kills landed inside the update's steps, not only around it
        assert kills >= KILLS
        assert landed.get("download", 0) and landed.get("activate", 0), landed
        slots = Slots(model_dir(config.state_dir, "digits"))
        leftovers = {p.name for p in slots.root.iterdir()} - {slots.pointer().active, slots.pointer().previous,
                                                             ".staging", "pointer.json"}
        assert leftovers == set() and list(slots.staging_root.glob("*")) == []
    finally:
        agent.stop()
        observer.close()
        repo.stop()
    print(f"kills by step: {landed}; update takes {duration:.2f}s")
