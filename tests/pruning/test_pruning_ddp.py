"""Every DDP rank takes the same pruning decision, shrinks to the same shapes and ends with the same student as
every other rank and as one process given the same data (2 CPU processes, gloo): a BERT masked LM, and a Llama
causal LM with grouped-query attention (task causal-lm), both trained in the same two processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kd_helpers import run_ranks_script
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

SCRIPT = Path(__file__).with_name("ddp_pruning_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from ddp_pruning_run import ARCHITECTURES, single_process  # noqa: E402

# what the exported student's config says after halving heads (key/value groups for Llama), FFN and hidden
SHRUNK = {
    "bert": (AutoModelForMaskedLM, {"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16}),
    "llama": (
        AutoModelForCausalLM,
        {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24},
    ),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both architectures, one after the other, in one launch of two processes."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks_script(SCRIPT, out, str(out), *ARCHITECTURES)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_ranks_prune_identically(ranks: Path, arch: str) -> None:
    out = ranks / arch
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert [e["step"] for e in rank0["events"]] == [2, 4, 6]
    assert rank0["events"] == rank1["events"]
    for masks0, masks1 in zip(rank0["history"], rank1["history"], strict=True):
        for kind in masks0:
            assert torch.equal(masks0[kind], masks1[kind]), kind
    assert rank0["student"].keys() == rank1["student"].keys()
    for name, value in rank0["student"].items():
        assert torch.equal(value, rank1["student"][name]), name
    model_class, sizes = SHRUNK[arch]
    exported = model_class.from_pretrained(out / "student")
    assert {key: getattr(exported.config, key) for key in sizes} == sizes
    for name, value in exported.state_dict().items():
        assert torch.equal(value, rank0["student"][name]), name

    # the students really shrank during the run, and gradient sync kept working after every re-wrap:
    # one process that averages the same two batches per step ends with the same student
    assert [e["params"] for e in rank0["events"]] == sorted(
        (e["params"] for e in rank0["events"]), reverse=True
    )
    alone = single_process(out / "single", arch).student.state_dict()
    assert alone.keys() == rank0["student"].keys()
    for name, value in alone.items():
        assert torch.allclose(value, rank0["student"][name], atol=1e-5), name
