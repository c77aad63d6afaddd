from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.callbacks._sampling import averaged_module
from lightning_ldm.callbacks.sample_logger import SampleLogger
from lightning_ldm.media import image_grid, to_uint8, video_grid
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.seeding import derive_seed
from tests.lightning_helpers import make_trainer

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

T = 20
IMAGE = (4, 1, 4, 4)


class GridDenoiser(DiffusionMixin, L.LightningModule):
    """``forward(x_t, t)``: a Linear over the last axis plus a per-timestep offset (any number of axes)."""

    def __init__(self, width: int = 4, lr: float = 0.3, dropout: float = 0.0, own_generator: bool = False) -> None:
        super().__init__()
        self.register_schedule(beta_schedule="linear", timesteps=T)
        gen = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(width, width)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(width, width, generator=gen) * 0.3)
            self.lin.bias.zero_()
        self.emb = nn.Embedding(T, 1)
        nn.init.zeros_(self.emb.weight)
        self.drop = nn.Dropout(dropout)
        self.frozen = nn.Linear(1, 1)  # kept in eval mode by training_step
        self.lr = lr
        if own_generator:
            self.diffusion_generator = torch.Generator().manual_seed(5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        offset = self.emb(t).view(-1, *([1] * (x.ndim - 1)))
        return self.drop(self.lin(x)) + offset

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.frozen.eval()
        return self.diffusion_loss(batch[0])

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.diffusion_loss(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recording(SampleLogger):
    """Keeps, per logging, the step, the samples, the weights in place while sampling and the modules' modes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []
        self.samples: list[Tensor] = []
        self.states: list[dict[str, Tensor]] = []
        self.modes: list[list[bool]] = []
        self.written: list[list[str]] = []

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, noise: Tensor, generator: Any) -> Tensor:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.modes.append([m.training for m in pl_module.modules()])
        return super().sample(trainer, pl_module, noise, generator)

    def write(self, trainer: L.Trainer, samples: Tensor, step: int) -> list[str]:
        self.steps.append(step)
        self.samples.append(samples)
        self.written.append(super().write(trainer, samples, step))
        return self.written[-1]


def images(n: int = 24, shape: tuple[int, ...] = IMAGE[1:], seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset((torch.randn(n, *shape, generator=g) * 0.5).clamp(-1, 1)), batch_size=4)


def fit(
    model: L.LightningModule, callbacks: list[Callback], loader: DataLoader | None = None, **kwargs: Any
) -> L.Trainer:
    options: dict[str, Any] = {"max_steps": 6, "limit_val_batches": 1, "callbacks": callbacks, "log_every_n_steps": 1}
    options.update(kwargs)
    trainer = make_trainer(**options)
    loader = loader or images()
    trainer.fit(model, loader, loader if options.get("limit_val_batches") else None)
    return trainer


def by_hand(state: dict[str, Tensor], noise: Tensor, eta: float = 0.0, seed: int = 0, **kwargs: Any) -> Tensor:
    """DDIM with a fresh module holding ``state`` (not attached to a Trainer)."""
    model = GridDenoiser(width=noise.shape[-1])
    model.load_state_dict(state)
    generator = torch.Generator().manual_seed(derive_seed(seed, 1))
    out = model.sample(noise.shape, num_steps=5, x_T=noise, eta=eta, generator=generator, **kwargs)
    assert isinstance(out, Tensor)
    return out.float()


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, r"every_n_steps=0 is out of range; expected an integer >= 1"),
        ({"every_n_steps": -3}, ValueError, r"every_n_steps=-3 is out of range"),
        ({"every_n_steps": 2.0}, TypeError, r"every_n_steps must be an integer, got 2.0"),
        ({"at_validation_end": False}, ValueError, r"at_validation_end=False: SampleLogger would never run"),
        ({"at_validation_end": 1}, TypeError, r"at_validation_end must be a bool, got 1 of type int"),
        ({"shape": (4,)}, ValueError, r"shape must have a batch axis and at least one more, got \(4,\)"),
        ({"shape": (4, 0, 2)}, ValueError, r"shape\[1\]=0 is out of range"),
        ({"shape": "4x4"}, TypeError, r"shape must be a sequence of positive integers, got str"),
        ({"shape": (2.7, 1, 4, 4)}, TypeError, r"shape\[0\] must be an integer, got 2.7 of type float"),  # 13.7
        ({"shape": (4, 1, 4.9, 4)}, TypeError, r"shape\[2\] must be an integer, got 4.9 of type float"),
        ({"shape": (4, True, 4, 4)}, TypeError, r"shape\[1\] must be an integer, got True of type bool"),
        ({"sample_kwargs": {"num_steps": 0}}, ValueError, r"sample_kwargs\['num_steps'\]=0 is out of range"),
        (
            {"sample_kwargs": {"method": "cosine"}},
            ValueError,
            r"sample_kwargs\['method'\]='cosine' is not supported; expected one of 'uniform'",
        ),
        ({"sample_kwargs": {"eta": -0.1}}, ValueError, r"sample_kwargs\['eta'\]=-0.1 is out of range"),
        ({"sample_kwargs": {"guidance_scale": 3.0}}, ValueError, r"guidance_scale=3 needs both cond and uncond"),
        ({"sample_kwargs": {"steps": 5}}, ValueError, r"sample_kwargs has unknown key\(s\) \['steps'\]; expected some"),
        ({"sample_kwargs": [("num_steps", 5)]}, TypeError, r"sample_kwargs must be a mapping of sample\(\) options"),
        ({"sample_kwargs": {"sampler": "dpm"}}, ValueError, r"sampler='dpm' is not supported; expected 'ddim'"),
        ({"sample_kwargs": {"sampler": object()}}, TypeError, r"sampler must be 'ddim' or a diffusers-style sch"),
        ({"cond": "text"}, TypeError, r"cond must be a Tensor, a list of Tensors, a mapping .* or None, got str"),
        ({"seed": -1}, ValueError, r"seed=-1 is out of range"),
        ({"value_range": (1, 0)}, ValueError, r"value_range=\(1, 0\) is empty"),
        ({"frame_dim": 3}, ValueError, r"frame_dim=3 is out of range; expected an integer in \[1, 2\]"),
        ({"max_frames": 0}, ValueError, r"max_frames=0 is out of range"),
        ({"fps": 0}, ValueError, r"fps=0 is out of range"),
        ({"tag": ""}, ValueError, r"tag must be a non-empty string, got ''"),
        ({"tag": 3}, TypeError, r"tag must be a string, got 3 of type int"),
        ({"sample_kwargs": {"clip_x0": 0.0}}, ValueError, r"sample_kwargs\['clip_x0'\]=0 is out of range"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    call: dict[str, Any] = {"shape": IMAGE}
    call.update(kwargs)
    with pytest.raises(error, match=match):
        SampleLogger(**call)


def test_at_validation_end_accepts_a_numpy_bool() -> None:
    assert SampleLogger(IMAGE, at_validation_end=np.True_).at_validation_end is True  # type: ignore[arg-type]
    assert SampleLogger(IMAGE, every_n_steps=2, at_validation_end=np.False_).at_validation_end is False  # type: ignore[arg-type]


def test_noise_is_fixed_float32_from_the_seed() -> None:
    logger = SampleLogger(IMAGE, seed=7)
    expected = torch.randn(IMAGE, generator=torch.Generator().manual_seed(7))
    assert logger.noise.dtype == torch.float32 and torch.equal(logger.noise, expected)
    assert torch.equal(SampleLogger(IMAGE, seed=7).noise, expected)


def test_module_without_the_mixin_is_refused() -> None:
    class Plain(L.LightningModule):
        pass

    with pytest.raises(TypeError, match=r"SampleLogger needs a LightningModule that mixes in Diffusion.*got Plain"):
        SampleLogger(IMAGE).setup(make_trainer(), Plain(), "fit")


# --------------------------------------------------------------------------------------------------- schedule
def test_every_n_steps_schedule() -> None:
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], max_steps=7, limit_val_batches=0)
    assert logger.steps == [2, 4, 6]


def test_gradient_accumulation_logs_each_step_once() -> None:
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], max_steps=4, limit_val_batches=0, accumulate_grad_batches=2, max_epochs=-1)
    assert logger.steps == [2, 4]


def test_at_validation_end_skips_the_sanity_check_and_deduplicates() -> None:
    logger = Recording(IMAGE, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], max_steps=-1, max_epochs=2, limit_train_batches=3, num_sanity_val_steps=1)
    assert logger.steps == [3, 6]
    both = Recording(IMAGE, every_n_steps=3, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [both], max_steps=-1, max_epochs=2, limit_train_batches=3)
    assert both.steps == [3, 6]


def test_samples_equal_ddim_by_hand_and_repeat() -> None:
    logger = Recording(
        IMAGE, every_n_steps=3, at_validation_end=False, seed=3, sample_kwargs={"num_steps": 5, "eta": 0.7}
    )
    fit(GridDenoiser(), [logger], limit_val_batches=0)
    assert len(logger.samples) == 2
    for state, samples in zip(logger.states, logger.samples, strict=True):
        assert torch.equal(samples, by_hand(state, logger.noise, eta=0.7, seed=3))
    assert not torch.allclose(logger.samples[0], logger.samples[1])  # the weights moved between loggings
    # comparable loggings: the same weights give the same samples (noise and eta generator reseeded)
    model = GridDenoiser()
    model.load_state_dict(logger.states[-1])
    trainer = make_trainer(callbacks=[logger])
    trainer.strategy.connect(model)
    again = logger.log_samples(trainer, model)
    assert again is not None and torch.equal(again, logger.samples[-1])


# ------------------------------------------------------------------------------------------- training untouched
class Greedy(SampleLogger):
    """Draws from the global RNG and the module's generator while sampling: the guard must undo both."""

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, noise: Tensor, generator: Any) -> Tensor:
        torch.randn(1000)
        if pl_module.diffusion_generator is not None:  # type: ignore[attr-defined]
            torch.randn(1000, generator=pl_module.diffusion_generator)  # type: ignore[attr-defined]
        return super().sample(trainer, pl_module, noise, generator)


@pytest.mark.parametrize("own_generator", [False, True])
def test_fit_with_and_without_sample_logger_ends_with_identical_weights(own_generator: bool) -> None:
    results = []
    for callbacks in ([], [Greedy(IMAGE, every_n_steps=1, sample_kwargs={"num_steps": 5, "eta": 1.0})]):
        torch.manual_seed(123)
        model = GridDenoiser(dropout=0.5, own_generator=own_generator)
        fit(model, list(callbacks), max_steps=-1, max_epochs=2)
        results.append(params(model))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_modes_are_eval_while_sampling_and_restored() -> None:
    seen: list[list[bool]] = []

    class After(Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            seen.append([m.training for m in pl_module.modules()])

    logger = Recording(IMAGE, every_n_steps=1, at_validation_end=False, sample_kwargs={"num_steps": 5})
    model = GridDenoiser()
    fit(model, [logger, After()], max_steps=2, limit_val_batches=0)
    names = [name for name, _ in model.named_modules()]
    assert logger.modes == [[False] * len(names)] * 2
    expected = [name != "frozen" for name in names]  # training mode except the frozen submodule
    assert seen == [expected, expected]


def test_only_global_rank_zero_samples(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    logger = Recording(IMAGE, every_n_steps=1, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], default_root_dir=tmp_path)
    assert logger.steps == [] and logger.last_samples is None
    assert not (tmp_path / "samples").exists()


# ---------------------------------------------------------------------------------------------------------- EMA
class AveragesAfter(Callback):
    """Listed after the SampleLogger: the module's and the averaged module's weights once it has run."""

    def __init__(self, ema: EMAWeightAveraging) -> None:
        self.ema = ema
        self.current: dict[int, list[Tensor]] = {}
        self.averaged: dict[int, list[Tensor]] = {}

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        average = averaged_module(self.ema)
        assert average is not None
        self.current[trainer.global_step] = params(pl_module)
        self.averaged[trainer.global_step] = params(average)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._record(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module)


def _state_params(state: dict[str, Tensor], model: nn.Module) -> list[Tensor]:
    return [state[name] for name, _ in model.named_parameters()]


@pytest.mark.parametrize("at", ["step", "validation_end"])
def test_samples_use_the_ema_weights_and_training_weights_come_back(at: str) -> None:
    ema = EMAWeightAveraging(decay=0.5)
    if at == "step":
        logger = Recording(IMAGE, every_n_steps=3, at_validation_end=False, sample_kwargs={"num_steps": 5})
        options: dict[str, Any] = {"limit_val_batches": 0}
    else:
        logger = Recording(IMAGE, sample_kwargs={"num_steps": 5})
        options = {"max_steps": -1, "max_epochs": 2, "limit_train_batches": 3}
    after = AveragesAfter(ema)
    torch.manual_seed(9)
    model = GridDenoiser(lr=0.5)
    fit(model, [ema, logger, after], **options)
    assert logger.steps == [3, 6]
    for step, state, samples in zip(logger.steps, logger.states, logger.samples, strict=True):
        used = _state_params(state, model)
        for a, b in zip(used, after.averaged[step], strict=True):
            assert torch.equal(a, b)  # sampled with the averaged weights
        training = dict(state)
        for (name, _), value in zip(model.named_parameters(), after.current[step], strict=True):
            training[name] = value
        assert any(not torch.equal(a, b) for a, b in zip(used, after.current[step], strict=True))
        expected = by_hand(state, logger.noise)
        assert torch.equal(samples, expected)
        assert (samples - by_hand(training, logger.noise)).abs().max() > 1e-2  # visibly different from training's

    # the training weights were put back bitwise: the same fit without the logger ends identically
    ema2 = EMAWeightAveraging(decay=0.5)
    torch.manual_seed(9)
    model2 = GridDenoiser(lr=0.5)
    fit(model2, [ema2], **options)
    for a, b in zip(params(model), params(model2), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(params(averaged_module(ema)), params(averaged_module(ema2)), strict=True):  # type: ignore[arg-type]
        assert torch.equal(a, b)


def test_warns_when_listed_before_the_averaging_callback() -> None:
    with pytest.warns(UserWarning, match="Recording is listed before a WeightAveraging callback: its step-based runs"):
        fit(
            GridDenoiser(),
            [Recording(IMAGE, every_n_steps=3, sample_kwargs={"num_steps": 5}), EMAWeightAveraging()],
            max_steps=1,
        )


# ------------------------------------------------------------------------------------- denoiser and first stage
class WithApplyModel(GridDenoiser):
    def apply_model(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return 0.5 * self(x, t)


class WithFirstStage(GridDenoiser):
    """Decodes its samples in ``sample`` (what a module with a first stage does; LatentDiffusionMixin's own)."""

    def sample(self, shape: Any, **options: Any) -> Any:
        return self.decode_first_stage(super().sample(shape, **options))  # type: ignore[arg-type]

    def decode_first_stage(self, z: Tensor) -> Tensor:
        return torch.tanh(z.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2))


def test_apply_model_and_first_stage_decoding() -> None:
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    model = WithApplyModel()
    fit(model, [logger], max_steps=2, limit_val_batches=0)
    model.load_state_dict(logger.states[0])
    gen = torch.Generator().manual_seed(derive_seed(0, 1))
    expected = model.sample(IMAGE, num_steps=5, x_T=logger.noise, generator=gen)
    assert torch.equal(logger.samples[0], expected)
    assert not torch.allclose(logger.samples[0], by_hand(logger.states[0], logger.noise))

    decoder = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    fit(WithFirstStage(), [decoder], max_steps=2, limit_val_batches=0)
    latents = by_hand(decoder.states[0], decoder.noise)
    assert decoder.samples[0].shape == (4, 1, 8, 8)
    assert torch.equal(decoder.samples[0], WithFirstStage().decode_first_stage(latents))


def test_sampling_runs_under_the_trainers_precision() -> None:
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], max_steps=2, limit_val_batches=0, precision="bf16-mixed")
    state = logger.states[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = by_hand(state, logger.noise)
    assert torch.equal(logger.samples[0], expected)
    assert not torch.equal(logger.samples[0], by_hand(state, logger.noise))  # fp32 differs: autocast was on


def test_guidance_passes_cond_and_uncond() -> None:
    class Conditional(GridDenoiser):
        def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
            out = super().forward(x, t)
            return out if cond is None else out + cond.view(-1, *([1] * (x.ndim - 1)))

    cond, uncond = torch.tensor([0.3]), torch.tensor([0.0])
    logger = Recording(
        IMAGE,
        every_n_steps=1,
        at_validation_end=False,
        cond=cond,
        uncond=uncond,
        sample_kwargs={"num_steps": 5, "guidance_scale": 2.0},
    )
    model = Conditional()
    fit(model, [logger], max_steps=1, limit_val_batches=0)
    fresh = Conditional()
    fresh.load_state_dict(logger.states[0])
    gen = torch.Generator().manual_seed(derive_seed(0, 1))
    expected = fresh.sample(
        IMAGE, num_steps=5, x_T=logger.noise, generator=gen, guidance_scale=2.0, cond=cond, uncond=uncond
    )
    assert torch.equal(logger.samples[0], expected)


def test_write_rejects_other_ranks() -> None:
    with pytest.raises(ValueError, match=r"samples must be images \(B, C, H, W\) or clips \(5-D\), got shape \(2, 3\)"):
        SampleLogger(IMAGE).write(make_trainer(), torch.zeros(2, 3), 0)


# ------------------------------------------------------------------------------------------------------ writers
def _png(path: Path | bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path) if isinstance(path, bytes) else path))


def _grid(samples: Tensor) -> np.ndarray:
    return image_grid(to_uint8(samples)).permute(1, 2, 0).numpy()[..., 0]


def test_csv_logger_gets_png_files(tmp_path: Path) -> None:
    logger = Recording(IMAGE, every_n_steps=3, at_validation_end=False, sample_kwargs={"num_steps": 5})
    csv = CSVLogger(tmp_path)
    fit(GridDenoiser(), [logger], logger=csv, limit_val_batches=0)
    files = sorted((Path(csv.log_dir) / "samples").iterdir())
    assert [f.name for f in files] == ["samples_step0000003.png", "samples_step0000006.png"]
    for file, samples in zip(files, logger.samples, strict=True):
        assert np.array_equal(_png(file), _grid(samples))


def test_no_logger_writes_under_default_root_dir(tmp_path: Path) -> None:
    logger = Recording(IMAGE, every_n_steps=6, at_validation_end=False, tag="val/img", sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], default_root_dir=tmp_path, limit_val_batches=0)
    assert logger.written == [[str(tmp_path / "samples" / "val_img_step0000006.png")]]


def test_tensorboard_event_file_holds_the_grids(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = Recording(IMAGE, every_n_steps=3, at_validation_end=False, sample_kwargs={"num_steps": 5})
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit(GridDenoiser(), [logger], logger=tb, limit_val_batches=0)
    tb.experiment.flush()
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["samples"]
    stored = events.Images("samples")
    assert [e.step for e in stored] == [3, 6]
    for event, samples in zip(stored, logger.samples, strict=True):
        decoded = _png(event.encoded_image_string)  # add_image stores a grey grid as RGB
        assert decoded.shape[-1] == 3
        for channel in range(3):
            assert np.array_equal(decoded[..., channel], _grid(samples))
    assert logger.written == [["TensorBoardLogger"]] * 2
    assert not (Path(tb.log_dir) / "samples").exists()


@pytest.mark.parametrize(("frame_dim", "max_frames", "frames"), [(2, None, 3), (1, 2, 2)])
def test_tensorboard_gets_animated_gifs_for_clips(
    tmp_path: Path, frame_dim: int, max_frames: int | None, frames: int
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shape = (2, 1, 3, 4, 4) if frame_dim == 2 else (2, 3, 1, 4, 4)
    logger = Recording(
        shape,
        every_n_steps=2,
        at_validation_end=False,
        frame_dim=frame_dim,
        max_frames=max_frames,
        fps=5,
        sample_kwargs={"num_steps": 5},
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit(GridDenoiser(), [logger], logger=tb, loader=images(shape=shape[1:]), max_steps=2, limit_val_batches=0)
    tb.experiment.flush()
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    events.Reload()
    (event,) = events.Images("samples")
    gif = Image.open(io.BytesIO(event.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == frames and gif.info["duration"] == 200
    clips = to_uint8(logger.samples[0])
    clips = clips.movedim(2, 1) if frame_dim == 2 else clips
    expected = video_grid(clips[:, :frames])
    for k in range(frames):
        gif.seek(k)
        assert np.array_equal(np.asarray(gif.convert("L")), expected[k, 0].numpy())


def test_csv_logger_gets_gif_files_for_clips(tmp_path: Path) -> None:
    shape = (2, 1, 3, 4, 4)
    logger = Recording(shape, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    fit(
        GridDenoiser(),
        [logger],
        logger=CSVLogger(tmp_path),
        loader=images(shape=shape[1:]),
        max_steps=2,
        limit_val_batches=0,
    )
    (path,) = logger.written[0]
    assert path.endswith("samples_step0000002.gif") and Image.open(path).n_frames == 3


def test_wandb_offline_run_lists_the_media(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    image_logger = Recording(IMAGE, every_n_steps=3, at_validation_end=False, sample_kwargs={"num_steps": 5})
    clip_logger = Recording(
        (2, 1, 3, 4, 4), every_n_steps=2, at_validation_end=False, tag="clips", sample_kwargs={"num_steps": 5}
    )
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="sample-logger-test")
    try:
        fit(GridDenoiser(), [image_logger], logger=wb, limit_val_batches=0)
        # the clip model logs into the same run
        fit(
            GridDenoiser(),
            [clip_logger],
            logger=wb,
            loader=images(shape=(1, 3, 4, 4)),
            max_steps=2,
            limit_val_batches=0,
        )
    finally:
        wandb.finish()
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    media = Path(run_dir) / "files" / "media"
    pngs = sorted((media / "images").glob("samples_*.png"))
    assert len(pngs) == 2
    decoded = sorted(_png(p).tobytes() for p in pngs)
    assert decoded == sorted(_grid(s).tobytes() for s in image_logger.samples)
    gifs = list((media / "videos").glob("clips_*.gif"))
    assert len(gifs) == 1 and Image.open(gifs[0]).n_frames == 3
    assert image_logger.written == [["WandbLogger"]] * 2


# ================================================================ issue 13, point 8: SampleLogger reliability
class Count(Callback):
    """Counts the training batches that ran."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


class CondGrid(GridDenoiser):
    """``forward(x_t, t, label=None, vec=None)``: an Embedding of an integer label and a Linear of a float vector."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(3)
            self.label = nn.Embedding(3, 1)
            self.vec = nn.Linear(2, 1)

    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None, vec: Tensor | None = None) -> Tensor:
        out = super().forward(x, t)
        view = (-1, *([1] * (x.ndim - 1)))
        if label is not None:
            out = out + self.label(label).view(view)
        if vec is not None:
            out = out + self.vec(vec).view(view)
        return out


def test_bf16_true_converts_the_conditions_like_the_noise() -> None:  # 8: bf16-true
    cond = {"label": torch.tensor([1]), "vec": torch.tensor([[0.5, -1.0]])}  # float32 and int64, batch 1
    uncond = {"label": torch.tensor([0]), "vec": torch.zeros(1, 2)}
    options: dict[str, Any] = {"num_steps": 5, "guidance_scale": 2.0}
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, cond=cond, uncond=uncond, sample_kwargs=options)
    fit(CondGrid(), [logger], max_steps=2, limit_val_batches=0, precision="bf16-true")  # crashed at step 2 before
    assert logger.steps == [2] and torch.isfinite(logger.samples[0]).all()
    fresh = CondGrid().to(torch.bfloat16)
    fresh.load_state_dict(logger.states[0])
    gen = torch.Generator().manual_seed(derive_seed(0, 1))
    to_bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in cond.items()}
    null_bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in uncond.items()}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what the "bf16-true" forward context does
    try:
        expected = fresh.sample(
            IMAGE, x_T=logger.noise.to(torch.bfloat16), generator=gen, cond=to_bf16, uncond=null_bf16, **options
        )
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(logger.samples[0], expected.float())


def test_before_the_first_ema_update_the_training_weights_are_sampled_and_tagged(tmp_path: Path) -> None:  # 8: EMA
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=4)  # first update at the end of step 5
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    after = AveragesAfter(ema)
    model = GridDenoiser(lr=0.5)
    weights: list[str | None] = []

    class Weights(Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step % 2 == 0:
                weights.append(logger.last_weights)

    fit(model, [ema, logger, after, Weights()], limit_val_batches=0, default_root_dir=tmp_path)
    assert logger.steps == [2, 4, 6] and weights == ["training", "training", "averaged"]
    initial = params(GridDenoiser(lr=0.5))
    for step, state in zip(logger.steps, logger.states, strict=True):
        used = _state_params(state, model)
        expected = after.current[step] if step < 6 else after.averaged[step]
        assert all(torch.equal(a, b) for a, b in zip(used, expected, strict=True))
        assert any(not torch.equal(a, b) for a, b in zip(used, initial, strict=True))  # never the untrained copy
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == [
        "samples_step0000006.png",
        "samples_training_weights_step0000002.png",
        "samples_training_weights_step0000004.png",
    ]


@pytest.mark.parametrize(
    ("make_logger", "make_model", "match"),
    [
        (
            lambda: SampleLogger((4, 2, 4, 4), every_n_steps=2, sample_kwargs={"num_steps": 5}),
            GridDenoiser,
            r"SampleLogger\(shape=\(4, 2, 4, 4\), frame_dim=2\) gives samples that are no pictures and GridDenoiser "
            r"has no first stage to decode them: write\(\) takes images \(B, C, H, W\) or clips .* with C in \(1, 3\)",
        ),
        (
            lambda: SampleLogger((4, 1, 4), every_n_steps=2, sample_kwargs={"num_steps": 5}),
            GridDenoiser,
            r"shape=\(4, 1, 4\), frame_",
        ),
        (
            lambda: SampleLogger((2, 3, 2, 4, 4), every_n_steps=2, frame_dim=1, sample_kwargs={"num_steps": 5}),
            GridDenoiser,
            r"SampleLogger\(shape=\(2, 3, 2, 4, 4\), frame_dim=1\) gives samples that are no pictures",
        ),
        (
            lambda: SampleLogger(IMAGE, every_n_steps=2, sample_kwargs={"num_steps": 30}),
            GridDenoiser,
            r"SampleLogger\(sample_kwargs=\{'num_steps': 30\}\) is more than the 20 timesteps of GridDenoiser's "
            r"schedule; expected an "
            r"integer in \[1, 20\]",
        ),
        (
            lambda: SampleLogger((2, 2, 4, 4), every_n_steps=2, sample_kwargs={"num_steps": 5}),
            lambda: __import__("tests.test_latent", fromlist=["LDM"]).LDM("crossattn"),
            r"LDM is conditional \(conditioning_key='crossattn'\) but the SampleLogger has no condition to sample it "
            r"with; pass SampleLogger\(cond=\.\.\., uncond=\.\.\.\)",
        ),
    ],
)
def test_a_configuration_that_can_never_log_is_refused_at_fit_start(
    make_logger: Any, make_model: Any, match: str
) -> None:  # 8: refused at fit start
    count = Count()
    with pytest.raises(ValueError, match=match):
        fit(make_model(), [make_logger(), count], max_steps=4, limit_val_batches=0)
    assert count.steps == []  # before any training step


def test_layout_check_leaves_an_overridden_sample_alone() -> None:
    class TwoToOne(SampleLogger):
        def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, noise: Tensor, generator: Any) -> Tensor:
            return super().sample(trainer, pl_module, noise, generator)[:, :1]

    logger = TwoToOne((4, 2, 4, 4), every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], max_steps=2, limit_val_batches=0)
    assert logger.last_samples is not None and logger.last_samples.shape == (4, 1, 4, 4)


class NaNAtSampling(GridDenoiser):
    """The denoiser the sampler calls returns NaN for the first sample (training is unaffected)."""

    def apply_model(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self(x, t).clone()
        out[0] = float("nan")
        return out


def test_nan_samples_warn_once_and_log_their_count() -> None:  # 8: NaN
    from tests.lightning_helpers import RecordingLogger

    metrics = RecordingLogger()
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    with pytest.warns(
        UserWarning, match=r"SampleLogger: 16 of 64 sample values are NaN at step 2 \(written as black"
    ) as w:
        fit(NaNAtSampling(), [logger], max_steps=4, limit_val_batches=0, logger=metrics)
    assert sum("sample values are NaN" in str(r.message) for r in w) == 1  # once per fit
    assert metrics.series("samples/nan_count") == [(2, 16.0), (4, 16.0)]
    assert logger.steps == [2, 4] and int(torch.isnan(logger.samples[0]).sum()) == 16
    clean = RecordingLogger()
    fit(
        GridDenoiser(),
        [Recording(IMAGE, every_n_steps=2, sample_kwargs={"num_steps": 5})],
        max_steps=4,
        limit_val_batches=0,
        logger=clean,
    )
    assert clean.series("samples/nan_count") == []  # nothing logged without NaN


def test_a_reused_logger_logs_every_step_of_the_second_fit() -> None:  # 8: reuse
    logger = Recording(IMAGE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 5})
    fit(GridDenoiser(), [logger], max_steps=2, limit_val_batches=0)
    fit(GridDenoiser(), [logger], max_steps=4, limit_val_batches=0)
    assert logger.steps == [2, 2, 4]  # the second fit's step 2 was taken for the first fit's before
