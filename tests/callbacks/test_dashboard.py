"""RunDashboard: W&B metric definitions, summaries and the pruning events table, read back from an offline run
file; the CSV + PNG summary without W&B; and the CLI adding it by default."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.image
import pytest
import torch
import wandb
import yaml
from kd_helpers import FixedBatches, quiet_trainer, tiny_bert_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback, RunDashboard
from lightning_kd.callbacks.dashboard import (
    STEP_METRIC,
    events_table,
    metric_summary,
    read_metrics_csv,
    read_run_records,
    save_summary_plot,
    summary_figure,
)
from lightning_kd.cli.app import DistillationCLI

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PANEL_METRICS = {
    "discrepancy/kl",
    "discrepancy/hidden",
    "width/heads",
    "width/ffn",
    "width/hidden",
    "params",
    "train/loss",
}


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B offline, with every folder it writes (runs, artifact staging, caches, settings) inside tmp_path."""
    stop_wandb()  # a run another test left open would be reused, and the service keeps its settings
    root = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name, folder in (
        ("WANDB_DIR", "runs"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        (root / folder).mkdir(parents=True)
        monkeypatch.setenv(name, str(root / folder))
    yield root
    stop_wandb()


def stop_wandb() -> None:
    """Finish the current run and stop wandb's service process. Offline, ``finish`` can return before the run
    file is written out (seen with wandb 0.31); the service also resolves relative run folders against the working
    directory it started in and keeps the WANDB_* settings it started with."""
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def distil_and_prune(
    teacher: BertForMaskedLM, root: Path, loggers: list[Any]
) -> tuple[L.Trainer, PruningCallback]:
    """8 steps of HomoDistil on a tiny BERT: pruning events at steps 2, 4 and 6, every step logged."""
    torch.manual_seed(0)
    module = DistillationModule(
        teacher, {"init": "copy"}, objective=[{"term": "logits"}, {"term": "hidden", "layers": "uniform"}]
    )
    pruning = PruningCallback(target={"heads": 0.5, "ffn": 0.5, "hidden": 0.5}, end_step=6, interval=2)
    trainer = quiet_trainer(
        max_steps=8, logger=loggers, callbacks=[pruning, RunDashboard()], default_root_dir=str(root)
    )
    trainer.fit(module, FixedBatches())
    return trainer, pruning


def _nest(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _nest(row, list(item.nested_key) or [item.key], json.loads(item.value_json))
            rows.append(row)
    return rows


def final_summary(records: list[Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                _nest(summary, list(item.nested_key) or [item.key], json.loads(item.value_json))
    return summary


def summary_ops(metric: Any) -> set[str]:
    return {op for op in ("min", "max", "mean", "last") if getattr(metric.summary, op)}


# ---------------------------------------------------------------------------------------------- W&B


def test_offline_wandb_run_has_the_panels_summaries_and_events(
    tmp_path: Path, offline_wandb: Path, teacher: BertForMaskedLM
) -> None:
    logger = WandbLogger(project="lightning-kd-test", save_dir=str(tmp_path))
    _, pruning = distil_and_prune(teacher, tmp_path, [logger])
    run_dir = Path(logger.experiment.dir).parent  # the offline-run-* folder; .dir is its files/
    stop_wandb()
    (run_file,) = run_dir.glob("run-*.wandb")
    records = list(read_run_records(run_file))

    # history: every training row carries Lightning's step, and the panels' metrics are there
    rows = history_rows(records)
    training = [row for row in rows if "train/loss" in row]
    assert [row[STEP_METRIC] for row in training] == list(range(8))
    assert PANEL_METRICS <= {key for row in training for key in row}
    assert [row["width/hidden"] for row in training][-1] == 0.5

    # definitions: Lightning's step axis, and each metric by exact name with its step and summary
    metrics = [record.metric for record in records if record.WhichOneof("record_type") == "metric"]
    by_glob = {m.glob_name: m for m in metrics if m.glob_name}
    assert by_glob["*"].step_metric == STEP_METRIC
    assert set(by_glob) == {"*"}, "prefix globs race Lightning's '*' in wandb-core: define exact names"
    by_name = {m.name: m for m in metrics if m.name}
    assert PANEL_METRICS <= set(by_name)
    assert summary_ops(by_name["discrepancy/kl"]) == {"min", "last"}
    assert summary_ops(by_name["train/loss"]) == {"min", "last"}
    assert summary_ops(by_name["width/heads"]) == summary_ops(by_name["params"]) == {"min"}
    for name, metric in by_name.items():
        if name == STEP_METRIC:
            continue
        assert metric.step_metric == STEP_METRIC, name
        assert summary_ops(metric) == set(metric_summary(name).split(",")), name
    assert any(name.startswith("time/") for name in by_name)  # the module's step timing, defined generically

    # the summaries W&B computed from those definitions
    summary = final_summary(records)
    kl = [row["discrepancy/kl"] for row in training]
    assert summary["discrepancy/kl"] == pytest.approx({"min": min(kl), "last": kl[-1]})
    assert summary["params"] == {"min": pruning.events[-1]["params"]}
    # the step timings' mean covers every value logged
    step_ms = [row["time/step_ms"] for row in rows if "time/step_ms" in row]
    assert len(step_ms) > 1
    assert summary["time/step_ms"] == pytest.approx({"mean": sum(step_ms) / len(step_ms)})

    # the pruning events table, once, with the callback's rows
    (table_row,) = [row for row in rows if "pruning/events" in row]
    assert table_row["pruning/events"]["_type"] == "table-file"
    table = json.loads((run_dir / "files" / table_row["pruning/events"]["path"]).read_text())
    assert table["columns"] == ["step", "heads", "ffn", "hidden", "params"]
    assert [event["step"] for event in pruning.events] == [2, 4, 6]
    assert table["data"] == [[event[c] for c in table["columns"]] for event in pruning.events]


def test_run_reader_follows_records_across_blocks(tmp_path: Path, offline_wandb: Path) -> None:
    """Enough rows that records straddle the run file's 32 KiB blocks."""
    run = wandb.init(project="lightning-kd-test", dir=str(tmp_path))
    for step in range(300):
        run.log({f"discrepancy/hidden/layer_{i}": step + i / 10 for i in range(12)})
    run_dir = Path(run.dir).parent
    stop_wandb()
    (run_file,) = run_dir.glob("run-*.wandb")
    assert run_file.stat().st_size > 3 * 32 * 1024
    rows = [
        row for row in history_rows(list(read_run_records(run_file))) if "discrepancy/hidden/layer_0" in row
    ]
    assert [row["discrepancy/hidden/layer_11"] for row in rows] == [step + 1.1 for step in range(300)]


def test_metric_summaries() -> None:
    assert metric_summary("discrepancy/hidden/layer_3") == "min,last"
    assert metric_summary("val/discrepancy/kl") == "min,last"
    assert metric_summary("train/relations_kl") == "min,last"
    assert metric_summary("val/loss") == "min,last"
    assert metric_summary("width/ffn") == metric_summary("params") == "min"
    assert metric_summary("throughput/tokens_per_s") == "max,mean"
    assert metric_summary("time/teacher_forward_ms") == "mean"
    assert metric_summary("val/cola/matthews_correlation", ["val/cola/"]) == "max,last"
    assert metric_summary("val/cola/matthews_correlation") == "min,last"  # no task metrics known: a loss
    assert metric_summary("epoch") is None and metric_summary("params_total") is None


def test_events_table_keeps_only_pruned_kinds() -> None:
    columns, rows = events_table(
        [{"step": 10, "hidden": 96, "params": 1000}, {"step": 20, "hidden": 64, "params": 700}]
    )
    assert columns == ["step", "hidden", "params"]
    assert rows == [[10, 96, 1000], [20, 64, 700]]


# ---------------------------------------------------------------------------------------------- without W&B


def test_without_wandb_metrics_csv_and_summary_png(
    tmp_path: Path, teacher: BertForMaskedLM, capsys: pytest.CaptureFixture
) -> None:
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    _, pruning = distil_and_prune(teacher, tmp_path, [csv_logger])
    assert not list(tmp_path.rglob("*.wandb"))
    metrics_file = Path(csv_logger.log_dir) / "metrics.csv"
    with metrics_file.open() as handle:
        header = next(csv.reader(handle))
    assert PANEL_METRICS | {"step"} <= set(header)

    png = Path(csv_logger.log_dir) / "summary.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > image.shape[1] > 300  # three panels, one above the other
    assert str(png.resolve()) in capsys.readouterr().out

    series = read_metrics_csv(metrics_file)
    assert [value for _, value in series["params"]][-1] == pruning.events[-1]["params"]
    assert [step for step, _ in series["train/loss"]] == list(range(8))
    titles = [ax.get_title() for ax in summary_figure(series).axes]
    assert titles == ["discrepancy", "width", "loss"]


def lines(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_summary_figure_draws_the_given_values() -> None:
    series = {
        "discrepancy/kl": [(0, 0.0), (5, 0.2), (10, 0.1)],
        "discrepancy/hidden": [(0, 0.0), (5, 0.3), (10, 0.2)],
        "discrepancy/hidden/layer_1": [(0, 0.0), (5, 0.4), (10, 0.25)],
        "width/heads": [(0, 1.0), (5, 0.75), (10, 0.5)],
        "width/hidden": [(0, 1.0), (10, 0.5)],
        "params": [(0, 2000.0), (5, 1500.0), (10, 1000.0)],
        "train/loss": [(0, 1.0), (5, 0.5), (10, 0.25)],
        "train/logits_kl": [(0, 0.5), (5, 0.25), (10, 0.125)],
        "val/loss": [(10, 0.3)],
        "time/step_ms": [(0, 12.0)],  # not a panel of the plot
    }
    figure = summary_figure(series)
    discrepancy, width, loss = figure.axes
    assert [ax.get_title() for ax in figure.axes] == ["discrepancy", "width", "loss"]
    assert lines(discrepancy) == {
        name: tuple(map(list, zip(*series[name], strict=True)))
        for name in ("discrepancy/kl", "discrepancy/hidden", "discrepancy/hidden/layer_1")
    }
    drawn = lines(width)
    assert drawn["width/heads"] == ([0, 5, 10], [1.0, 0.75, 0.5])
    assert drawn["width/hidden"] == ([0, 10], [1.0, 0.5])
    assert drawn["params / 2,000"] == ([0, 5, 10], [1.0, 0.75, 0.5])  # a share of the starting size
    assert lines(loss) == {
        "train/loss": ([0, 5, 10], [1.0, 0.5, 0.25]),
        "train/logits_kl": ([0, 5, 10], [0.5, 0.25, 0.125]),
        "val/loss": ([10], [0.3]),
    }
    assert loss.get_yscale() == "log"

    # a run without pruning has no width panel
    without = summary_figure({k: v for k, v in series.items() if not k.startswith(("width/", "params"))})
    assert [ax.get_title() for ax in without.axes] == ["discrepancy", "loss"]


def test_summary_figure_scales_params_to_the_teacher_and_draws_validation() -> None:
    series = {
        "params": [(0, 2000.0), (10, 1000.0)],
        "train/loss": [(0, 1.0), (10, 0.25)],
        "val/sst2/accuracy": [(5, 0.6), (10, 0.7)],
        "val/teacher/sst2/accuracy": [(5, 0.9), (10, 0.9)],
        "val/gap/sst2/accuracy": [(5, 0.3), (10, 0.2)],  # the difference of the two drawn lines: not drawn
        "val/discrepancy/kl": [(10, 0.1)],
    }
    figure = summary_figure(series, teacher_params=4000)
    assert [ax.get_title() for ax in figure.axes] == ["width", "loss", "validation"]
    width, _, validation = figure.axes
    assert lines(width)["params / teacher (4,000)"] == ([0, 10], [0.5, 0.25])
    drawn = lines(validation)
    assert drawn == {
        "val/sst2/accuracy": ([5, 10], [0.6, 0.7]),
        "val/teacher/sst2/accuracy": ([5, 10], [0.9, 0.9]),
    }
    # a run without pruning: the student's constant share of the teacher over the run
    still = summary_figure(
        {k: v for k, v in series.items() if k != "params"}, teacher_params=4000, student_params=1000
    )
    assert lines(still.axes[0])["params / teacher (4,000)"] == ([0, 10], [0.25, 0.25])


def test_metrics_csv_round_trip(tmp_path: Path) -> None:
    """CSVLogger's layout: one row per log call, empty cells for what that call did not log."""
    metrics_file = tmp_path / "metrics.csv"
    metrics_file.write_text(
        "discrepancy/kl,epoch,params,step,train/loss,val/loss\n"
        "0.0,0,100,0,1.0,\n"
        ",0,,1,0.5,\n"
        ",0,,1,,0.7\n"
        "0.2,0,50,2,0.25,\n"
    )
    series = read_metrics_csv(metrics_file)
    assert series == {
        "discrepancy/kl": [(0, 0.0), (2, 0.2)],
        "params": [(0, 100.0), (2, 50.0)],
        "train/loss": [(0, 1.0), (1, 0.5), (2, 0.25)],
        "val/loss": [(1, 0.7)],
    }
    png = save_summary_plot(series, tmp_path / "plots" / "summary.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert not math.isnan(matplotlib.image.imread(png).mean())


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path / "teacher")
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {
                    "class_path": "lightning_kd.PruningCallback",
                    "init_args": {"target": {"heads": 0.5}, "end_step": 4, "interval": 2},
                }
            ],
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "teacher": str(tmp_path / "teacher"),
                "task": "masked-lm",
                "student": {"init": "copy"},
                "objective": [{"term": "logits"}],
            },
        },
        "data": {"class_path": "kd_helpers.FixedBatches"},
    }


def write(recipe: dict[str, Any], path: Path) -> str:
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def dashboards(trainer: L.Trainer) -> list[RunDashboard]:
    return [callback for callback in trainer.callbacks if isinstance(callback, RunDashboard)]


def test_cli_adds_the_dashboard_by_default(
    tmp_path: Path,
    tiny_recipe: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    cli = DistillationCLI(args=["fit", "--config", write(tiny_recipe, tmp_path / "recipe.yaml")])
    (dashboard,) = dashboards(cli.trainer)
    (png,) = (tmp_path / "run").rglob("summary.png")
    (csv_logger,) = [logger for logger in cli.trainer.loggers if isinstance(logger, CSVLogger)]
    assert dashboard.plot_path == png and png.parent == Path(csv_logger.log_dir)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert "summary plot" in capsys.readouterr().out


def test_cli_keeps_the_recipes_dashboard(
    tmp_path: Path, tiny_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tiny_recipe["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
        {"class_path": "lightning_kd.RunDashboard", "init_args": {"plot": "mine.png"}},
    ]
    cli = DistillationCLI(args=["--config", write(tiny_recipe, tmp_path / "recipe.yaml")], run=False)
    cli.before_fit()
    (dashboard,) = dashboards(cli.trainer)
    assert dashboard.plot == "mine.png"

    # without one in the recipe, it goes before the checkpoint callbacks, which Lightning keeps last
    del tiny_recipe["trainer"]["callbacks"][-1]
    cli = DistillationCLI(args=["--config", write(tiny_recipe, tmp_path / "recipe.yaml")], run=False)
    cli.before_fit()
    kinds = [type(callback) for callback in cli.trainer.callbacks]
    assert kinds.count(RunDashboard) == 1
    assert kinds.index(PruningCallback) < kinds.index(RunDashboard) < kinds.index(ModelCheckpoint)


def test_cli_adds_a_csv_logger_next_to_other_loggers(
    tmp_path: Path, tiny_recipe: dict[str, Any], offline_wandb: Path
) -> None:
    tiny_recipe["trainer"]["logger"] = [
        {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "lightning-kd-test", "save_dir": str(tmp_path)},
        }
    ]
    cli = DistillationCLI(args=["--config", write(tiny_recipe, tmp_path / "recipe.yaml")], run=False)
    cli.before_fit()
    wandb_logger, csv_logger = cli.trainer.loggers  # W&B stays first: checkpoints keep their folder
    assert isinstance(wandb_logger, WandbLogger) and isinstance(csv_logger, CSVLogger)
    assert Path(csv_logger.save_dir) == tmp_path / "run" and csv_logger.name == "csv"

    tiny_recipe["trainer"]["logger"] = False  # no files asked for: none added (W&B aside, when WANDB_* asks)
    cli = DistillationCLI(args=["--config", write(tiny_recipe, tmp_path / "recipe.yaml")], run=False)
    cli.before_fit()
    assert not any(isinstance(logger, CSVLogger) for logger in cli.trainer.loggers)
    (dashboard,) = dashboards(cli.trainer)
    assert dashboard.plot is None  # nothing to draw from, and nothing to warn about


def test_task_scores_are_maximised() -> None:
    """GLUE metrics (accuracy, MCC, F1, correlations) are better higher, unlike the val/ losses beside them."""
    from lightning_kd.datamodules.glue_metrics import TaskMetrics

    module = L.LightningModule()
    module.task_metrics = TaskMetrics.for_task("mnli")
    dashboard = RunDashboard()
    dashboard.on_fit_start(quiet_trainer(), module)
    assert dashboard.higher_is_better == ("val/mnli/",)
    assert metric_summary("val/mnli/validation_matched/accuracy", dashboard.higher_is_better) == "max,last"
    assert metric_summary("val/loss", dashboard.higher_is_better) == "min,last"
