"""The log-SNR curve of a schedule as artifacts: a CSV file, a matplotlib figure, a TensorBoard figure."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_ldm.callbacks._diffusion import logger_directory

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CSV_NAME", "PNG_NAME", "TAG", "log_snr_figure", "write_curve", "write_log_snr_csv"]

TAG = "schedule/log_snr"
CSV_NAME = "log_snr.csv"
PNG_NAME = "log_snr.png"


def write_log_snr_csv(directory: str, log_snr: Tensor) -> str:
    """Write ``t,log_snr`` rows (``t = 0 … T − 1``; values as Python's ``repr``, so float64 round-trips exactly).

    Args:
        directory: Created if missing.
        log_snr: Shape ``(T,)``.

    Returns:
        The path of the file, ``{directory}/log_snr.csv``.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CSV_NAME)
    with open(path, "w") as f:
        f.write("t,log_snr\n")
        f.writelines(f"{t},{value!r}\n" for t, value in enumerate(log_snr.tolist()))
    return path


def log_snr_figure(log_snr: Tensor) -> Figure | None:
    """A matplotlib figure of log-SNR against ``t``, or ``None`` (with a warning) when matplotlib is not installed.

    Built with ``matplotlib.figure.Figure`` directly: no pyplot state, no GUI backend.

    Args:
        log_snr: Shape ``(T,)``.

    Returns:
        The figure, or ``None``.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        rank_zero_warn("matplotlib is not installed: the log-SNR curve is written as log_snr.csv only, no figure")
        return None
    figure = Figure(figsize=(5.0, 3.5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(range(log_snr.numel()), log_snr.tolist())
    ax.set_xlabel("timestep t")
    ax.set_ylabel("log SNR = log(ā / (1 - ā))")
    ax.set_title("noise schedule")
    ax.grid(True, alpha=0.3)
    return figure


def write_curve(logger: Logger, log_snr: Tensor) -> None:
    """Write the curve for one logger: TensorBoard gets a figure, a logger with a directory a PNG; both get the CSV.

    Loggers without a local directory (and not TensorBoard) get nothing.

    Args:
        logger: A Lightning logger.
        log_snr: Shape ``(T,)``.
    """
    directory = logger_directory(logger)
    if directory is not None:
        write_log_snr_csv(directory, log_snr)
    if not isinstance(logger, TensorBoardLogger) and directory is None:
        return
    figure = log_snr_figure(log_snr)
    if figure is None:
        return
    if isinstance(logger, TensorBoardLogger):
        experiment: Any = logger.experiment
        experiment.add_figure(TAG, figure, global_step=0, close=False)
    elif directory is not None:
        figure.savefig(os.path.join(directory, PNG_NAME), dpi=100)
