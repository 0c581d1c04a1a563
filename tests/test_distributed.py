"""Distributed runs as users launch them: real torchrun subprocesses with gloo on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.run
from engine.checkpoint import load_checkpoint
from tests.helpers import (CHECKPOINT_EVERY, QUICK, RESUMABLE, ROOT, child_pids, compose_config, corrupt_folder,
                           kill_tree, kill_when_paused, read_metrics, run_cli, run_dirs, start_torchrun, torchrun,
                           torchrun_steps_per_epoch, two_nodes, wait_for)

# One short epoch of the QUICK digits slice: the tests that need a finished run, not a resumable one.
ONE_EPOCH = (*QUICK, "data.max_train_samples=128", "trainer.epochs=1")


@pytest.mark.slow
def test_two_processes_share_rank0s_run_dir_and_evaluate_exactly_like_one(tmp_path):
    # microseconds in the directory name: each rank's Hydra would pick a different one
    train = torchrun(2, *ONE_EPOCH, f"hydra.run.dir={tmp_path}/train/" + "${now:%H-%M-%S-%f}")
    assert train.returncode == 0, train.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "train")  # one run, written by rank 0 only
    assert read_metrics(run)["status"] == "completed"
    assert (run / "checkpoints" / "last.pt").exists() and len(list((run / "tensorboard").iterdir())) == 1
    # 101 val images: divisible by neither the world size nor the batch size
    evaluation = ("trainer.eval_only=true", f"trainer.resume={run / 'checkpoints' / 'last.pt'}",
                  "data.max_val_samples=101", "data.eval_batch_size=16", "data.num_workers=0",
                  "trainer.progress=false", "trainer.device=cpu")  # the in-process run too, on a GPU host
    proc = torchrun(2, *evaluation, f"hydra.run.dir={tmp_path}/eval2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = engine.run.train(compose_config(*evaluation), tmp_path / "eval1")  # one process: this one
    results = {1: one, 2: read_metrics(tmp_path / "eval2")}
    assert results[1]["val_images"] == results[2]["val_images"] == 101  # each image once, none padded
    for key in ("top1_err", "top5_err", "val_loss"):
        assert results[2][key] == pytest.approx(results[1][key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_a_sweep_through_submitits_local_launcher(tmp_path):
    """The SLURM path (hydra/launcher=slurm) with submitit's local executor: one job per sweep point."""
    sweep = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "attention.reduction=4,8",
                    f"hydra.sweep.dir={tmp_path}", *ONE_EPOCH, "data.max_val_samples=30")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 2
    assert all(read_metrics(r)["status"] == "completed" for r in runs)
    assert (tmp_path / ".submitit").is_dir()  # the jobs went through submitit


def test_slurm_launcher_config_asks_one_process_per_gpu():
    proc = run_cli("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr
    launcher = proc.stdout[proc.stdout.index("  launcher:"):]
    assert "submitit_launcher.SlurmLauncher" in launcher and "partition: gpu" in launcher
    assert "gpus_per_node: 8" in launcher and "tasks_per_node: 8" in launcher


def test_a_bad_config_fails_in_seconds_before_the_process_group(tmp_path):
    import time

    start = time.monotonic()
    proc = torchrun(2, "attention.stages=[9]", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "resnet20 has no stage 9; valid stages: 1..3" in output and "Traceback" not in proc.stdout
    assert "init_process_group" not in output and time.monotonic() - start < 60


def final_weights(run_dir: Path) -> dict:
    """A finished run's weights and its per-epoch losses and errors, from its last checkpoint."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return {"model": state["model"], "losses": [h["train_loss"] for h in state["history"]],
            "errors": [h["top1_err"] for h in state["history"]]}


def assert_same_run(a: dict, b: dict) -> None:
    """Two runs' records and weights are bit-identical."""
    assert a["losses"] == b["losses"] and a["errors"] == b["errors"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_keeps_the_last_one_and_the_resume_reproduces_the_run(tmp_path):
    """SIGKILL while the second mid-epoch checkpoint is half written (temp file, no rename): the first
    stays loadable, and resuming from it, mid-epoch, ends bit-identical to the uninterrupted run."""
    reference = start_torchrun(1, tmp_path / "reference", {})
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()[-3000:]
    marker = tmp_path / "paused"
    assert torchrun_steps_per_epoch(1) > 2 * CHECKPOINT_EVERY  # both writes are mid-epoch-1 checkpoints
    killed = start_torchrun(1, tmp_path / "run", {"ATTNLAB_TEST_PAUSE_IN_CHECKPOINT_WRITE": f"2:{marker}"})
    kill_when_paused(killed, marker)
    assert read_metrics(tmp_path / "run")["status"] == "running"  # killed, not failed
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / ".last.pt.tmp").exists()
    state = load_checkpoint(checkpoints / "last.pt")  # the first one, complete
    assert state["epoch"] == 0 and state["partial"]["batches"] == CHECKPOINT_EVERY
    resumed = start_torchrun(1, tmp_path / "run", {})
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert f"then {CHECKPOINT_EVERY} steps of epoch 1" in output  # it resumed mid-epoch
    assert read_metrics(tmp_path / "run")["status"] == "completed"
    assert_same_run(final_weights(tmp_path / "reference"), final_weights(tmp_path / "run"))


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_resumes_exactly(tmp_path):
    """torchrun --max-restarts: rank 1 is SIGKILLed mid-epoch, torchrun restarts both ranks, they resume."""
    import signal

    reference = start_torchrun(2, tmp_path / "reference", {})
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()[-3000:]
    marker = tmp_path / "paused"
    # rank 1 pauses after the 2nd mid-epoch checkpoint, which falls inside epoch 2
    assert CHECKPOINT_EVERY < torchrun_steps_per_epoch(2) < 2 * CHECKPOINT_EVERY
    faults = {"ATTNLAB_TEST_PAUSE_AFTER_STEP_CHECKPOINT": f"2:{marker}", "ATTNLAB_TEST_PAUSE_RANK": "1",
              # torch 2.14 keeps one rendezvous store across restarts, with the first attempt's addresses
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    run = start_torchrun(2, tmp_path / "run", faults, launch=("--standalone", "--max-restarts=1"))
    wait_for(marker, run)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    output = run.communicate(timeout=300)[0].decode()
    assert run.returncode == 0, output[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in output  # torchrun saw the kill and restarted
    assert f"(epoch 1, then {CHECKPOINT_EVERY} steps of epoch 2)" in output  # the restarted ranks resumed mid-epoch
    assert_same_run(final_weights(tmp_path / "reference"), final_weights(tmp_path / "run"))


@pytest.mark.slow
def test_two_nodes_train_like_one_process_with_the_same_global_batch(tmp_path):
    """Batch 8 on each of two nodes = batch 16 on one, on a model without batch statistics (GroupNorm)."""
    # one group: with one channel a group, near-constant digit backgrounds make the per-channel variance
    # tiny, and float rounding (1e-7) then grows ~100x a step; one group keeps it at rounding level
    model = ("model.norm=group", "model.norm_groups=1", "optim.lr=0.02", "trainer.checkpoint_every_steps=null")
    nodes = two_nodes(tmp_path / "two", {}, {}, batch=8, overrides=model)
    one = start_torchrun(1, tmp_path / "one", {}, batch=16, overrides=model)
    for proc in (*nodes, one):
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, output[-3000:]
    two, single = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    # all-reduce sums in another order: rounding differences (1e-7) that 16 steps grew to 2.8e-5 at
    # most (measured); a gradient scale off by only 0.5% (lr 0.0201) moved a weight by 3.4e-4
    assert two["losses"] == pytest.approx(single["losses"], rel=1e-4)
    for key, value in single["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=0, atol=1e-4, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_on_another_node_stops_the_others_in_bounded_time(tmp_path, fault):
    """Two nodes, so no torchrun agent tears the survivor down: it must notice the lost peer itself."""
    import signal
    import time

    marker = tmp_path / "paused"
    nodes = two_nodes(tmp_path / "run", {"ATTNLAB_TEST_PAUSE_AFTER_STEP_CHECKPOINT": f"1:{marker}",
                                         "ATTNLAB_TEST_PAUSE_RANK": "1"}, {}, overrides=("trainer.dist_timeout_s=10",))
    try:
        wait_for(marker, nodes[0])  # rank 1 stops after the first checkpoint; rank 0 waits in the next step
        start = time.monotonic()
        if fault == "dies":
            os.kill(int(marker.read_text()), signal.SIGKILL)
        output = nodes[0].communicate(timeout=120)[0].decode()
        waited = time.monotonic() - start
    finally:
        for proc in nodes:
            kill_tree(proc)
    # a dead peer's socket closes at once; a silent one is given trainer.dist_timeout_s
    assert nodes[0].returncode != 0 and waited < (15 if fault == "dies" else 40), (waited, output[-3000:])
    # one line from the rank, not Hydra's report of an uncaught exception (torchrun adds its own below)
    assert "rank 0 lost contact with another rank" in output and "Error executing job" not in output, output[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "failed" and metrics["error"].startswith("RankLostError")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["partial"]["batches"] == CHECKPOINT_EVERY


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_with_one_checkpoint_and_resumes_exactly(tmp_path):
    import signal
    import time

    # each step slowed to 1 s in the interrupted run: the signal, sent once the first mid-epoch
    # checkpoint exists, lands well inside the first epoch (8 steps a rank). The PIL path with loader workers (the
    # other resume tests use digits' default, the tensor-resident path)
    pil = ("data.in_memory=false",)
    reference = start_torchrun(2, tmp_path / "reference", {}, samples=256, overrides=pil)
    assert reference.wait(timeout=300) == 0
    run = start_torchrun(2, tmp_path / "run", {"ATTNLAB_TEST_STEP_SECONDS": "1.0"}, samples=256, overrides=pil)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints" / "last.pt").exists():  # the step-3 checkpoint
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    ranks = sorted(child_pids(run.pid))  # torchrun's children; their own children are data-loader workers
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGTERM)  # one rank only: the other must stop at the same step
    output = run.communicate(timeout=120)[0].decode()
    assert run.returncode != 0 and "stopped after step" in output, output[-3000:]
    stopped_at = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["partial"]["batches"]
    assert 0 < stopped_at < torchrun_steps_per_epoch(2, samples=256)
    assert f"stopped after step {stopped_at} (epoch 1)" in output
    assert read_metrics(tmp_path / "run")["status"] == "interrupted"
    resumed = start_torchrun(2, tmp_path / "run", {}, samples=256, overrides=pil)
    assert resumed.wait(timeout=300) == 0
    assert_same_run(final_weights(tmp_path / "reference"), final_weights(tmp_path / "run"))


@pytest.mark.slow
def test_sigusr1_to_the_whole_process_group_checkpoints_while_workers_ignore_it(tmp_path):
    """SLURM's warning signal reaches the trainer and its data-loader workers alike."""
    import signal
    import time

    cmd = [sys.executable, str(ROOT / "train.py"), *RESUMABLE, "data.max_train_samples=1437",
           "data.in_memory=false", f"hydra.run.dir={tmp_path}"]  # the PIL path: it has workers
    run = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoints" / "last.pt").exists():
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGUSR1)
    output = run.communicate(timeout=120)[0].decode()
    assert run.returncode == 1 and "SIGUSR1: stopped after step" in output, output[-3000:]
    assert "exited unexpectedly" not in output  # the workers ignored it
    assert read_metrics(tmp_path)["status"] == "interrupted"


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # rank 1's loss is NaN at epoch 2's first step; the next check is epoch 2's first mid-epoch checkpoint
    bad_step = torchrun_steps_per_epoch(2) + 1
    run = start_torchrun(2, tmp_path, {"ATTNLAB_TEST_NONFINITE_LOSS": f"1:{bad_step}"})
    output = run.communicate(timeout=180)[0].decode()
    assert run.returncode != 0
    assert output.count(f"non-finite loss at step {bad_step} (epoch 2) on rank 1; every rank stopped") == 2, \
        output[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["status"] == "failed" and metrics["error"].startswith("NonFiniteLossError")
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # epoch 1's, not a damaged mid-epoch-2 one
    assert last["epoch"] == 1 and last["partial"] is None
    assert all(torch.isfinite(w).all() for w in last["model"].values() if w.is_floating_point())


@pytest.mark.slow
def test_skip_mode_skips_a_non_finite_step_on_every_rank(tmp_path):
    bad_step = torchrun_steps_per_epoch(2) + 1  # epoch 2's first
    run = start_torchrun(2, tmp_path, {"ATTNLAB_TEST_NONFINITE_LOSS": f"1:{bad_step}"},
                         overrides=("trainer.on_nonfinite=skip",))
    output = run.communicate(timeout=180)[0].decode()
    # had the ranks acted differently their weights would differ, which the end of each epoch checks
    assert run.returncode == 0, output[-3000:]
    assert output.count(f"step {bad_step} (epoch 2): non-finite loss or gradient; update skipped on every rank") == 2
    history = final_weights(tmp_path)
    assert read_metrics(tmp_path)["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in history["model"].values() if w.is_floating_point())


def _replica_check(rank: int, store_path: str, result_path: str) -> None:
    """One of two processes: weights equal on both ranks, then rank 1's nudged."""
    import torch.distributed as dist

    from engine.distributed import ReplicasDivergedError, check_replicas_agree

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    model = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(model.weight, 0.5)
    torch.nn.init.zeros_(model.bias)
    outcomes = []
    for nudge in (0.0, 1e-7 * rank):
        with torch.no_grad():
            model.weight[0, 0] += nudge
        try:
            check_replicas_agree(model, "a test")
            outcomes.append("agree")
        except ReplicasDivergedError as e:
            outcomes.append(str(e))
    Path(f"{result_path}.{rank}").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


def test_replicas_that_drift_apart_are_an_error(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_replica_check, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2)
    for rank in (0, 1):
        first, second = json.loads((tmp_path / f"result.{rank}").read_text())
        assert first == "agree" and "the ranks' weights differ after a test" in second


@pytest.mark.slow
def test_two_ranks_skip_corrupt_images_and_report_each_once(tmp_path):
    bad = corrupt_folder(tmp_path / "data")  # spread over both ranks' shards
    proc = torchrun(2, "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_classes=2",
                    "data.image_size=32", "data.stem=cifar", "data.num_workers=2", "data.batch_size=4",
                    "trainer.epochs=2", "trainer.progress=false", "data.skip_corrupt=true",
                    f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["skipped_images"] == 3
    assert metrics["val_images"] == 16  # the readable val images, each counted once over the two ranks
    listed = (tmp_path / "run" / "skipped_images.txt").read_text()
    assert all(str(p) in listed for p in bad) and len(listed.splitlines()) == 3
