"""Train the video-blend example, then the same network spatial-only, then compare, sample and report.

One command (what ``make example`` runs)::

    python -m examples.video_blend.train --config examples/video_blend/config.yaml

Every setting is a LightningCLI option and can be overridden on the command line, e.g.
``--trainer.max_steps 50``, ``--trainer.precision bf16-mixed``, ``--trainer.devices 2 --trainer.strategy ddp``,
``--model.channels 48``, ``--data.frames 6``, ``--run_dir runs/mine``, ``--compare_baseline false``.

What happens:

1. LightningCLI builds the :class:`~examples.video_blend.model.VideoDenoiser` (blenders learned), the data module
   and a Trainer with the callbacks of the config (``ScheduleCallback``, ``TimestepLossMonitor``,
   ``AlphaBlenderMonitor``, ``EMAWeightAveraging``, optionally ``GradientCheckpointing``); ``trainer.fit`` trains it.
2. The same configuration with ``model.spatial_only=true`` (every blender fixed at α = 1) is built and trained with
   the same seed, data and number of steps.
3. Both (with their EMA weights) are evaluated on the video-only validation clips at a fixed timestep grid with fixed
   noise, and sampled with DDIM from the same starting noise; a motion measure compares the samples with the data.
4. The run folder receives ``samples.gif``, ``samples.png``, ``training.png``, ``summary.txt`` and ``summary.json``
   (and each model's ``metrics.csv``, ``config.yaml`` and checkpoint under ``blended/`` and ``spatial_only/``).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import Tensor

from examples.video_blend.data import VideoClipDataModule
from examples.video_blend.model import VideoDenoiser
from examples.video_blend.report import (
    motion_stats,
    plot_training,
    read_metrics,
    write_frame_strip,
    write_summary,
)
from lightning_ldm import AlphaBlender
from lightning_ldm.media import write_labelled_gif

log = logging.getLogger("examples.video_blend")


@dataclass
class ReportOptions:
    """What to sample and draw after training.

    Args:
        num_samples: Clips sampled per model for the motion measure.
        num_shown: Clips per row in the GIF.
        ddim_steps: DDIM steps.
        ddim_method: DDIM timestep spacing.
        eta: DDIM η (0: deterministic).
        sample_seed: Seed of the starting noise (the same for every model).
        data_reference_clips: Training video clips measured for the motion reference.
        frame_ms: Duration of a GIF frame.
        scale: Pixel upscaling in the GIF.
    """

    num_samples: int = 32
    num_shown: int = 6
    ddim_steps: int = 50
    ddim_method: Literal["uniform", "quad", "linspace", "trailing"] = "uniform"
    eta: float = 0.0
    sample_seed: int = 0
    data_reference_clips: int = 256
    frame_ms: int = 150
    scale: int = 4


class VideoBlendCLI(LightningCLI):
    """LightningCLI with the example's own options (run folder, baseline, report) and a CSV logger per model."""

    run_dir: Path

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--run_dir``, ``--compare_baseline``, ``--torch_threads`` and ``--report.*``; link data → model."""
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Folder of the outputs (default: runs/video_blend/<date-time>).",
        )
        parser.add_argument(
            "--compare_baseline",
            type=bool,
            default=True,
            help="Also train the spatial-only baseline (blenders fixed at alpha = 1) and compare.",
        )
        parser.add_argument(
            "--torch_threads",
            type=int | None,
            default=None,
            help="torch.set_num_threads for CPU runs (None: torch's default).",
        )
        parser.add_class_arguments(ReportOptions, "report")
        parser.link_arguments("data.channels", "model.in_channels")

    def before_instantiate_classes(self) -> None:
        """Fix the run folder and the CPU threads before anything is built."""
        if self.config.get("torch_threads"):
            torch.set_num_threads(int(self.config["torch_threads"]))
        run_dir = self.config.get("run_dir") or f"runs/video_blend/{datetime.now():%Y%m%d-%H%M%S}"
        self.config["run_dir"] = run_dir
        self.run_dir = Path(run_dir)

    @property
    def variant(self) -> str:
        """``"spatial_only"`` or ``"blended"``, from the model configuration."""
        return "spatial_only" if self.config["model"]["spatial_only"] else "blended"

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer with a ``CSVLogger`` in ``<run_dir>/<variant>/`` first (the report reads its CSV)."""
        configured = self._get(self.config_init, "trainer", default={}).get("logger")
        extra: list[Logger] = []
        if isinstance(configured, Logger):
            extra = [configured]
        elif isinstance(configured, list):
            extra = list(configured)
        csv = CSVLogger(self.run_dir, name=self.variant, version="")
        kwargs.setdefault("logger", [csv, *extra])
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        return super().instantiate_trainer(**kwargs)

    def rebuild(self, *, spatial_only: bool) -> None:
        """Build model, data and Trainer again from the same configuration with another ``model.spatial_only``."""
        self.config["model"]["spatial_only"] = spatial_only
        seed = self.config.get("seed_everything")
        if seed is not False:
            seed_everything(seed, workers=True)
        self.instantiate_classes()


def _final_alphas(model: torch.nn.Module) -> dict[str, float]:
    """α of video frames for every blender (1.0 for the fixed ones)."""
    video_frame = torch.zeros(1, 1, dtype=torch.bool)
    alphas = {}
    for name, module in model.named_modules():
        if isinstance(module, AlphaBlender):
            alpha = module.get_alpha(video_frame.to(module.mix_factor.device))
            alphas[name] = float(alpha.detach().float().reshape(-1)[0])
    return alphas


def _sample(model: VideoDenoiser, data: VideoClipDataModule, options: ReportOptions) -> Tensor:
    """DDIM samples ``(N, T, C, H, W)`` from the same starting noise for every model (EMA weights after fit)."""
    hp = data.hparams
    shape = (options.num_samples, hp["frames"], hp["channels"], hp["size"], hp["size"])
    generator = torch.Generator().manual_seed(options.sample_seed)
    video = torch.zeros(shape[:2], dtype=torch.bool, device=model.device)
    samples = model.sample(
        shape,
        num_steps=options.ddim_steps,
        method=options.ddim_method,
        eta=options.eta,
        generator=generator,
        cond={"image_only_indicator": video},
    )
    assert isinstance(samples, Tensor)  # return_intermediates=False
    return samples.float().cpu().clamp(-1.0, 1.0)


def _train_and_evaluate(cli: VideoBlendCLI, options: ReportOptions) -> dict[str, Any]:
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    assert isinstance(model, VideoDenoiser) and isinstance(data, VideoClipDataModule)
    log.info("training the %s model for %s steps", cli.variant, trainer.max_steps)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - start_cpu  # CPU time of this process: what other processes don't change

    start = time.perf_counter()
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    eval_seconds = time.perf_counter() - start

    start = time.perf_counter()
    samples = _sample(model, data, options)
    sample_seconds = time.perf_counter() - start

    val_by_t = {int(key.split("t=")[-1]): float(value) for key, value in metrics.items() if "/t=" in key}
    return {
        "val_loss": float(metrics["val/loss/mean"]),
        "val_loss_by_t": val_by_t,
        "motion": motion_stats(samples),
        "alphas": _final_alphas(model),
        "steps": int(trainer.global_step),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "eval_seconds": eval_seconds,
        "sample_seconds": sample_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples": samples,
        "log_dir": str(cli.run_dir / cli.variant),
    }


def _training_clips(data: VideoClipDataModule, count: int) -> Tensor:
    """The first ``count`` moving (not still) clips of the training set."""
    clips = []
    for index in range(len(data.train_set)):
        item = data.train_set[index]
        if not bool(item["image_only_indicator"].any()):
            clips.append(item["video"])
            if len(clips) == count:
                break
    return torch.stack(clips)


def main(args: ArgsType = None) -> dict[str, Any]:
    """Run the example; return the summary (also written to ``<run_dir>/summary.json``).

    Args:
        args: Command-line style arguments (``None``: ``sys.argv[1:]``); a leading ``fit`` is accepted and ignored.

    Returns:
        The summary dictionary.
    """
    started = time.perf_counter()
    if args is None and sys.argv[1:2] == ["fit"]:
        del sys.argv[1]  # `make example` may pass LightningCLI's usual subcommand; this script only fits
    elif isinstance(args, list) and args[:1] == ["fit"]:
        args = args[1:]
    cli = VideoBlendCLI(
        VideoDenoiser,
        VideoClipDataModule,
        run=False,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train the video-blend example (blended model, then spatial-only baseline)."},
    )
    options = ReportOptions(**cli.config["report"])
    setup_seconds = time.perf_counter() - started
    run_dir = cli.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    asked_spatial_only = bool(cli.config["model"]["spatial_only"])
    results: dict[str, dict[str, Any]] = {}
    results[cli.variant] = _train_and_evaluate(cli, options)
    data = cli.datamodule
    if cli.config["compare_baseline"] and not asked_spatial_only:
        cli.rebuild(spatial_only=True)
        results[cli.variant] = _train_and_evaluate(cli, options)
    assert isinstance(data, VideoClipDataModule)
    if not cli.trainer.is_global_zero:  # under DDP every rank trains; rank zero writes the outputs
        return {}

    start = time.perf_counter()
    reference = _training_clips(data, max(options.data_reference_clips, options.num_shown))
    data_motion = motion_stats(reference)
    metrics = {name: read_metrics(Path(result["log_dir"]) / "metrics.csv") for name, result in results.items()}
    for name, series in metrics.items():
        losses = [value for _, value in series.get("train/loss", [])][-50:]
        results[name]["train_loss_end"] = sum(losses) / len(losses) if losses else float("nan")
    rows = {"training clips": reference[: options.num_shown]}
    rows.update({name: result["samples"][: options.num_shown] for name, result in results.items()})
    gif = write_labelled_gif(run_dir / "samples.gif", rows, scale=options.scale, frame_ms=options.frame_ms)
    strip = write_frame_strip(run_dir / "samples.png", rows)
    figure = plot_training(
        run_dir / "training.png", metrics, {name: result["val_loss_by_t"] for name, result in results.items()}
    )
    output_seconds = time.perf_counter() - start

    comparison: dict[str, Any] = {}
    if "blended" in results and "spatial_only" in results:
        blended, baseline = results["blended"], results["spatial_only"]
        comparison = {
            "val_loss_blended": blended["val_loss"],
            "val_loss_spatial_only": baseline["val_loss"],
            "val_loss_reduction_percent": 100.0 * (1.0 - blended["val_loss"] / baseline["val_loss"]),
            "velocity_consistency_blended": blended["motion"]["velocity_consistency"],
            "velocity_consistency_spatial_only": baseline["motion"]["velocity_consistency"],
            "velocity_consistency_data": data_motion["velocity_consistency"],
            "temporal_path_helps": bool(blended["val_loss"] < baseline["val_loss"]),
        }
    wall = {"setup": setup_seconds}
    for name, result in results.items():
        wall[f"train_{name}"] = result["train_seconds"]
        wall[f"eval_{name}"] = result["eval_seconds"]
        wall[f"sample_{name}"] = result["sample_seconds"]
    wall["training_total"] = sum(result["train_seconds"] for result in results.values())
    wall["outputs"] = output_seconds
    wall["total"] = time.perf_counter() - started
    summary = {
        "run_dir": str(run_dir),
        "models": {
            name: {key: value for key, value in result.items() if key != "samples"} for name, result in results.items()
        },
        "data_motion": data_motion,
        "comparison": comparison,
        "wall_seconds": wall,
        "settings": {
            "trainer": {
                key: cli.config["trainer"].get(key)
                for key in ("max_steps", "precision", "accelerator", "devices", "strategy")
            },
            "model": {**dict(cli.config["model"]), "spatial_only": asked_spatial_only},  # the baseline flips it
            "data": dict(cli.config["data"]),
            "report": asdict(options),
            "torch_threads": torch.get_num_threads(),
        },
        "files": {"gif": str(gif), "frames": str(strip), "figure": str(figure)},
    }
    json_path, text_path = write_summary(run_dir, _jsonable(summary))
    log.info("%s", text_path.read_text())
    log.info("outputs in %s: %s, %s, %s, %s", run_dir, gif.name, strip.name, figure.name, json_path.name)
    return summary


def _jsonable(value: Any) -> Any:
    """Turn Namespaces, tuples and paths into JSON types."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


if __name__ == "__main__":
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    main()
