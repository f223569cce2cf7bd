"""lightning-kd under a real SLURM cluster: the sbatch scripts of experiments/slurm, srun, Lightning's
SLURMEnvironment, DDP over gloo, and preemption with requeue and resume. No mocks.

Every job runs the same tiny HomoDistil recipe with two ranks, so the single-node job, the two-node job and
the job that is preempted and killed along the way must all end with exactly the same student.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from slurm_cluster import Job, SlurmCluster
from slurm_jobs import MAX_STEPS, PRUNE_END, PRUNE_INTERVAL, load_records, recipe, start_steps, write_recipe
from transformers import AutoModelForMaskedLM

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "experiments" / "slurm"
HERE = Path(__file__).resolve().parent
CKPT_STEPS = 3  # periodic checkpoints at steps 3, 6, 9, ...
JOB_TIMEOUT = 300.0  # seconds; a job takes tens of seconds on 2 idle cores


@dataclass
class Run:
    job: Job
    out: Path
    log: Path
    seconds: float

    def records(self, attempt: int = 0) -> list[dict[str, Any]]:
        return load_records(self.out, attempt)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def job_env(cluster: SlurmCluster, **settings: str) -> dict[str, str]:
    """The environment sbatch hands on to the job: this venv's `lightning-kd`, the probes, nothing online."""
    # nothing of an allocation or launcher the tests themselves may run under
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"}
    env = {
        k: v
        for k, v in cluster.env.items()
        if not k.startswith(("SLURM_", "WANDB_", "PYTEST_")) and k not in launcher
    }
    env.update(
        SLURM_CONF=str(cluster.conf),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        # the nodes reach each other only over the veth link; gloo would otherwise pick the host name's address
        GLOO_SOCKET_IFNAME=cluster.interface,
        **settings,
    )
    return env


def sbatch(
    cluster: SlurmCluster,
    script: str,
    log: Path,
    env: dict[str, str],
    nodes: int,
    tasks_per_node: int,
    *options: str,
    args: tuple[str, ...] = (),
) -> int:
    return cluster.sbatch(
        SCRIPTS / script,
        # the scripts ask for 8 GPUs and 8 CPUs per task; this cluster has CPUs only
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        "--job-name=lkd-test",
        f"--output={log}",
        *options,
        args=args,
        env=env,
        cwd=REPO,
    )


def submit(
    cluster: SlurmCluster, script: str, out: Path, config: dict[str, Any], nodes: int, tasks_per_node: int
) -> tuple[int, Path]:
    """Submits ``config`` as the job's recipe; the job writes its run folder and records under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = write_recipe(out / "recipe.yaml", config)
    log = out / "job.out"
    env = job_env(cluster, RECIPE=str(path), RUN_DIR=str(out / "run"), CKPT_STEPS=str(CKPT_STEPS))
    return sbatch(cluster, script, log, env, nodes, tasks_per_node), log


def run_to_end(
    cluster: SlurmCluster, script: str, out: Path, config: dict[str, Any], nodes: int, tasks_per_node: int
) -> Run:
    started = time.monotonic()
    job_id, log = submit(cluster, script, out, config, nodes, tasks_per_node)
    try:
        job = cluster.wait_done(job_id, JOB_TIMEOUT, log)
    finally:
        cluster.cancel(job_id)  # a no-op for a finished job; stops one the wait gave up on
    run = Run(job, out, log, time.monotonic() - started)
    assert job.state == "COMPLETED" and job.exit_code == "0:0", run.log_text()[-6000:]
    return run


def resumed_from(log: str) -> dict[int, str]:
    """Attempt -> the checkpoint the sbatch script resumed it from, read from the line the script prints."""
    return {int(n): path for n, path in re.findall(r"attempt (\d+) on .*?resuming from ([^,\s]+)", log)}


def assert_same_student(records: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Pruning decisions and final weights of every rank equal the reference's, bit for bit."""
    for record in records:
        assert record["events"] == reference["events"]
        assert record["masks"].keys() == reference["masks"].keys()
        for kind, mask in reference["masks"].items():
            assert torch.equal(record["masks"][kind], mask), kind
        assert record["student"].keys() == reference["student"].keys()
        for name, value in reference["student"].items():
            assert torch.equal(record["student"][name], value), name


def assert_exported(folder: Path, reference: dict[str, Any]) -> None:
    exported = AutoModelForMaskedLM.from_pretrained(folder)
    assert exported.config.hidden_size == 16 and exported.config.num_attention_heads == 2
    for name, value in exported.state_dict().items():
        assert torch.equal(value, reference["student"][name]), name


@pytest.fixture(scope="module")
def single_node_run(
    slurm_cluster: SlurmCluster, job_assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Run:
    """The uninterrupted reference: one node, two tasks, DDP over gloo."""
    out = tmp_path_factory.mktemp("single_node")
    return run_to_end(
        slurm_cluster, "single_node.sbatch", out, recipe(job_assets, out), nodes=1, tasks_per_node=2
    )


def test_single_node_job_distils_and_prunes_with_ddp(single_node_run: Run) -> None:
    rank0, rank1 = single_node_run.records()
    for rank, record in enumerate((rank0, rank1)):
        assert record["rank"] == rank and record["world_size"] == 2 and record["backend"] == "gloo"
        assert record["cluster_environment"] == "SLURMEnvironment"
        assert record["global_step"] == MAX_STEPS and record["attempt"] == 0
    assert rank0["node"] == rank1["node"]
    assert [event["step"] for event in rank0["events"]] == list(
        range(PRUNE_INTERVAL, PRUNE_END + 1, PRUNE_INTERVAL)
    )
    assert_same_student([rank1], rank0)
    assert_exported(single_node_run.out / "student", rank0)
    assert resumed_from(single_node_run.log_text()) == {0: "nothing"}
    assert (single_node_run.out / "run" / "checkpoints" / "last.ckpt").exists()
    print(f"single-node job: {single_node_run.seconds:.0f} s")


def test_two_node_job_matches_the_single_node_job(
    slurm_cluster: SlurmCluster, job_assets: dict[str, Path], single_node_run: Run, tmp_path: Path
) -> None:
    """One task on each node: the DDP rendezvous and every all-reduce cross the veth link."""
    run = run_to_end(
        slurm_cluster, "multi_node.sbatch", tmp_path, recipe(job_assets, tmp_path), nodes=2, tasks_per_node=1
    )
    rank0, rank1 = run.records()
    n1, n2 = slurm_cluster.nodes
    assert (rank0["node"], rank1["node"]) == (n1.name, n2.name)
    # rank 1 reached the rendezvous on n1 from n2's own address: over the link between the namespaces
    assert rank0["master"] == rank1["master"] == n1.address
    assert (rank0["address"], rank1["address"]) == (n1.address, n2.address)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert f"rendezvous at {n1.address}" in run.log_text()
    reference = single_node_run.records()[0]
    assert_same_student([rank0, rank1], reference)
    assert_exported(tmp_path / "student", reference)
    print(f"two-node job: {run.seconds:.0f} s")


def test_preempted_then_killed_job_resumes_to_the_same_student(
    slurm_cluster: SlurmCluster, job_assets: dict[str, Path], single_node_run: Run, tmp_path: Path
) -> None:
    """Attempt 0 gets SIGUSR1 at whatever point its ranks are (step 3 or later): the PreemptionCheckpoint that
    `lightning-kd fit` adds under SLURM has both ranks save an hpc checkpoint together at its next check (step
    10, mid-pruning) and requeues the job. Attempt 1 resumes from it and is requeued without warning at step 14
    (SIGTERM, then SIGKILL): attempt 2 resumes from the periodic last.ckpt of step 12 and finishes. The student
    is the uninterrupted run's.

    One dataloader worker per rank: SLURM signals every process of the step, workers included.
    """
    cluster = slurm_cluster
    started = time.monotonic()
    config = recipe(job_assets, tmp_path, hold_at=[-1, 14], num_workers=1, pace=0.4)
    job_id, log = submit(cluster, "single_node.sbatch", tmp_path, config, nodes=1, tasks_per_node=2)

    def progress() -> int:
        path = tmp_path / "progress-rank0.json"
        return json.loads(path.read_text())["step"] if path.exists() else -1

    def held(attempt: int) -> bool:
        return all((tmp_path / f"held-rank{rank}-attempt{attempt}").exists() for rank in (0, 1))

    try:
        cluster.wait(job_id, lambda job: progress() >= 3, JOB_TIMEOUT, "step 3 of attempt 0", log)
        signalled_at = progress()
        # what `#SBATCH --signal=USR1@90` does before the time limit: SIGUSR1 to the tasks, not the batch shell
        cluster.run("scancel", "--signal=USR1", str(job_id))
        cluster.wait(
            job_id, lambda job: job.restarts == 1 and held(1), JOB_TIMEOUT, "attempt 1 at step 14", log
        )
        hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
        assert hpc.exists()
        assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] == 10
        # a requeue with no warning signal first, as when a node is taken back: only periodic checkpoints help
        cluster.run("scontrol", "requeue", str(job_id))
        job = cluster.wait_done(job_id, JOB_TIMEOUT, log)
    finally:
        cluster.cancel(job_id)
    text = log.read_text(errors="replace")
    assert job.state == "COMPLETED" and job.exit_code == "0:0", text[-6000:]
    assert job.restarts == 2
    assert signalled_at < 10
    assert "SIGUSR1 received: checkpoint of step 10" in text
    assert (
        "Handling auto-requeue signal" not in text
    )  # Lightning's own handler, which can deadlock, stayed off
    # the sbatch script's choice at every start: the newest checkpoint of the run
    assert resumed_from(text) == {
        0: "nothing",
        1: str(hpc),
        2: str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
    }
    # attempt 1 went on from the signal's checkpoint, attempt 2 from the last periodic checkpoint before the kill
    assert start_steps(tmp_path, rank=0) == start_steps(tmp_path, rank=1) == {0: 0, 1: 10, 2: 12}

    records = load_records(tmp_path, attempt=2)
    assert [r["attempt"] for r in records] == [2, 2] and all(r["global_step"] == MAX_STEPS for r in records)
    reference = single_node_run.records()[0]
    assert_same_student(records, reference)
    assert_exported(tmp_path / "student", reference)
    print(f"preempted job, three attempts: {time.monotonic() - started:.0f} s")


def printed_config(stdout: Path) -> dict[str, Any]:
    """The recipe as `lightning-kd fit ... --print_config` printed it inside the job (after the script's line)."""
    text = stdout.read_text()
    return yaml.safe_load(text[text.index("# lightning.pytorch==") :])


def test_paper_recipes_take_the_scripts_arguments(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The script's defaults (HomoBERT-small) and a TED recipe, with everything the scripts add, make a Trainer
    Lightning accepts. The jobs stop at --print_config: no GPU and no download needed. Both run at once."""
    cases = {"single_node.sbatch": None, "multi_node.sbatch": "experiments/ted/mnli_stage2.yaml"}
    jobs = {}
    for script, recipe_name in cases.items():
        out = tmp_path / script
        out.mkdir()
        env = job_env(
            slurm_cluster, RUN_DIR=str(out / "run"), **({"RECIPE": recipe_name} if recipe_name else {})
        )
        jobs[script] = sbatch(
            slurm_cluster,
            script,
            out / "job.out",
            env,
            1,
            1,
            f"--error={out / 'job.err'}",
            args=("--print_config",),
        )
    try:
        done = {
            script: slurm_cluster.wait_done(job_id, JOB_TIMEOUT, tmp_path / script / "job.err")
            for script, job_id in jobs.items()
        }
    finally:
        for job_id in jobs.values():
            slurm_cluster.cancel(job_id)
    for script, recipe_name in cases.items():
        out = tmp_path / script
        assert done[script].state == "COMPLETED", (script, (out / "job.err").read_text()[-4000:])
        config = printed_config(out / "job.out")
        trainer = config["trainer"]
        # devices stays the string "1" (its type allows str); Lightning reads it as one device per node
        assert (trainer["num_nodes"], str(trainer["devices"]), trainer["default_root_dir"]) == (
            1,
            "1",
            str(out / "run"),
        )
        ours = trainer["callbacks"][-1]
        assert ours["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint", script
        assert (
            ours["init_args"]["dirpath"] == str(out / "run" / "checkpoints")
            and ours["init_args"]["save_last"]
        )
        assert ours["init_args"]["train_time_interval"] == "0:30:00"
        if recipe_name is None:
            assert config["model"]["init_args"]["teacher"] == "bert-base-uncased"  # homobert_small.yaml
        # Lightning refuses two stateful callbacks with one state key (e.g. two ModelCheckpoints every 1000 steps)
        parser = ArgumentParser()
        parser.add_argument("--callbacks", type=list[L.Callback])
        callbacks = parser.instantiate(parser.parse_object({"callbacks": trainer["callbacks"]})).callbacks
        L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=callbacks, default_root_dir=out)
