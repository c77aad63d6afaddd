"""The video-blend example: its data and motion measure, and a smoke run of the real entry point."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from examples.video_blend.data import MovingShapes, VideoClipDataModule
from examples.video_blend.model import SpatialResBlock, VideoAttentionBlock, VideoDenoiser, VideoResBlock, VideoUNet
from examples.video_blend.report import centres_of_mass, motion_stats
from lightning_ldm import get_obj_from_str
from lightning_ldm.callbacks import GradientCheckpointing

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ data
def test_items_are_deterministic_and_in_range() -> None:
    a, b = MovingShapes(32, seed=3), MovingShapes(32, seed=3)
    for index in (0, 7, 31):
        assert torch.equal(a[index]["video"], b[index]["video"])
    assert not torch.equal(a[0]["video"], MovingShapes(32, seed=4)[0]["video"])
    item = a[5]
    assert item["video"].shape == (8, 1, 16, 16) and item["video"].dtype == torch.float32
    assert item["image_only_indicator"].shape == (8,) and item["image_only_indicator"].dtype == torch.bool
    assert float(item["video"].min()) >= -1.0 and float(item["video"].max()) <= 1.0


def test_still_items_repeat_one_frame_and_are_flagged() -> None:
    stills = MovingShapes(16, still_fraction=1.0, channels=3, size=24, frames=6)
    videos = MovingShapes(16, still_fraction=0.0)
    for index in range(4):
        still = stills[index]
        assert bool(still["image_only_indicator"].all())
        assert torch.equal(still["video"], still["video"][:1].expand_as(still["video"]))
        video = videos[index]
        assert not bool(video["image_only_indicator"].any())
        assert not torch.equal(video["video"][0], video["video"][-1])  # the shape moved


def test_moving_shape_keeps_its_speed() -> None:
    # speed drawn in [max_speed / 2, max_speed]; the centre of mass of the anti-aliased shape follows the true centre
    # to a fraction of a pixel (pixel-grid error of the soft edges), and a bounce only shortens a step
    clips = torch.stack([MovingShapes(64, still_fraction=0.0, max_speed=1.0)[i]["video"] for i in range(64)])
    centres, mass = centres_of_mass(clips)
    steps = (centres[:, 1:] - centres[:, :-1]).norm(dim=-1)
    assert float(steps.max()) <= 1.0 + 0.1
    assert float(steps.median()) >= 0.5
    assert float((mass.std(dim=1) / mass.mean(dim=1)).max()) < 0.03  # one rigid shape, fully inside the frame


def test_data_module_validation_set_is_video_only() -> None:
    data = VideoClipDataModule(num_train=32, num_val=8, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    assert batch["video"].shape == (4, 8, 1, 16, 16)
    assert not bool(batch["image_only_indicator"].any())
    train = next(iter(data.train_dataloader()))
    assert train["image_only_indicator"].shape == (4, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length": 0}, "length must be an integer >= 1, got 0"),
        ({"length": 4, "frames": 1}, "frames must be an integer >= 2, got 1"),
        ({"length": 4, "still_fraction": 1.5}, r"still_fraction must lie in \[0, 1\], got 1.5"),
        ({"length": 4, "max_speed": -1.0}, "max_speed must be >= 0, got -1.0"),
    ],
)
def test_bad_data_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MovingShapes(**kwargs)


# ----------------------------------------------------------------------------------------------------------- network
def _randomised(net: VideoUNet, seed: int = 0) -> VideoUNet:
    """Give every parameter (zero-initialised output layers included) random values, so every path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if not name.endswith("mix_factor"):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return net


def _clips(batch: int = 2, frames: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_spatial_only_network_treats_frames_independently() -> None:
    net = _randomised(VideoUNet(width=16, spatial_only=True)).eval()
    x, t = _clips(), torch.tensor([10, 700])
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = net(x, t)
        out_permuted = net(x[:, order], t)
    torch.testing.assert_close(out_permuted, out[:, order], rtol=1e-5, atol=1e-6)


def test_blended_network_mixes_frames_of_videos_but_not_of_still_images() -> None:
    net = _randomised(VideoUNet(width=16)).eval()
    x, t = _clips(), torch.tensor([10, 700])
    changed = x.clone()
    changed[:, 0] += 1.0
    video = torch.zeros(2, 4, dtype=torch.bool)
    with torch.no_grad():
        delta_video = (net(changed, t, video) - net(x, t, video))[:, 1:].abs().max()
        delta_still = (net(changed, t, ~video) - net(x, t, ~video))[:, 1:].abs().max()
    assert float(delta_video) > 1e-3  # frame 0 reaches the other frames through the temporal path
    assert float(delta_still) < 1e-6  # still images: spatial path only


def test_still_images_get_exactly_the_spatial_only_output() -> None:
    blended = _randomised(VideoUNet(width=16)).eval()
    baseline = VideoUNet(width=16, spatial_only=True).eval()
    weights = {k: v for k, v in blended.state_dict().items() if not k.endswith("mix_factor")}
    missing, unexpected = baseline.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["attention.blender.mix_factor", "in_block.blender.mix_factor",
                               "out_block.blender.mix_factor"] and not unexpected  # fmt: skip
    x, t = _clips(), torch.tensor([10, 700])
    still = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(blended(x, t, still), baseline(x, t, still))
        assert not torch.equal(blended(x, t, ~still), baseline(x, t, ~still))


def _config(name: str = "config.yaml") -> dict:
    return yaml.safe_load((ROOT / "examples" / "video_blend" / name).read_text())


def _callback_spec(config: dict, suffix: str) -> dict:
    (spec,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(suffix)]
    return spec


def _configured_checkpointed_types() -> list[type]:
    paths = _callback_spec(_config(), "GradientCheckpointing")["init_args"]["modules"]
    return [get_obj_from_str(path) for path in paths]


@pytest.mark.parametrize(
    ("modules", "recomputed"),
    [
        (None, {"res": 0, "attention": 2}),  # config.yaml's choice: the attention block (its two attentions)
        ([VideoResBlock, VideoAttentionBlock], {"res": 2, "attention": 2}),  # every block, as the README says
    ],
)
def test_gradient_checkpointing_callback_recomputes_the_blocks_and_keeps_the_gradients(
    modules: list[type] | None, recomputed: dict[str, int]
) -> None:
    callback = GradientCheckpointing(modules=modules or _configured_checkpointed_types())

    def gradients(checkpointed: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        torch.manual_seed(0)
        model = VideoDenoiser(width=16, parameterization="v")
        _randomised(model.net)
        calls = {"res": 0, "attention": 0}

        def counter(kind: str) -> Callable[..., None]:
            def count(*_: object) -> None:
                calls[kind] += 1

            return count

        for module in model.modules():
            if isinstance(module, SpatialResBlock):
                module.in_layers.register_forward_hook(counter("res"))
            if isinstance(module, VideoAttentionBlock):
                for attention in (module.spatial, module.temporal):
                    attention.qkv.register_forward_hook(counter("attention"))
        if checkpointed:
            callback.on_fit_start(None, model)  # type: ignore[arg-type]  # the trainer is not used
        x = _clips()
        loss = model.diffusion_loss(
            x, {"image_only_indicator": torch.tensor([[False] * 4, [True] * 4])},
            t=torch.tensor([5, 900]), noise=torch.ones_like(x),
        )  # fmt: skip
        loss.backward()
        if checkpointed:
            callback.on_fit_end(None, model)  # type: ignore[arg-type]
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert plain_calls == {"res": 2, "attention": 2}  # two spatial res blocks, one spatial and one temporal attention
    assert checkpointed_calls == {kind: plain_calls[kind] + recomputed[kind] for kind in plain_calls}
    assert plain.keys() == checkpointed.keys() and "net.in_block.blender.mix_factor" in plain
    for name in plain:  # the recomputation repeats the same kernels on the same inputs: the same bits
        assert torch.equal(checkpointed[name], plain[name]), name


def test_quick_config_differs_from_the_main_config_only_where_it_must() -> None:
    """quick.yaml repeats the callback list (a list replaces the earlier one whole): it must not drift from config.yaml.

    Its EMA must start before its last step, or Lightning swaps the never-updated average (the untrained model) in.
    """
    main, quick = _config(), _config("quick.yaml")
    assert quick["trainer"]["max_steps"] == 50 and set(quick) == {"trainer"} and set(quick["trainer"]) == {
        "max_steps", "callbacks"}  # fmt: skip
    assert _callback_spec(quick, "EMAWeightAveraging")["init_args"]["update_starting_at_step"] < 50
    changed = {
        "EMAWeightAveraging": {"decay": 0.9, "update_starting_at_step": 10},
        "TimestepLossMonitor": {"log_every_n_steps": 25},
        "SampleLogger": {"every_n_steps": 25},
    }
    assert [c["class_path"] for c in quick["trainer"]["callbacks"]] == [
        c["class_path"] for c in main["trainer"]["callbacks"]
    ]
    for mine, theirs in zip(quick["trainer"]["callbacks"], main["trainer"]["callbacks"], strict=True):
        expected = {**theirs["init_args"], **changed.get(theirs["class_path"].rsplit(".", 1)[-1], {})}
        assert mine["init_args"] == expected, theirs["class_path"]


# -------------------------------------------------------------------------------------------------- motion measure
def test_motion_measure_separates_moving_shapes_from_independent_frames() -> None:
    data = MovingShapes(128, still_fraction=0.0, seed=11)
    clips = torch.stack([data[i]["video"] for i in range(128)])
    coherent = motion_stats(clips)
    # frame k of clip i taken from clip (i + k·37) mod N: every frame is a real shape, but frames are unrelated
    index = (torch.arange(128)[:, None] + 37 * torch.arange(8)[None, :]) % 128
    shuffled = clips[index, torch.arange(8)[None, :]]
    independent = motion_stats(shuffled)
    noise = motion_stats(torch.randn(16, 8, 1, 16, 16).clamp(-1, 1))

    assert coherent["shape_frames"] == 1.0 and independent["shape_frames"] == 1.0
    assert coherent["velocity_consistency"] > 0.85  # < 1 only where a bounce splits a step
    assert independent["velocity_consistency"] < 0.35
    assert coherent["frame_correlation"] > 0.6 > independent["frame_correlation"]
    assert coherent["area_variation"] < 0.05
    assert noise["shape_frames"] == 0.0 and noise["velocity_consistency"] == 0.0 and math.isnan(noise["mean_speed"])


def test_motion_measure_refuses_short_clips() -> None:
    with pytest.raises(ValueError, match=r"clips must have shape \(N, T >= 3, C, H, W\), got \(2, 2, 1, 8, 8\)"):
        motion_stats(torch.zeros(2, 2, 1, 8, 8))


# ------------------------------------------------------------------------------------------------------ smoke run
def test_example_runs_end_to_end(tmp_path: Path) -> None:
    """`python -m examples.video_blend.train --config ... <overrides>`: both models, evaluation, samples, outputs."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "examples.video_blend.train",
        "--config", "examples/video_blend/config.yaml",
        "--run_dir", str(run_dir),
        "--trainer.max_steps", "4",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.width", "16",
        "--model.eval_timesteps", "[100, 900]",
        "--data.frames", "4",
        "--data.num_train", "32",
        "--data.num_val", "4",
        "--data.batch_size", "4",
        "--report.num_samples", "4",
        "--report.num_shown", "2",
        "--report.ddim_steps", "2",
        "--report.data_reference_clips", "4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]

    for name in ("samples.gif", "samples.png", "training.png", "summary.txt", "summary.json"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    for variant in ("blended", "spatial_only"):
        assert (run_dir / variant / "metrics.csv").is_file()

    summary = json.loads((run_dir / "summary.json").read_text())
    models = summary["models"]
    assert set(models) == {"blended", "spatial_only"}
    for result in models.values():
        assert result["steps"] == 4
        assert math.isfinite(result["val_loss"]) and result["val_loss"] > 0
        assert sorted(result["val_loss_by_t"]) == ["100", "900"]
        assert all(math.isfinite(v) for v in result["val_loss_by_t"].values())
        assert 0.0 <= result["motion"]["velocity_consistency"] <= 1.0
        assert len(result["alphas"]) == 3
    assert all(alpha == 1.0 for alpha in models["spatial_only"]["alphas"].values())
    assert all(0.0 < alpha < 1.0 for alpha in models["blended"]["alphas"].values())
    comparison = summary["comparison"]
    assert math.isfinite(comparison["val_loss_reduction_percent"])
    assert all(math.isfinite(v) and v >= 0 for v in summary["wall_seconds"].values())

    from PIL import Image

    with Image.open(run_dir / "samples.gif") as gif:
        assert gif.n_frames == 4  # one GIF frame per video frame
    assert "velocity consistency" in (run_dir / "summary.txt").read_text()
