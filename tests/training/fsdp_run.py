"""Distillation (and HomoDistil pruning) on two CPU processes, FSDP2 against DDP, each rank saving what it holds.

Run by test_fsdp.py as ``python fsdp_run.py OUT_DIR CASE...``; Lightning starts the second rank by running this
script again. Each case trains the same tiny BERT masked LM from the same seed on the same per-rank batches and
writes ``OUT_DIR/CASE/rank{r}.pt``: the full student (gathered from the shards under FSDP2), the pruning events
and the optimizer's moments gathered whole. Cases:

- ``ddp``: the reference, Lightning's DDP.
- ``fsdp``: FSDP2 with the teacher sharded too.
  Both export the pruned student at the end (``CASE/student``).
- ``fsdp_replicated``: FSDP2 with a whole teacher on every rank and activation checkpointing.
- ``fsdp_bf16``: FSDP2 computing in bfloat16 from float32 master weights.
- ``fsdp_stop``: ``fsdp`` stopped after step 3 (between two events), saving a distributed checkpoint ``mid``.
- ``fsdp_resume``: ``fsdp`` resumed from that checkpoint.
- ``one``: that checkpoint resumed on a single rank (a launch of its own: ``devices=1``).
- ``llama_ddp``, ``llama_fsdp``: ``ddp`` and ``fsdp`` for a decoder, a tiny Llama causal LM with grouped-query
  attention (task causal-lm, the chunked next-token term), which the library runs as its body then its head.

Each distils for 8 steps while a PruningCallback shrinks heads, FFN and hidden at steps 2, 4 and 6, so the
first steps check distillation alone and the later ones the events. Every step reads one batch per rank, chosen
by the epoch (one batch each), so a resumed run reads what an uninterrupted one reads. Every epoch ends with a
validation (forward passes without gradients, after which FSDP2 must hand back its sharded parameters),
except in the runs that stop and resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "distillation")]
from kd_helpers import StopAt, make_batch, tiny_bert_config  # noqa: E402
from test_causal_lm import causal_batch  # noqa: E402
from tiny_models import make_model  # noqa: E402
from transformers import BertForMaskedLM  # noqa: E402

from lightning_kd import DistillationModule, PruningCallback  # noqa: E402
from lightning_kd.training.sharding import fsdp2, full_tensor  # noqa: E402

CASES = ("ddp", "fsdp", "fsdp_replicated", "fsdp_bf16", "fsdp_stop", "fsdp_resume", "llama_ddp", "llama_fsdp")


class RankBatches(L.LightningDataModule):
    """Different batches on every rank, as a sharded corpus gives; one per epoch, reloaded every epoch."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.batch = causal_batch if causal else make_batch

    def train_dataloader(self) -> DataLoader:
        seed = 100 * self.trainer.global_rank + self.trainer.current_epoch
        return DataLoader([self.batch(seed=seed)], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.batch(seed=999 + self.trainer.global_rank)], batch_size=None)


def strategy(case: str) -> object:
    case = case.removeprefix("llama_")
    if case == "ddp":
        return "ddp"
    if case == "fsdp_replicated":
        return fsdp2(teacher="replicated", activation_checkpointing=True)
    if case == "fsdp_bf16":
        return fsdp2(mixed_precision="bf16")
    return fsdp2()


def gathered(module: DistillationModule, optimizer: torch.optim.Optimizer) -> dict:
    """The whole student and its AdamW moments by parameter name, the same on DDP and FSDP2."""
    names = {id(p): n for n, p in module.student.named_parameters()}
    moments = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            moments[names[id(parameter)]] = {k: full_tensor(v).clone() for k, v in state.items()}
    student = {n: full_tensor(p.detach()).clone() for n, p in module.student.named_parameters()}
    return {"student": student, "moments": moments}


class AtStart(L.Callback):
    """What the run holds when training starts: after a resume, what it loaded."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = gathered(pl_module, trainer.optimizers[0])


def main(out: Path, case: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    causal = case.startswith("llama")
    if causal:  # 3 blocks of 8 query heads in 4 key/value groups
        teacher, terms, task = make_model("llama"), ["tokens", "hidden", "task"], "causal-lm"
    else:
        teacher, terms, task = BertForMaskedLM(tiny_bert_config()), ["logits", "hidden", "task"], "base"
    objective = [{"term": term} for term in terms]
    module = DistillationModule(teacher, {"init": "copy"}, objective=objective, learning_rate=1e-3, task=task)
    export = (
        str(out / "student") if case.removeprefix("llama_") in ("ddp", "fsdp") else None
    )  # FSDP2 gathers it on rank 0
    pruning = PruningCallback(
        {"heads": 0.5, "ffn": 0.5, "hidden": 0.5}, end_step=6, interval=2, export_dir=export
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1 if case == "one" else 2,
        strategy=strategy(case),
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        reload_dataloaders_every_n_epochs=1,
        check_val_every_n_epoch=1,
        # with validation on, these one-batch epochs resume to another student under DDP too (Lightning's loop
        # state around the stop, not the strategy's): off for the runs that stop and resume
        limit_val_batches=0 if case in ("fsdp_stop", "fsdp_resume", "one") else None,
        callbacks=[pruning, start := AtStart(), *([StopAt(3)] if case == "fsdp_stop" else [])],
    )
    ckpt = {"fsdp_resume": out.parent / "fsdp_stop" / "mid", "one": out.parent / "fsdp_stop" / "mid"}.get(
        case
    )
    trainer.fit(module, RankBatches(causal), ckpt_path=ckpt)
    if case == "fsdp_stop":
        trainer.save_checkpoint(out / "mid")
    saved = gathered(module, trainer.optimizers[0])
    saved["events"] = pruning.events
    saved["start"] = start.start
    saved["sharded"] = [type(p).__name__ for p in module.student.parameters()]
    saved["teacher_sharded"] = [type(p).__name__ for p in module.teacher.parameters()]
    saved["step"] = trainer.global_step
    saved["dtypes"] = {p.dtype for p in module.student.parameters()}
    torch.save(saved, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    for name in sys.argv[2:] or CASES:
        main(Path(sys.argv[1]) / name, name)
