"""RunDashboard: a run's W&B dashboard, and the same figures without W&B.

W&B puts a chart in the section named by the part of its name before the first ``/``, so the names the library
logs already make the panels: ``discrepancy/*``, ``width/*`` and ``params``, ``train/*`` and ``val/*``,
``throughput/*``, ``time/*``. What the callback adds:

- W&B: every such metric is defined against ``trainer/global_step`` with a summary that means something for it
  (:data:`SUMMARIES`): the lowest discrepancy and loss (and the last), the final width and size, the best task
  score, the peak and mean throughput, the mean time per part of the step. The PruningCallback's events go in a
  table (``pruning/events``: step, kept units, parameters).
- Without W&B (and with it): at the end of fit, a PNG of the discrepancy, the width and the loss against steps,
  drawn from the CSVLogger's ``metrics.csv`` and saved next to it.

Why metrics are defined by exact name rather than by glob: Lightning's WandbLogger defines the glob ``*``, and
wandb-core (0.31) matches a new name against its globs in no fixed order, so a ``discrepancy/*`` glob with a summary
would apply to some runs and not to others. A name defined exactly always wins, so each name is defined as soon
as a hook sees it (:meth:`RunDashboard._define_new_metrics`), before it reaches W&B; the step timings, which the
module logs after the callbacks' hook, are known in advance and defined at fit start. Other names first logged by
a LightningModule hook that runs after the callbacks' (the task metrics of ``on_validation_epoch_end``) are
defined one logging step late: their first value still gets the step axis, from Lightning's ``*``, but stays out
of their summary.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_kd.datamodules.glue_metrics import TaskMetrics
from lightning_kd.datamodules.glue_tasks import TASKS
from lightning_kd.pruning.callback import PruningCallback
from lightning_kd.training.lightning_internals import logs_this_step
from lightning_kd.training.timing import METRICS as STEP_METRICS

if TYPE_CHECKING:
    import matplotlib.figure

log = logging.getLogger(__name__)

# Lightning's WandbLogger adds this to every row it logs and defines it as the x axis of "*".
STEP_METRIC = "trainer/global_step"

# Metric name (an entry ending in "/" is a prefix) -> W&B summary; the first match wins. Task scores (higher is
# better) are recognised from the module's TaskMetrics, before these rules.
SUMMARIES: tuple[tuple[str, str], ...] = (
    ("discrepancy/", "min,last"),
    ("val/discrepancy/", "min,last"),
    ("width/", "min"),  # widths only shrink: the minimum is the final width
    ("params", "min"),
    ("train/", "min,last"),
    ("val/", "min,last"),  # val/loss and the terms
    ("throughput/", "max,mean"),
    ("time/", "mean"),
)
HIGHER_IS_BETTER = "max,last"

# The summary plot's panels, top to bottom (which names each draws: `_panel_lines`).
PLOT_PANELS = ("discrepancy", "width", "loss", "validation")


def _has_wandb(trainer: L.Trainer) -> bool:
    return any(isinstance(logger, WandbLogger) for logger in trainer.loggers)


def metric_summary(name: str, higher_is_better: Sequence[str] = ()) -> str | None:
    """The W&B summary for metric ``name`` (``"min,last"``, ...), or ``None`` for names outside the panels.

    ``higher_is_better``: prefixes of scores to maximise (``val/<task>/`` for a GLUE task's metrics).
    """
    if any(name.startswith(prefix) for prefix in higher_is_better):
        return HIGHER_IS_BETTER
    for pattern, summary in SUMMARIES:
        if name == pattern or (pattern.endswith("/") and name.startswith(pattern)):
            return summary
    return None


def events_table(events: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """A PruningCallback's events as table columns and rows: ``step``, the kinds it prunes, ``params``."""
    kinds = [kind for kind in ("heads", "ffn", "hidden") if any(kind in event for event in events)]
    columns = ["step", *kinds, "params"]
    return columns, [[event.get(column) for column in columns] for event in events]


class RunDashboard(L.Callback):
    """Organises a run's metrics for W&B and draws them without it (see the module docstring).

    Args:
        plot: file name of the summary plot, written at the end of fit into the CSVLogger's log folder (next to
            ``metrics.csv``); ``None`` draws nothing. Needs a CSVLogger; the ``lightning-kd`` CLI adds one.
        events_key: the W&B key of the pruning events table.

    Put it after callbacks that log (the CLI appends it): a name logged by a later callback in the same hook is
    defined one logging step late.
    """

    def __init__(self, plot: str | None = "summary.png", events_key: str = "pruning/events") -> None:
        self.plot = plot
        self.events_key = events_key
        self.plot_path: Path | None = None
        self._defined: set[str] = set()
        self.higher_is_better: tuple[str, ...] = ()
        self._events_logged: dict[int, int] = {}

    # ------------------------------------------------------------------------------------------ W&B metrics

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.higher_is_better = tuple(
            f"{metrics.prefix}/{metrics.task}/"
            for metrics in pl_module.modules()
            if isinstance(metrics, TaskMetrics)
        )
        if getattr(pl_module, "step_timer", None) is not None and _has_wandb(trainer):
            # logged by the module after the callbacks' hook, so defined now rather than one logging step late
            expected = sorted(set(STEP_METRICS) - self._defined)
            self._defined.update(expected)
            self._define(trainer, expected)
        self._define_new_metrics(trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Names only reach W&B on logging steps, and reading callback_metrics turns progress-bar values into
        # Python numbers (a device sync), which Lightning does on exactly those steps anyway.
        if logs_this_step(trainer):
            self._define_new_metrics(trainer)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._define_new_metrics(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._define_new_metrics(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._define_new_metrics(trainer)

    def _define_new_metrics(self, trainer: L.Trainer) -> None:
        """Define, in every W&B run, the names logged so far that have not been defined yet.

        ``callback_metrics`` already holds what this step logged, before Lightning hands it to the loggers.
        Every rank reads it, as Lightning's own callbacks do: at an epoch's end that computes the epoch-level
        values, with a collective sync for ``sync_dist`` ones, which rank zero alone would wait on forever.
        """
        if not _has_wandb(trainer):
            return
        names = sorted({*trainer.callback_metrics, *trainer.logged_metrics} - self._defined)
        self._defined.update(names)
        self._define(trainer, names)

    @rank_zero_only
    def _define(self, trainer: L.Trainer, names: Sequence[str]) -> None:
        runs = [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        runs = [run for run in runs if hasattr(run, "define_metric")]
        for name in names:
            summary = metric_summary(name, self.higher_is_better)
            if summary is None:
                continue
            for run in runs:
                run.define_metric(name, step_metric=STEP_METRIC, step_sync=True, summary=summary)

    # ------------------------------------------------------------------------------------------ events table

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once, at the end: a W&B table cannot grow, so logging it at every event would upload a growing copy of
        # it each time.
        self._log_events(trainer)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A stopped or failed run keeps the events it got to.
        self._log_events(trainer)

    @rank_zero_only
    def _log_events(self, trainer: L.Trainer) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        prunings = [callback for callback in trainer.callbacks if isinstance(callback, PruningCallback)]
        for index, pruning in enumerate(prunings):
            if not loggers or not pruning.events or self._events_logged.get(index) == len(pruning.events):
                continue
            columns, rows = events_table(pruning.events)
            key = self.events_key if len(prunings) == 1 else f"{self.events_key}_{index}"
            for logger in loggers:
                logger.log_table(key, columns=columns, data=rows, step=trainer.global_step)
            self._events_logged[index] = len(pruning.events)

    # ------------------------------------------------------------------------------------------ summary plot

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The loggers were finalised before on_fit_end, so metrics.csv holds every row by now.
        if self.plot is None:
            return
        csv_logger = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
        if csv_logger is None:
            rank_zero_warn(
                "RunDashboard draws its summary plot from a CSVLogger's metrics.csv, and this run has none: add "
                "lightning.pytorch.loggers.CSVLogger to trainer.logger (the lightning-kd CLI adds one), or set "
                "plot=None."
            )
            return
        metrics_file = Path(csv_logger.experiment.metrics_file_path)
        if not metrics_file.is_file():
            rank_zero_warn(f"no summary plot: {metrics_file} does not exist (nothing was logged).")
            return
        teacher, student = getattr(pl_module, "teacher", None), getattr(pl_module, "student", None)
        counts = [
            sum(p.numel() for p in m.parameters()) if isinstance(m, torch.nn.Module) else None
            for m in (teacher, student)
        ]
        self.plot_path = save_summary_plot(
            read_metrics_csv(metrics_file), metrics_file.parent / self.plot, *counts
        )
        log.info(
            f"summary plot (discrepancy, width, loss, validation against steps) saved to {self.plot_path.resolve()}"
        )


# ---------------------------------------------------------------------------------------------- the plot

Series = Mapping[str, Sequence[tuple[float, float]]]


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """A CSVLogger ``metrics.csv`` as ``{name: [(step, value), ...]}``, leaving out the cells a row did not log."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for name, value in row.items():
                if name in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(name, []).append((float(step), float(value)))
    return series


def _is_task_metric(name: str) -> bool:
    """``val/<task>/...`` (the student's official metrics) and ``val/teacher/<task>/...``; not the gap."""
    parts = name.split("/")
    return (
        len(parts) > 2
        and parts[0] == "val"
        and (parts[1] in TASKS or (parts[1] == "teacher" and parts[2] in TASKS))
    )


def _panel_lines(
    series: Series, teacher_params: int | None = None, student_params: int | None = None
) -> dict[str, list[tuple[str, list[float], list[float], dict[str, Any]]]]:
    """Per panel: (label, steps, values, line style) for each line, in drawing order."""

    def line(name: str, label: str | None = None, scale: float = 1.0, **style: Any) -> tuple:
        steps, values = zip(*series[name], strict=True)
        if len(steps) == 1:  # one point draws no line
            style = {"marker": "o", **style}
        return label or name, list(steps), [v * scale for v in values], style

    names = sorted(series)
    panels: dict[str, list] = {title: [] for title in PLOT_PANELS}
    for name in names:
        if name.startswith("discrepancy/hidden/layer_"):
            panels["discrepancy"].append(line(name, linewidth=0.8, alpha=0.5))
        elif name.startswith("discrepancy/"):
            panels["discrepancy"].append(line(name, linewidth=2.0))
        elif name.startswith("width/"):
            panels["width"].append(line(name))
    if "params" in series and series["params"]:
        # a share of the teacher's size (else of the starting size), so it reads on the same axis as the widths
        base = teacher_params or series["params"][0][1]
        label = f"params / teacher ({base:,.0f})" if teacher_params else f"params / {base:,.0f}"
        panels["width"].append(line("params", label, 1.0 / base if base else 1.0, color="black"))
    elif teacher_params and student_params:
        steps = sorted({step for values in series.values() for step, _ in values})
        if steps:
            ratio = student_params / teacher_params
            panels["width"].append(
                (
                    f"params / teacher ({teacher_params:,.0f})",
                    [steps[0], steps[-1]],
                    [ratio, ratio],
                    {"color": "black"},
                )
            )
    if "train/loss" in series:
        panels["loss"].append(line("train/loss", linewidth=2.0, color="black"))
    for name in names:
        if name.startswith("train/") and name != "train/loss":
            panels["loss"].append(line(name))
    for name in names:
        if name == "val/loss" or name.startswith("val/loss/"):
            panels["loss"].append(line(name, linestyle="--", marker="o"))
    for name in names:
        if _is_task_metric(name):
            teacher = name.startswith("val/teacher/")
            panels["validation"].append(line(name, linestyle="--" if teacher else "-", marker="o"))
    return {title: lines for title, lines in panels.items() if lines}


def summary_figure(
    series: Series, teacher_params: int | None = None, student_params: int | None = None
) -> matplotlib.figure.Figure:
    """One panel each for the discrepancy, the width (and parameters, as a share of the teacher's when
    ``teacher_params`` is given, else of the start), the loss (``train/loss``, its terms, ``val/loss``) and the
    validation metrics (the student's solid, the teacher's dashed) against steps; panels with nothing logged are
    left out."""
    panels = _panel_lines(series, teacher_params, student_params)
    # imported here: matplotlib costs a second at import, and only the end of a run draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.0 * max(len(panels), 1)), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever pyplot's backend is
    axes = figure.subplots(max(len(panels), 1), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].set_title("nothing logged")
        return figure
    for ax, (title, lines) in zip(axes, panels.items(), strict=True):
        for label, steps, values, style in lines:
            ax.plot(steps, values, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "loss" and all(v > 0 and math.isfinite(v) for _, _, values, _ in lines for v in values):
            ax.set_yscale("log")  # terms of very different sizes share the panel
        ax.legend(fontsize="x-small", ncol=2 if len(lines) > 6 else 1)
    return figure


def save_summary_plot(
    series: Series,
    path: str | os.PathLike,
    teacher_params: int | None = None,
    student_params: int | None = None,
) -> Path:
    """Draw :func:`summary_figure` into a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary_figure(series, teacher_params, student_params).savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------- offline runs

_RUN_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_CHUNK_HEADER = struct.Struct("<IHB")  # CRC-32 of type byte + data, data length, chunk type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_run_records(path: str | os.PathLike) -> Iterator[Any]:
    """The records of a W&B run file (``wandb/offline-run-*/run-<id>.wandb``), as
    ``wandb.proto.wandb_internal_pb2.Record`` messages: ``history``, ``summary``, ``metric``, ``config``, ...

    wandb 0.31 ships no reader of its own (``wandb sync`` replays the file in the Go core), so this reads the
    format directly: a 7-byte file header, then LevelDB-log chunks in 32 KiB blocks, each record a protobuf. A
    chunk cut short (a run still writing) ends the iteration.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = _RUN_FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(
            f"{path} is not a W&B run file this reader knows (header {ident!r}, {magic:#x}, {version})."
        )
    position, pending = _RUN_FILE_HEADER.size, b""
    while position + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # the writer pads a block's tail that cannot hold a header
            position += left_in_block
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        if kind == 0 and length == 0:  # zero padding up to the block's end
            position += left_in_block
            continue
        start = position + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: corrupt chunk at byte {position}.")
        position = start + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
