"""The latent-digits example: its data split, judge, denoiser wiring, and a tiny run of the real entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.latent_digits.autoencoder import DigitAutoencoder
from examples.latent_digits.classifier import DigitClassifier
from examples.latent_digits.data import DigitsDataModule, from_pixels, load_split, to_pixels
from examples.latent_digits.denoiser import LatentDenoiser
from examples.latent_digits.feature_net import (
    DigitFeatureNet,
    check_feature_digits,
    floor_indices,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from examples.latent_digits.report import class_spread, real_quality, save_grid
from examples.latent_digits.train import main
from lightning_ldm.first_stage import FirstStage

DIGITS_PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's load_digits


# ------------------------------------------------------------------------------------------------------------ data
def test_split_is_stratified_disjoint_and_seeded() -> None:
    split = load_split(0.2, seed=0)
    holdout_counts = np.bincount(split.holdout_labels.numpy(), minlength=10)
    train_counts = np.bincount(split.train_labels.numpy(), minlength=10)
    assert holdout_counts.tolist() == [round(0.2 * n) for n in DIGITS_PER_CLASS]
    assert (train_counts + holdout_counts).tolist() == DIGITS_PER_CLASS
    assert split.train_images.shape == (sum(train_counts), 1, 8, 8) and split.train_images.dtype == torch.float32
    assert float(split.train_images.min()) == -1.0 and float(split.train_images.max()) == 1.0
    # no held-out image is a training image (load_digits has no exact duplicates across these)
    train = {bytes(row) for row in to_pixels(split.train_images).astype(np.uint8)}
    assert not any(bytes(row) in train for row in to_pixels(split.holdout_images).astype(np.uint8))
    again, other = load_split(0.2, seed=0), load_split(0.2, seed=1)
    assert torch.equal(again.holdout_images, split.holdout_images)
    assert not torch.equal(other.holdout_images, split.holdout_images)


def test_pixel_conversion_round_trips_exactly() -> None:
    pixels = (np.arange(64, dtype=np.float64) % 17)[None]  # every load_digits level 0..16
    images = from_pixels(pixels)
    assert images.shape == (1, 1, 8, 8)
    assert float(images[0, 0, 0, 0]) == -1.0 and float(images[0, 0, 1, 0]) == 0.0 and float(images[0, 0, 2, 0]) == 1.0
    assert float(images[0, 0, 0, 1]) == -0.875
    np.testing.assert_array_equal(to_pixels(images), pixels)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_holdout_fraction_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match=rf"holdout_fraction must lie in \(0, 1\), got {fraction}"):
        load_split(fraction)


def test_bad_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size=2000 exceeds the 1438 training digits; use at most that"):
        DigitsDataModule(batch_size=2000)


def test_judge_reaches_its_ceiling_on_real_held_out_digits() -> None:
    split = load_split(0.2, seed=0)
    judge = DigitClassifier().fit(split.train_images, split.train_labels)
    assert judge.accuracy(split.holdout_images, split.holdout_labels) > 0.97
    # a blank image is not confidently any particular digit, but the judge must still return a valid label
    assert judge.predict(-torch.ones(3, 1, 8, 8)).shape == (3,)


def test_class_spread_is_the_mean_distance_to_the_class_mean() -> None:
    images = torch.zeros(20, 1, 8, 8)
    labels = torch.arange(10).repeat(2)
    images[10:, 0, 0, 0] = 2.0  # class c: one image at 0, one with a single pixel at 2 → both 1 from their mean
    assert class_spread(images, labels) == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------------- FID features
def test_floor_digits_are_per_class_draws_from_the_training_split() -> None:
    split = load_split(0.2, seed=0)
    floor = floor_indices(split.train_labels, per_class=50, seed=1234)
    assert floor.shape == (500,) and len(set(floor.tolist())) == 500
    assert np.bincount(split.train_labels[floor].numpy(), minlength=10).tolist() == [50] * 10
    assert torch.equal(floor, floor_indices(split.train_labels, per_class=50, seed=1234))
    assert not torch.equal(floor, floor_indices(split.train_labels, per_class=50, seed=1235))
    # the fewest training digits of a class: 174 - round(0.2 * 174) = 139 (class 8)
    with pytest.raises(ValueError, match=r"per_class=140 exceeds the 139 digits of class 8"):
        floor_indices(split.train_labels, per_class=140, seed=0)


def test_feature_net_learns_the_digits_and_its_body_gives_the_features() -> None:
    from lightning.pytorch import Trainer

    split = load_split(0.2, seed=0)
    torch.manual_seed(0)
    trainer = Trainer(
        max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    net = train_feature_net(trainer, split.train_images, split.train_labels, batch_size=128, seed=0, features=32)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.accuracy(split.holdout_images, split.holdout_labels) > 0.9  # ten classes: chance is 0.1
    with torch.no_grad():
        features = net.body(split.holdout_images[:5])
        assert features.shape == (5, 32) and bool((features >= 0).all())  # after the ReLU
        torch.testing.assert_close(net(split.holdout_images[:5]), net.head(features))
    # accuracy is measured without dropout, and leaves the mode as it found it
    expected = net.accuracy(split.holdout_images, split.holdout_labels)
    net.train()
    assert net.accuracy(split.holdout_images, split.holdout_labels) == expected and net.training


def test_the_feature_net_round_trips_with_its_hyperparameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = DigitFeatureNet(width=4, features=8)
    save_feature_net(net, tmp_path / "net.pt")
    loaded = load_feature_net(tmp_path / "net.pt")
    assert loaded.hparams["features"] == 8 and not loaded.training
    images = load_split(0.2, seed=0).holdout_images[:3]
    with torch.no_grad():
        torch.testing.assert_close(loaded.body(images), net.eval().body(images), rtol=0, atol=0)


def test_a_floor_that_leaves_a_class_to_the_feature_net_without_digits_is_refused() -> None:
    labels = torch.arange(10).repeat(3)
    check_feature_digits(labels, floor_per_class=5)  # three of each class left: fine
    with pytest.raises(ValueError, match=r"samples_per_class=139 takes every training digit of class 8 .* at most 138"):
        check_feature_digits(labels[labels != 8], floor_per_class=139)
    split = load_split(0.2, seed=0)  # class 8 has 139 training digits: a floor of 139 leaves it none
    chosen = torch.ones(len(split.train_labels), dtype=torch.bool)
    chosen[floor_indices(split.train_labels, per_class=139, seed=0)] = False
    with pytest.raises(ValueError, match=r"class 8"):
        check_feature_digits(split.train_labels[chosen], floor_per_class=139)


def test_feature_net_trains_by_epochs_too() -> None:
    from lightning.pytorch import Trainer

    split = load_split(0.2, seed=0)
    trainer = Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    train_feature_net(trainer, split.train_images, split.train_labels, batch_size=256, seed=0)
    assert trainer.global_step == 2 * (len(split.train_labels) // 256)  # the one-cycle schedule spans them all


# ----------------------------------------------------------------------------------------------------------- grids
def test_grid_tiles_rows_of_images_with_borders(tmp_path: Path) -> None:
    images = torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0), torch.zeros(1, 8, 8)])
    path = save_grid(tmp_path / "grid.png", images, nrow=2, scale=1)
    with Image.open(path) as image:
        grid = np.asarray(image)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1) and grid.dtype == np.uint8
    assert (grid[1:9, 1:9] == 0).all() and (grid[1:9, 10:18] == 255).all() and (grid[10:18, 1:9] == 128).all()
    assert (grid[0] == 64).all() and (grid[10:18, 10:18] == 64).all()  # border, and the empty last cell
    with Image.open(save_grid(tmp_path / "big.png", images, nrow=2, scale=3)) as image:
        assert image.size == (57, 57)
        np.testing.assert_array_equal(np.asarray(image)[::3, ::3], grid)  # nearest-neighbour upscaling


# -------------------------------------------------------------------------------------------------------- denoiser
def _denoiser(**kwargs: object) -> LatentDenoiser:
    torch.manual_seed(0)
    return LatentDenoiser(DigitAutoencoder(width=8), hidden=16, depth=1, **kwargs)  # type: ignore[arg-type]


def test_bad_p_uncond_is_refused() -> None:
    with pytest.raises(ValueError, match=r"p_uncond must lie in \[0, 1\), got 1.0"):
        _denoiser(p_uncond=1.0)


def test_condition_dropout_draws_from_the_diffusion_generator() -> None:
    model = _denoiser(p_uncond=0.3).train()
    labels = torch.arange(10).repeat(1000)
    model.diffusion_generator = torch.Generator().manual_seed(5)
    dropped = model.drop_conditions(labels)["c_crossattn"][0]  # the "adm" key keeps the class under c_crossattn
    expected_drop = torch.rand(10_000, generator=torch.Generator().manual_seed(5)) < 0.3
    assert dropped.dtype == torch.long
    assert torch.equal(dropped == model.null_class, expected_drop)
    assert torch.equal(dropped[~expected_drop], labels[~expected_drop])
    assert abs(float(expected_drop.float().mean()) - 0.3) < 0.02
    assert model.eval().drop_conditions(labels) is labels  # eval mode: no dropout


def test_the_class_reaches_the_mlp_as_y_and_the_null_class_is_its_last_embedding() -> None:
    model = _denoiser().eval()
    with torch.no_grad():
        for layer in model.model.output:  # the zero-initialised output layer would hide the condition
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight)
    x, t = torch.randn(4, *model.latent_shape), torch.tensor([0, 10, 500, 999])
    labels = torch.tensor([3, 3, 7, model.null_class])
    with torch.no_grad():
        torch.testing.assert_close(model.apply_model(x, t, labels), model.model(x, t, y=labels))
        assert not torch.allclose(model.apply_model(x, t, labels), model.apply_model(x, t, model.null_labels(labels)))
    assert model.model.class_embedding.num_embeddings == model.null_class + 1 == 11


def test_scale_is_one_over_the_std_of_the_first_batch_latents() -> None:
    model = _denoiser().train()
    assert isinstance(model.first_stage, FirstStage) and not model.first_stage.autoencoder.training
    first, second = torch.rand(16, 1, 8, 8) * 2 - 1, torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        latents = model.first_stage.autoencoder.encode(first)
        z = model.encode_first_stage(first)
    assert model.first_stage.scale == pytest.approx(1.0 / float(latents.double().std()), rel=2**-24)  # float32-rounded
    assert float(z.double().std()) == pytest.approx(1.0, rel=1e-5)
    kept = model.first_stage.scale
    with torch.no_grad():
        model.encode_first_stage(second)
    assert model.first_stage.scale == kept  # fitted once
    torch.testing.assert_close(model.decode_first_stage(z), model.first_stage.autoencoder.decode(latents))
    restored = _denoiser()
    restored.load_state_dict(model.state_dict())
    # saved in checkpoints (as float32, the buffer's dtype) and not fitted again
    assert restored.first_stage.scale == float(torch.tensor(kept, dtype=torch.float32))
    assert not restored.first_stage.needs_scale_fit
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.model.parameters()}


# ------------------------------------------------------------------------------------------------------ smoke run
TINY = [
    "--config", "examples/latent_digits/config.yaml",
    "--torch_threads", "0",  # 0: leave the test process's threads alone
    "--autoencoder.width", "8",
    "--model.hidden", "32", "--model.depth", "1", "--model.warmup_steps", "5",
    "--train.batch_size", "64", "--train.autoencoder_steps", "20", "--train.feature_steps", "10", "--train.steps", "30",
    "--train.grid_every_n_steps", "10", "--train.grid_per_class", "2", "--train.grid_ddim_steps", "2",
    "--train.quality_every_n_steps", "15", "--train.quality_per_class", "2",
    "--train.log_every_n_steps", "5", "--train.ema_start", "5", "--train.bucket_loss_every_n_steps", "10",
    "--eval.samples_per_class", "3", "--eval.ddim_steps", "4", "--eval.guidance_scales", "[1, 3]",
]  # fmt: skip


def test_example_runs_end_to_end_and_reuses_its_autoencoder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = main([*TINY, "--run_dir", str(run_dir)])

    written = json.loads((run_dir / "summary.json").read_text())
    assert written["accuracy"] == summary["accuracy"]
    assert sorted(written["accuracy"]) == ["1", "3"]
    assert all(0.0 <= value <= 1.0 for value in written["accuracy"].values())
    assert 0.97 < written["real_holdout_accuracy"] <= 1.0
    assert all(len(row) == 10 for row in written["per_class_accuracy"].values())
    assert all(math.isfinite(value) and value > 0 for value in written["spread"].values())
    # FID/KID by guidance scale against the held-out digits, and the real-vs-real floor on the same features
    assert sorted(written["fid"]) == sorted(written["kid"]) == ["1", "3"]
    assert all(math.isfinite(value) and value > 0 for value in written["fid"].values())
    assert all(set(kid) == {"mean", "std"} for kid in written["kid"].values())
    # the floor: 3 training digits per class that the feature net never trained on, recomputed from the saved net
    split = load_split(0.2, seed=0)
    assert written["feature_net"]["training_digits"] == len(split.train_labels) - 30
    assert written["feature_net"]["seed"] == 0 and written["feature_net"]["fitted_per_class"] == 3
    draws = written["feature_net"]["fid_of_fitted_digits_draws"]
    assert len(draws) == 5 and written["feature_net"]["fid_of_fitted_digits"] == pytest.approx(sum(draws) / 5)
    net = load_feature_net(run_dir / "feature_net.pt")
    floor = real_quality(split, net.body, floor_indices(split.train_labels, per_class=3, seed=1234), seed=1234)
    assert written["real_fid"] == floor["fid"] and written["real_kid"]["mean"] == floor["kid_mean"]
    assert 0 < written["real_fid"] < min(written["fid"].values())  # 30 real digits beat 30 samples of a 30-step model
    assert written["steps"] == 30 and written["autoencoder"]["loaded"] is False
    assert math.isfinite(written["scale_factor"]) and written["scale_factor"] > 0
    phases = {"setup", "classifier", "autoencoder", "features", "denoiser", "sampling", "outputs", "total"}
    assert set(written["wall_seconds"]) == phases and set(written["cpu_seconds"]) == phases
    assert all(value >= 0 for value in written["wall_seconds"].values())

    # SampleLogger's grids: PNG files in the CSV logger's folder, and images in the TensorBoard event file
    grid_dir = run_dir / "denoiser" / "samples"
    grids = sorted(path.name for path in grid_dir.iterdir())
    assert grids == ["samples_step0000010.png", "samples_step0000020.png", "samples_step0000030.png"]
    grid_size = (2 * (8 + 2) + 2, 10 * (8 + 2) + 2)  # 2 samples per class, a row per class, SampleLogger's padding 2
    with Image.open(grid_dir / grids[-1]) as image:
        assert image.size == grid_size
    events = EventAccumulator(str(run_dir / "tensorboard" / "denoiser"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images = events.Images("samples")
    assert [event.step for event in images] == [10, 20, 30]
    assert (images[-1].width, images[-1].height) == grid_size
    assert any(tag.startswith("loss_bucket/") for tag in events.Tags()["scalars"])  # TimestepLossMonitor
    fid_curve = events.Scalars("quality/fid")  # SampleQualityMonitor: 20 samples against the held-out digits
    assert [event.step for event in fid_curve] == [15, 30] and all(event.value > 0 for event in fid_curve)
    assert {"quality/kid_mean", "quality/kid_std"} <= set(events.Tags()["scalars"])
    assert "train/loss" in events.Tags()["scalars"]
    assert (run_dir / "denoiser" / "metrics.csv").is_file()
    for name in ("accuracy.png", "accuracy.md", "samples_scale1.png", "samples_scale3.png", "samples.npz"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    samples = np.load(run_dir / "samples.npz")
    assert samples["scale3"].shape == (30, 1, 8, 8) and np.abs(samples["scale3"]).max() <= 1.0

    again = main([*TINY, "--run_dir", str(run_dir)])  # the saved autoencoder is loaded, everything else re-seeded
    assert again["autoencoder"]["loaded"] is True
    assert again["accuracy"] == summary["accuracy"] and again["scale_factor"] == summary["scale_factor"]
    events = EventAccumulator(str(run_dir / "tensorboard" / "denoiser"), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("quality/fid")] == [15, 30]  # replaced, not appended to

    # another split trains the autoencoder again: a saved one is reused only for the digits it was trained on
    other = main([*TINY, "--run_dir", str(run_dir), "--train.holdout_fraction", "0.3"])
    assert other["autoencoder"]["loaded"] is False
