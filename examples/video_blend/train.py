"""Train the video-blend example: LightningCLI, the ``VideoDenoiser``, its data module and the callbacks of the config.

One command (what ``make example`` runs)::

    python -m examples.video_blend.train --config examples/video_blend/config.yaml

Every setting is a LightningCLI option and can be overridden on the command line, e.g.
``--trainer.precision bf16-mixed``, ``--trainer.devices 2 --trainer.strategy ddp``, ``--model.width 48``,
``--data.frames 6``, ``--run_dir runs/mine``, ``--compare_baseline false``; ``--config
examples/video_blend/quick.yaml`` after the main config is a 50-step run (its EMA starts at step 10).

This file is the template to copy: LightningCLI builds the :class:`~examples.video_blend.model.VideoDenoiser`
(a ``DiffusionMixin`` LightningModule), the :class:`~examples.video_blend.data.VideoClipDataModule` and a Trainer
with the library's callbacks, all named in ``config.yaml``:

* ``DiffusionSeedCallback``: seeded timesteps and noise, per rank and per batch;
* ``TimestepLossMonitor``: the training loss by timestep bucket and the log-SNR curve;
* ``AlphaBlenderMonitor``: each ``AlphaBlender``'s α;
* Lightning's ``EMAWeightAveraging``: evaluation and sampling use the averaged weights;
* ``SampleLogger``: sample clips from the EMA weights every 200 steps;
* ``GradientCheckpointing``: the attention blocks recompute their activations in the backward pass, during fit only.

What a copy does not need is the research harness (:mod:`examples.video_blend.harness`): it fits the configured
model, then the same configuration with ``model.spatial_only=true`` (every blender fixed at α = 1) with the same
seed, data and steps, evaluates and samples both, and writes ``samples.gif``, ``samples.png``, ``training.png``,
``summary.txt`` and ``summary.json`` to the run folder (each model's ``metrics.csv``, ``config.yaml`` and
checkpoint go to ``blended/`` and ``spatial_only/``). Without the harness, ``main`` would end in
``cli.trainer.fit(cli.model, datamodule=cli.datamodule)``, or be ``LightningCLI(VideoDenoiser, VideoClipDataModule)``
with its ``fit`` subcommand.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser

from examples.video_blend.data import VideoClipDataModule
from examples.video_blend.harness import ExperimentCLI, run_experiment
from examples.video_blend.model import VideoDenoiser

__all__ = ["VideoBlendCLI", "main"]


class VideoBlendCLI(ExperimentCLI):
    """The harness's LightningCLI, with the one link this model needs: ``data.channels`` → ``model.in_channels``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the harness's options and link the data's channels to the model's."""
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.channels", "model.in_channels")


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
    return run_experiment(cli, started)


if __name__ == "__main__":
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("examples.video_blend")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    main()
