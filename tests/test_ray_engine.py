"""common_args.engine: ray: every method's per-client metrics equal the local engine's, resume crosses engines, a
worker killed mid-round (SIGKILL) is retried or its clients left out, and Ray keeps its files out of the home folder.

The tests share one local Ray of 2 CPUs (a capped object store, its session folder in a temporary folder), started
and stopped here; each run starts 2 workers in it. Ray is a test dependency (the dev extra installs it): without it
these tests fail, they do not skip.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import MATRIX, own_ray_processes, small_recipe, three_clients

from fedml_pfedseq.config import RayArgs, RecipeError
from fedml_pfedseq.ray_engine import RayEngineError, RaySession
from fedml_pfedseq.round_close import RoundError
from fedml_pfedseq.simulation import run_recipe
from fedml_pfedseq.strategies import METHODS

RAY = {"num_workers": 2, "worker_timeout": 300.0}


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of 2 CPUs on this machine for the module's runs (they find it running and leave it so)."""
    with RaySession(RayArgs(object_store_mib=200), cpus=2) as session:
        yield session


def federation(method: str, tiny_vit, tmp_path, engine: str, **sections):
    """``method``'s matrix recipe (conftest.py: two of three clients per round, so a client moves between the two
    workers across rounds) on ``engine``, checkpoints off unless ``sections`` turn them on."""
    merged = {"common_args": {"checkpoint": False, "engine": engine}, "ray_args": dict(RAY), **MATRIX}
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    return three_clients(method, tiny_vit, tmp_path, **merged)


def run(recipe, out) -> dict:
    run_recipe(recipe, out, progress=False)
    return json.loads((out / "metrics.json").read_text())


def assert_same_rows(ray_rows: list[dict], local_rows: list[dict]) -> None:
    """The cross-silo tests' tolerance: the same accuracies, losses within a relative 1e-6."""
    assert [(r["round"], r["client"]) for r in ray_rows] == [(r["round"], r["client"]) for r in local_rows]
    for a, b in zip(ray_rows, local_rows):
        assert a["test_accuracy"] == b["test_accuracy"] and a["validation_accuracy"] == b["validation_accuracy"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_ray_gives_the_local_engines_per_client_metrics(method, tiny_vit, tmp_path, local_ray,
                                                                       matrix_reference):
    on_ray = run(federation(method, tiny_vit, tmp_path, "ray"), tmp_path / "ray")
    local = json.loads((matrix_reference(method)[1] / "metrics.json").read_text())
    assert_same_rows(on_ray["eval"], local["eval"])
    assert [(r["round"], r["client"]) for r in on_ray["train"]] == [(r["round"], r["client"]) for r in local["train"]]
    assert [(r["aggregated"], r["left_out"]) for r in on_ray["server"]] == [(2, "")] * 3


@pytest.mark.parametrize("first,then", [("local", "ray"), ("ray", "local")])
@pytest.mark.slow
def test_a_run_resumes_from_its_checkpoint_on_the_other_engine(first, then, tiny_vit, tmp_path, local_ray,
                                                               matrix_reference):
    """Ditto keeps a personal model on each client: it must come back from the checkpoint to whichever engine."""
    whole = json.loads((matrix_reference("ditto")[1] / "metrics.json").read_text())
    started = federation("Ditto", tiny_vit, tmp_path, first, common_args={"checkpoint": True},
                         train_args={"comm_round": 1})
    run_recipe(started, tmp_path / "run", progress=False)
    resumed = federation("Ditto", tiny_vit, tmp_path, then, common_args={"checkpoint": True})
    run_recipe(resumed, tmp_path / "run", progress=False, resume=True)
    assert_same_rows(json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"], whole["eval"])


class KillFirstVisit(threading.Thread):
    """Kills (SIGKILL) the first of its Ray worker processes seen training a client (ray::ClientWorker.visit)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for process in own_ray_processes("ray::ClientWorker.visit"):
                os.kill(process.pid, signal.SIGKILL)
                self.killed = process.pid
                return
            time.sleep(0.02)


def run_with_a_kill(recipe, out) -> tuple[dict | None, int | None, BaseException | None]:
    killer = KillFirstVisit()
    killer.start()
    try:
        return run(recipe, out), killer.killed, None
    except Exception as err:  # noqa: BLE001 - returned for the test to assert on
        return None, killer.killed, err
    finally:
        killer.stop.set()
        killer.join()


@pytest.mark.slow
def test_a_worker_killed_mid_round_is_restarted_and_its_client_retried_with_the_same_results(tiny_vit, tmp_path,
                                                                                            local_ray,
                                                                                            matrix_reference):
    local = json.loads((matrix_reference("fedrep")[1] / "metrics.json").read_text())
    on_ray, killed, error = run_with_a_kill(federation("FedRep", tiny_vit, tmp_path, "ray",
                                                       ray_args={"worker_retries": 1}), tmp_path / "ray")
    assert error is None and killed is not None and not psutil.pid_exists(killed)
    assert_same_rows(on_ray["eval"], local["eval"])
    assert all(r["left_out"] == "" for r in on_ray["server"])


@pytest.mark.slow
def test_without_retries_a_killed_workers_clients_are_left_out_of_that_round_only(tiny_vit, tmp_path, local_ray,
                                                                                 matrix_reference):
    local = json.loads((matrix_reference("fedrep")[1] / "metrics.json").read_text())
    on_ray, killed, error = run_with_a_kill(federation("FedRep", tiny_vit, tmp_path, "ray",
                                                       ray_args={"worker_retries": 0}), tmp_path / "ray")
    assert error is None and killed is not None
    first, *later = on_ray["server"]
    lost = [part for part in first["left_out"].split("; ") if part]
    assert lost and all("lost: its Ray worker died" in part for part in lost)
    assert first["aggregated"] == 2 - len(lost)  # one worker's client(s) gone, the other's aggregated
    assert all(r["left_out"] == "" and r["aggregated"] == 2 for r in later)  # the worker was restarted
    trained_in_1 = {r["client"] for r in on_ray["train"] if r["round"] == 1}
    assert len(trained_in_1) == 2 - len(lost)  # the documented loss: the lost clients' rows of round 1
    assert_same_rows([r for r in on_ray["eval"] if r["round"] == 0],
                     [r for r in local["eval"] if r["round"] == 0 and r["client"] in trained_in_1])


@pytest.mark.slow
def test_a_kill_that_leaves_too_few_uploads_stops_the_run_with_round_error(tiny_vit, tmp_path, local_ray):
    recipe = federation("FedRep", tiny_vit, tmp_path, "ray", ray_args={"worker_retries": 0},
                        train_args={"min_uploads_per_round": 2})
    started = time.monotonic()
    _, killed, error = run_with_a_kill(recipe, tmp_path / "ray")
    assert killed is not None and isinstance(error, RoundError) and "lost: its Ray worker died" in str(error)
    assert time.monotonic() - started < 240  # a clear error, not a hang


def test_more_workers_than_this_ray_can_hold_is_refused_not_waited_for(tiny_vit, tmp_path, local_ray):
    with pytest.raises(RayEngineError, match=r"3 worker\(s\).*only 2 CPU"):
        run_recipe(federation("FedAvg", tiny_vit, tmp_path, "ray", ray_args={"num_workers": 3}), tmp_path / "r",
                   progress=False)
    assert not (tmp_path / "r").exists()  # refused before the output folder is written


def test_an_unknown_engine_and_bad_ray_args_are_refused_naming_the_key(tiny_vit, tmp_path):
    with pytest.raises(RecipeError, match="common_args.engine must be one of"):
        small_recipe("FedAvg", tiny_vit, tmp_path, common_args={"engine": "dask"})
    with pytest.raises(RecipeError, match="unknown key 'workers'"):
        small_recipe("FedAvg", tiny_vit, tmp_path, ray_args={"workers": 2})
    with pytest.raises(RecipeError, match="ray_args.threads_per_worker must be >= 1"):
        small_recipe("FedAvg", tiny_vit, tmp_path, ray_args={"threads_per_worker": 0})
    with pytest.raises(RecipeError, match="hub_args.hub_push_every needs common_args.engine: local"):
        small_recipe("FedAvg", tiny_vit, tmp_path, common_args={"engine": "ray"},
                     hub_args={"push_to_hub": True, "hub_repo_id": "me/x", "hub_push_every": 1})


def test_without_ray_the_engine_names_the_extra_to_install(tiny_vit, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RayEngineError, match=r"pip install '\.\[ray\]'"):
        run_recipe(federation("FedAvg", tiny_vit, tmp_path, "ray"), tmp_path / "r", progress=False)


PROBE = """
import sys
from pathlib import Path
from fedml_pfedseq.config import RayArgs
from fedml_pfedseq.ray_engine import RaySession
with RaySession(RayArgs(object_store_mib=100), cpus=1) as session:
    print(session.temp_dir, (session.temp_dir / "auth_token").is_file(), flush=True)
"""


@pytest.mark.slow
def test_a_local_ray_keeps_its_session_and_token_in_a_temporary_folder_it_removes(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                            env={**env, "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    temp_dir, token = result.stdout.split()
    assert token == "True" and not os.path.exists(temp_dir)
    assert not (home / ".ray").exists()


TWICE = """
import ray
from fedml_pfedseq.config import RayArgs
from fedml_pfedseq.ray_engine import RaySession
for _ in range(2):
    with RaySession(RayArgs(object_store_mib=100), cpus=1):
        print(ray.get(ray.remote(lambda: 1).remote()), flush=True)
"""


@pytest.mark.slow
def test_one_process_starts_a_local_ray_a_second_time(tmp_path):
    """Ray's driver keeps the first token it read: a second local Ray (a test module after another, a grid after a
    run) must get the same one, or the driver is refused (InvalidAuthToken)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run([sys.executable, "-c", TWICE], capture_output=True, text=True, timeout=600,
                            env={**env, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "1"]


def test_a_local_ray_that_fails_to_start_leaves_no_folder_and_no_token_behind(monkeypatch):
    class FailingRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            raise RuntimeError("raylet did not start")

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)
    session = RaySession(RayArgs())
    session.ray = FailingRay()
    with pytest.raises(RuntimeError, match="raylet did not start"):
        session.__enter__()
    assert session.temp_dir is not None and not session.temp_dir.exists()
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_gcs_server_port_wait_time_s" not in os.environ
