"""Distillation and HomoDistil pruning on FSDP2 (2 CPU processes, gloo) compute what DDP computes: the same
student, the same AdamW moments and step, the same pruning events, with every rank holding the same student.
Their distributed checkpoints record the shrunk shape: a run stopped between two events resumes to the student
of one that never stopped, and loads on one rank. One launch of two processes runs every two-rank case in turn
(starting processes is most of the cost); one more launch resumes on a single rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kd_helpers import run_ranks_script

SCRIPT = Path(__file__).with_name("fsdp_run.py")
CASES = ("ddp", "fsdp", "fsdp_replicated", "fsdp_bf16", "fsdp_stop", "fsdp_resume", "llama_ddp", "llama_fsdp")


def launch(out: Path, *cases: str) -> None:
    run_ranks_script(SCRIPT, out, str(out), *cases)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    launch(out, *CASES)
    return out


@pytest.fixture(scope="module")
def runs(out: Path) -> dict[str, list[dict]]:
    return {
        case: [torch.load(out / case / f"rank{r}.pt", weights_only=False) for r in (0, 1)] for case in CASES
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fsdp", "fsdp_replicated", "llama_fsdp"])
def test_fsdp2_trains_and_prunes_as_ddp_does(runs: dict[str, list[dict]], case: str) -> None:
    ddp, (rank0, rank1) = runs["llama_ddp" if case.startswith("llama") else "ddp"][0], runs[case]
    # the student really was sharded; the teacher as asked
    assert set(rank0["sharded"]) == {"DTensor"}
    assert set(rank0["teacher_sharded"]) == ({"Parameter"} if case == "fsdp_replicated" else {"DTensor"})
    # three events shrank the student physically, the same as under DDP
    assert [e["step"] for e in rank0["events"]] == [2, 4, 6]
    assert rank0["events"] == rank1["events"] == ddp["events"]
    assert [e["params"] for e in rank0["events"]] == sorted(
        (e["params"] for e in rank0["events"]), reverse=True
    )
    # the ranks hold the same student, bit for bit, and it is DDP's to float tolerance
    assert rank0["student"].keys() == ddp["student"].keys()
    for name, value in rank0["student"].items():
        assert torch.equal(value, rank1["student"][name]), name
        assert value.shape == ddp["student"][name].shape, name
        assert torch.allclose(value, ddp["student"][name], atol=1e-6 if case != "llama_fsdp" else 1e-5), name
    # the AdamW moments followed the kept units, and the step count carried over the events
    for name, state in ddp["moments"].items():
        assert rank0["moments"][name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.allclose(
                rank0["moments"][name][key], value, atol=1e-6 if case != "llama_fsdp" else 1e-5
            ), (
                name,
                key,
            )
    assert {int(state["step"]) for state in rank0["moments"].values()} == {8}


@pytest.mark.slow
def test_fsdp2_mixed_precision_keeps_float32_master_weights(runs: dict[str, list[dict]]) -> None:
    ddp, (rank0, rank1) = runs["ddp"][0], runs["fsdp_bf16"]
    assert rank0["dtypes"] == {torch.float32}
    assert {v.dtype for state in rank0["moments"].values() for v in state.values()} == {torch.float32}
    assert rank0["events"] == rank1["events"] == ddp["events"]
    gaps = []
    for name, value in rank0["student"].items():
        assert torch.equal(value, rank1["student"][name]), name
        gaps.append(float((value - ddp["student"][name]).abs().max()))
    # computed in bfloat16 (not DDP's float32 to the last bits), yet the same training
    assert 1e-5 < max(gaps) < 1e-2


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


@pytest.mark.slow
def test_stopped_between_events_resumes_to_the_uninterrupted_student(
    out: Path, runs: dict[str, list[dict]]
) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    stopped, resumed, straight = runs["fsdp_stop"][0], runs["fsdp_resume"], runs["fsdp"][0]
    assert stopped["step"] == 3 and [e["step"] for e in stopped["events"]] == [2]
    # a folder with one shard per rank, and the metadata that says what shape the student had shrunk to
    checkpoint = out / "fsdp_stop" / "mid"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(checkpoint / "meta.pt", weights_only=False)
    event = stopped["events"][0]
    assert meta["lightning_kd"]["student_shape"] == {
        "heads": [event["heads"] // 4] * 4,
        "ffn": [event["ffn"] // 4] * 4,
        "hidden": event["hidden"],
    }
    keys = list(FileSystemReader(checkpoint).read_metadata().state_dict_metadata)
    assert any(k.startswith("state_dict.student.") for k in keys)
    assert not any("teacher" in k for k in keys)  # never the teacher's weights
    assert any(k.startswith("optimizer_0.state.") for k in keys)
    # resumed, both ranks end where the run that never stopped ends, bit for bit
    for rank in resumed:
        assert rank["step"] == 8 and rank["events"] == straight["events"]
        assert_same(rank["student"], straight["student"])
        for name, state in straight["moments"].items():
            assert_same(rank["moments"][name], state)


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_one(out: Path, runs: dict[str, list[dict]]) -> None:
    launch(out, "one")
    alone = torch.load(out / "one" / "rank0.pt", weights_only=False)
    stopped = runs["fsdp_stop"][0]
    # what the one rank loaded is what the two ranks saved, whole: the shrunk student and its moments
    assert_same(alone["start"]["student"], stopped["student"])
    for name, state in stopped["moments"].items():
        assert_same(alone["start"]["moments"][name], state)
    # and it trains on to the end of the schedule, through the two events still to come
    assert alone["step"] == 8
    assert set(alone["sharded"]) == {"DTensor"}
    counts = [{k: v for k, v in e.items() if k != "params"} for e in alone["events"]]
    assert counts == [{k: v for k, v in e.items() if k != "params"} for e in runs["fsdp"][0]["events"]]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fsdp2_exports_the_plain_folder_ddp_exports(
    out: Path, runs: dict[str, list[dict]], arch: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertForMaskedLM, LlamaForCausalLM

    auto, plain = (
        (AutoModelForMaskedLM, BertForMaskedLM)
        if arch == "bert"
        else (AutoModelForCausalLM, LlamaForCausalLM)
    )
    prefix = "" if arch == "bert" else "llama_"
    sharded, replicated = (auto.from_pretrained(out / f"{prefix}{c}" / "student") for c in ("fsdp", "ddp"))
    assert type(sharded) is plain
    sizes = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
    assert {k: getattr(sharded.config, k) for k in sizes} == {k: getattr(replicated.config, k) for k in sizes}
    assert sharded.config.num_attention_heads == {"bert": 2, "llama": 4}[arch]
    weights, trained = sharded.state_dict(), runs[f"{prefix}fsdp"][0]["student"]
    for name, value in trained.items():
        assert torch.equal(weights[name], value), name
        assert torch.allclose(weights[name], replicated.state_dict()[name], atol=1e-5), name
