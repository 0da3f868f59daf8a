"""`docker-compose up` of `fedbus compose`'s digits file: healthy, crash-proof, resumable.

In `make test`: the digits job with 4 trainers x 6 rounds. `make deploy-check`
(``FEDBUS_DEPLOY_FULL=1``): the example's own size, 10 trainers x 20 rounds, whose final
accuracy is `fedbus run examples/digits/manifest.yaml`'s 0.9443.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.deploy.compose_check import (
    BRIDGED,
    Job,
    Reference,
    run_bridged_job,
    run_compose_job,
)
from tests.deploy.conftest import DeployImages
from tests.deploy.dockerd import Dockerd

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

FULL = os.environ.get("FEDBUS_DEPLOY_FULL") == "1"
JOB = Job() if FULL else Job(rounds=6, trainers=4, kill_trainer_after=1,
                             kill_aggregator_after=3, down_up_after=4, deadline_s=40)


@pytest.mark.timeout(900)
def test_docker_kill_is_a_manual_stop_a_crash_restarts(
    dockerd: Dockerd, images: DeployImages
) -> None:
    # Prepare: a container with the restart policy compose gives fedbus nodes
    cid = dockerd.out("run", "-d", "--restart", "on-failure", "--network", "host",
                      images.bases["python"], "sleep", "1000")
    try:
        # Execute: docker kill, then (started again) SIGKILL of its process from the host
        dockerd.docker("kill", cid, capture=True)
        time.sleep(5)  # give a restart policy time to act: nothing to wait on if it doesn't
        after_kill = dockerd.out("inspect", "-f", "{{.RestartCount}} {{.State.Status}}", cid)
        dockerd.docker("start", cid, capture=True)
        os.kill(int(dockerd.out("inspect", "-f", "{{.State.Pid}}", cid)), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after_crash = dockerd.out("inspect", "-f", "{{.RestartCount}} {{.State.Status}}",
                                      cid)
            if after_crash == "1 running":
                break
            time.sleep(0.5)  # polling the daemon
    finally:
        dockerd.docker("rm", "-f", cid, capture=True)
    # Assert: Docker takes `docker kill` for an operator's stop; a crash is restarted
    assert after_kill == "0 exited"
    assert after_crash == "1 running"


@pytest.mark.timeout(5400 if FULL else 1800)
def test_compose_digits_job_recovers_the_clean_runs_model(
    dockerd: Dockerd, images: DeployImages, workdir: Path
) -> None:
    # Execute: up; kill -9 a trainer mid-round and the aggregator; down and up; to the end
    with Reference(workdir, JOB) as ref:  # `fedbus run`, meanwhile, for the model to match
        res = run_compose_job(dockerd, workdir / "compose", JOB, images.bases,
                              images.torch_index)
        accuracy, reference = ref.result()
    summary = {
        "job": {"rounds": JOB.rounds, "trainers": JOB.trainers}, "accuracy": res.accuracy,
        "reference_accuracy": accuracy, "timings": res.timings, "events": res.events,
        "base_images_s": round(images.build_s), "date": time.strftime("%Y-%m-%d %H:%M"),
        "load": os.getloadavg(),
    }
    (workdir / "compose-result.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(res.events))
    # Assert: every service went healthy
    expected = {"mosquitto", "redis", "aggregator", "checkpointer",
                *(f"trainer-{i}" for i in range(JOB.trainers))}
    assert res.healthy == expected
    # the crashed trainer was restarted and delivered the round it was killed in
    assert res.trainer_lost_in_round == JOB.kill_trainer_after + 1
    assert res.trainer_restarts >= 1 and res.trainer_round_full
    # the crashed aggregator was restarted and went on from the checkpointer's last round
    assert res.aggregator_restarts >= 1
    assert res.restored_after_kill is not None and \
        res.restored_after_kill >= JOB.kill_aggregator_after
    # down + up resumed from the volumes, not from round 1
    assert res.restored_after_up is not None and res.restored_after_up >= JOB.down_up_after
    # Assert: every round ran, and the final model is the clean `fedbus run`'s, bit for bit
    assert set(res.rounds_seen) >= set(range(res.restored_after_up + 1, JOB.rounds + 1))
    assert res.accuracy == accuracy
    assert sorted(res.weights) == sorted(reference)
    assert all((res.weights[k] == reference[k]).all() for k in reference)
    if FULL:
        assert accuracy == 0.9443  # examples/digits/manifest.yaml's (README)


@pytest.mark.skipif(not FULL, reason="`make deploy-check` (FEDBUS_DEPLOY_FULL=1): 14 torch "
                                     "containers")
@pytest.mark.timeout(3600)
def test_compose_two_bridged_brokers_finish_the_job(
    dockerd: Dockerd, images: DeployImages, workdir: Path
) -> None:
    # Execute: the two-broker example on the host's network, 3 rounds; `fedbus run` beside
    with Reference(workdir / "bridged", Job(rounds=3), BRIDGED, {"FEDBUS_ROUNDS": "3"}) as ref:
        accuracy, services, site_conf = run_bridged_job(dockerd, workdir / "bridged",
                                                        images.bases, images.torch_index)
        expected, _ = ref.result()
    print(f"bridged compose: final accuracy={accuracy}, fedbus run: {expected}")
    # Assert: two broker services, the site's bridged to the root's, the job done as
    # `fedbus run` does it
    assert {"broker-root", "broker-site"} <= set(services)
    assert "connection fedbus.topo-bridged.bridge.site" in site_conf
    assert accuracy == expected
