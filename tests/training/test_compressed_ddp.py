"""Gradients all-reduced in bf16 through Lightning's DDPStrategy (2 CPU processes, gloo): every rank ends with
the same student, close to the float32 all-reduce's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_kd.training.distributed import compressed_ddp

SCRIPT = Path(__file__).with_name("ddp_compress_run.py")


def test_unknown_compression_is_named() -> None:
    with pytest.raises(ValueError, match="'int8'.*bf16, fp16"):
        compressed_ddp("int8")


@pytest.mark.slow
def test_bf16_gradient_all_reduce_keeps_ranks_identical(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for compression in ("bf16", "fp32"):
        run = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), compression],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    bf16 = [torch.load(tmp_path / f"bf16-rank{r}.pt", weights_only=False) for r in (0, 1)]
    fp32 = torch.load(tmp_path / "fp32-rank0.pt", weights_only=False)
    assert bf16[0]["buckets"] >= 6 and bf16[0]["bucket_dtypes"] == [
        "torch.float32"
    ]  # float32 grads, compressed
    differs = False
    for name, value in bf16[0]["student"].items():
        assert torch.equal(value, bf16[1]["student"][name]), name  # one update, applied alike on every rank
        torch.testing.assert_close(value, fp32["student"][name], rtol=0, atol=2e-3, msg=name)
        differs |= not torch.equal(value, fp32["student"][name])
    assert differs  # the compression really ran: bf16 rounding shows in the weights
