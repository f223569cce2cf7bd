"""Gradients all-reduced by Lightning's DDPStrategy (2 CPU processes, gloo) are averaged, not summed, and the
bf16-compressed all-reduce keeps every rank identical and close to the float32 one. The runs train with SGD,
whose update is the reduced gradient itself (AdamW's would not change if the gradients doubled)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kd_helpers import run_ranks_script

from lightning_kd.training.distributed import compressed_ddp

SCRIPT = Path(__file__).with_name("ddp_compress_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from ddp_compress_run import LEARNING_RATE, build, single_process  # noqa: E402

FLOAT32_GAP = 1e-4  # DDP's float32 average against one process averaging the same micro-batches
BF16_GAP = 0.05  # measured at most 0.025: bf16 keeps 8 bits of every reduced gradient
# a summing all-reduce moves each weight at least 0.69 of its update away (measured); the check needs far less
SUMMED_GAP = 0.5


def update_gaps(
    run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> dict[str, float]:
    """How far each tensor's update (end - start) is from the reference's, relative to the reference update.

    Tensors the run barely moves are left out: the gradient of an attention key's bias is zero up to rounding
    (softmax ignores a shift shared by every key), so its update is noise, 1e-13 in size.
    """
    gaps = {}
    for name, value in reference.items():
        moved = (value - start[name]).norm()
        if moved > 1e-8:
            gaps[name] = ((run[name] - value).norm() / moved).item()
    return gaps


def test_unknown_compression_is_named() -> None:
    with pytest.raises(ValueError, match="'int8'.*bf16, fp16"):
        compressed_ddp("int8")


@pytest.mark.slow
def test_ddp_averages_gradients_and_bf16_stays_close(tmp_path: Path) -> None:
    run_ranks_script(SCRIPT, tmp_path, str(tmp_path))
    bf16 = [torch.load(tmp_path / f"bf16-rank{r}.pt", weights_only=False) for r in (0, 1)]
    fp32 = torch.load(tmp_path / "fp32-rank0.pt", weights_only=False)
    # float32 gradients, compressed on the wire only
    assert bf16[0]["buckets"] >= 6 and bf16[0]["bucket_dtypes"] == ["torch.float32"]

    start = {k: v.clone() for k, v in build().student.state_dict().items()}
    alone = single_process()
    # the control: with SGD, summed gradients are averaged ones at twice the learning rate
    summed = single_process(2 * LEARNING_RATE)
    assert min(update_gaps(summed, alone, start).values()) > SUMMED_GAP

    gaps = update_gaps(fp32["student"], alone, start)
    assert len(gaps) >= 40 and max(gaps.values()) < FLOAT32_GAP, gaps

    gaps = update_gaps(bf16[0]["student"], fp32["student"], start)
    assert len(gaps) >= 40 and max(gaps.values()) < BF16_GAP, gaps
    assert max(gaps.values()) > 0  # the compression really ran: bf16 rounding shows in the updates
    for name, value in bf16[0]["student"].items():
        assert torch.equal(value, bf16[1]["student"][name]), name  # one update, applied alike on every rank
