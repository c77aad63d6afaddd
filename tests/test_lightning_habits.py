"""Issue 15.4: Lightning habits: conditions from a config, ``trainer.predict`` samples, sampling progress, no eval-mode
warning for a frozen first stage, a warning for an EMA that never updates, Pillow checked at setup, LightningCLI with
diffusers classes."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.callbacks import DiffusionSeedCallback, SampleLogger
from lightning_ldm.ddim import make_ddim_timesteps
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.seeding import derive_seed
from tests import compvis_reference as ref
from tests.lightning_helpers import TRAINER_DEFAULTS, make_trainer

T = 100
SHAPE = (4, 1, 4, 4)
LABELS = [0, 2, 1, 2]


class LabelDenoiser(DiffusionMixin, L.LightningModule):
    """``forward(x_t, t, label=None)`` on (B, 1, 4, 4): a Linear over the last axis, a timestep and a label offset."""

    def __init__(self, timesteps: int = T, lr: float = 0.1) -> None:
        super().__init__()
        self.register_schedule(timesteps=timesteps)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 4)
            self.emb = nn.Embedding(timesteps, 1)
            self.label = nn.Embedding(3, 1)
        self.lr = lr

    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        label = cond if label is None else label  # `cond=`: what a bare condition is passed as
        out = self.lin(x) + self.emb(t).view(-1, 1, 1, 1)
        return out if label is None else out + self.label(label).view(-1, 1, 1, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = batch
        return self.diffusion_loss(x, {"label": labels})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LabelData(L.LightningDataModule):
    def __init__(self, n: int = 16, batch_size: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, *SHAPE[1:], generator=g).clamp(-1, 1)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.labels), batch_size=self.batch_size)


def four_labels(n: int) -> Tensor:
    """A ``"call:"`` condition: labels 0, 2, 1, 2, ... for ``n`` samples."""
    return torch.tensor(LABELS * (n // len(LABELS)))


def two_labels(n: int) -> Tensor:
    """A ``"call:"`` condition that ignores ``n``: two labels, whatever the number of samples."""
    return torch.tensor(LABELS[:2])


def expected_samples(model: DiffusionMixin, logger: SampleLogger, cond: Any, num_steps: int = 5) -> Tensor:
    """What ``logger`` sampled: DDIM from its noise, η generator seeded with ``derive_seed(seed, 1)``."""
    generator = torch.Generator().manual_seed(derive_seed(logger.seed, 1))
    out = model.sample(logger.shape, x_T=logger.noise, generator=generator, cond=cond, num_steps=num_steps)
    assert isinstance(out, Tensor)
    return out


# --------------------------------------------------------------------------- SampleLogger conditions from a config
CLI_CONFIG = """
trainer:
  max_steps: 2
  callbacks:
    - class_path: lightning_ldm.callbacks.SampleLogger
      init_args:
        shape: [4, 1, 4, 4]
        every_n_steps: 2
        at_validation_end: false
        cond: {COND}
        sample_kwargs:
          num_steps: 5
"""


def _cli(tmp_path: Path, cond: str) -> LightningCLI:
    path = tmp_path / "config.yaml"
    path.write_text(CLI_CONFIG.replace("{COND}", cond))
    defaults = {**TRAINER_DEFAULTS, "default_root_dir": str(tmp_path)}
    return LightningCLI(
        LabelDenoiser,
        LabelData,
        args=["fit", "--config", str(path)],
        trainer_defaults=defaults,
        save_config_callback=None,
    )


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        ("{label: [0, 2, 1, 2]}", lambda data: {"label": torch.tensor(LABELS)}),
        ("{label: 'batch:1'}", lambda data: {"label": data.labels[:4]}),
        ("{label: 'call:tests.test_lightning_habits.four_labels'}", lambda data: {"label": torch.tensor(LABELS)}),
        ("[0, 2, 1, 2]", lambda data: torch.tensor(LABELS)),  # not a mapping: passed as forward(cond=...)
        ("batch:1", lambda data: data.labels[:4]),
        ("call:tests.test_lightning_habits.four_labels", lambda data: torch.tensor(LABELS)),
    ],
)
def test_a_conditional_model_s_sample_logger_is_configured_from_yaml(tmp_path: Path, cond: str, expected: Any) -> None:
    cli = _cli(tmp_path, cond)
    logger = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SampleLogger))
    assert logger.last_samples is not None and logger.last_weights == "training"
    want = expected(cli.datamodule)
    assert (want["label"] if isinstance(want, dict) else want).dtype == torch.int64
    unconditional = expected_samples(cli.model, logger, None)
    assert not torch.allclose(logger.last_samples, unconditional)  # the labels made a difference
    torch.testing.assert_close(logger.last_samples, expected_samples(cli.model, logger, want), rtol=0, atol=0)
    assert list((tmp_path / "samples").glob("samples_step0000002.png"))  # no logger: a PNG under default_root_dir


def test_lists_of_numbers_become_tensors() -> None:
    logger = SampleLogger(SHAPE, cond=[1, 2, 0, 1], uncond={"label": [0, 0, 0, 0], "vec": [[0.5, 1], [0, 0]]})
    assert isinstance(logger.cond, Tensor) and logger.cond.dtype == torch.int64
    assert logger.cond.tolist() == [1, 2, 0, 1]
    assert logger.uncond["vec"].dtype == torch.float32 and logger.uncond["vec"].tolist() == [[0.5, 1.0], [0.0, 0.0]]
    tensors = [torch.ones(1)]
    assert SampleLogger(SHAPE, cond=tensors).cond is tensors  # a list of tensors stays CompVis' list


@pytest.mark.parametrize(
    ("cond", "error", "match"),
    [
        ([[1, 2], [3]], ValueError, r"cond=\[\[1, 2\], \[3\]\] is a ragged list of numbers"),
        ("batch:", TypeError, r"'batch:<key>', 'call:<package.module.function>' or None, got str 'batch:'"),
        ("labels", TypeError, r"or None, got str 'labels'"),
        (
            {"label": "labels"},
            TypeError,
            r"cond\['label'\] is the string 'labels'; a string condition is 'batch:<key>'",
        ),
        (3, TypeError, r"cond must be a Tensor, .* or None, got int 3"),
    ],
)
def test_condition_form_errors(cond: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SampleLogger(SHAPE, cond=cond)


def test_sample_quality_monitor_takes_lists_but_not_the_string_forms() -> None:
    from lightning_ldm.callbacks import SampleQualityMonitor

    monitor = SampleQualityMonitor(SHAPE, reference=torch.zeros(SHAPE), every_n_steps=1, cond={"label": LABELS})
    assert torch.equal(monitor.cond["label"], torch.tensor(LABELS))
    with pytest.raises(
        ValueError, match=r"SampleQualityMonitor\(cond: 'batch:1'\): the 'batch:' and 'call:' forms are "
    ):
        SampleQualityMonitor(SHAPE, reference=torch.zeros(SHAPE), every_n_steps=1, cond="batch:1")


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_condition_of_another_batch_size_is_refused_when_the_callback_is_built(scale: float) -> None:
    from lightning_ldm.callbacks import SampleQualityMonitor

    kwargs = {"cond": [0, 1], "uncond": [3] * 4, "sample_kwargs": {"guidance_scale": scale}}
    batch = r"^cond must have batch size 4 \(or 1, broadcast over the batch\), got shape \(2,\)"
    with pytest.raises(ValueError, match=batch):
        SampleLogger(SHAPE, every_n_steps=100, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=batch):
        SampleQualityMonitor(SHAPE, reference=torch.zeros(SHAPE), every_n_steps=100, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^cond\['label'\] must have batch size 4 .*got shape \(3,\)"):
        SampleLogger(SHAPE, cond={"label": [0, 1, 2]}, uncond={"label": [3] * 4}, sample_kwargs=kwargs["sample_kwargs"])
    if scale != 1.0:  # under guidance the two sides must batch together
        with pytest.raises(ValueError, match=r"^uncond must have batch size 4 .*got shape \(2,\)"):
            SampleLogger(SHAPE, cond=LABELS, uncond=[3, 3], sample_kwargs={"guidance_scale": scale})
        with pytest.raises(ValueError, match=r"^cond and uncond must name the same keys, got \['label'\] and \['y'\]"):
            SampleLogger(SHAPE, cond={"label": LABELS}, uncond={"y": LABELS}, sample_kwargs={"guidance_scale": scale})
    assert SampleLogger(SHAPE, cond=[1], uncond=[3], sample_kwargs={"guidance_scale": scale}).cond.tolist() == [1]
    # only shapes are compared: conditions of other dtypes (and devices) are fine, as sampling moves and casts them
    float64_null = torch.zeros(1, 2, dtype=torch.float64)
    mixed = SampleLogger(SHAPE, cond=torch.ones(4, 2), uncond=float64_null, sample_kwargs={"guidance_scale": scale})
    assert mixed.cond.device.type == "cpu"


def test_a_call_condition_of_another_batch_size_stops_the_fit_before_training() -> None:
    logger = SampleLogger(SHAPE, every_n_steps=1, cond="call:tests.test_lightning_habits.two_labels")
    trainer = make_trainer(max_steps=1, callbacks=[logger])
    with pytest.raises(ValueError, match=r"^cond must have batch size 4 \(or 1, broadcast .*\), got shape \(2,\)"):
        trainer.fit(LabelDenoiser(), LabelData().train_dataloader())
    assert trainer.global_step == 0


def test_call_conditions_go_through_the_allow_list() -> None:
    model = LabelDenoiser()
    logger = SampleLogger(SHAPE, every_n_steps=1, cond="call:os.getcwd")
    with pytest.raises(ValueError, match=r"target='os.getcwd' is not allowed: it lies outside allowed_prefixes="):
        make_trainer(max_steps=1, callbacks=[logger]).fit(model, LabelData().train_dataloader())
    allowed = SampleLogger(SHAPE, every_n_steps=1, cond="call:builtins.str", allowed_prefixes=["builtins"])
    with pytest.raises(
        TypeError, match=r"SampleLogger's condition 'call:builtins.str' returned the string '4'; expected a condition"
    ):
        make_trainer(max_steps=1, callbacks=[allowed]).fit(model, LabelData().train_dataloader())


def test_batch_condition_errors_name_the_key() -> None:
    data = LabelData().train_dataloader()
    logger = SampleLogger(SHAPE, every_n_steps=1, cond="batch:3", sample_kwargs={"num_steps": 4})
    with pytest.raises(ValueError, match=r"SampleLogger\(cond='batch:3'\): the first batch has no key '3'; its keys: "):
        make_trainer(max_steps=1, callbacks=[logger]).fit(LabelDenoiser(), data)
    big = SampleLogger((8, 1, 4, 4), every_n_steps=1, cond="batch:1", sample_kwargs={"num_steps": 4})
    with pytest.raises(ValueError, match=r"needs a tensor with at least 8 rows .* got a tensor of shape \(4,\)"):
        make_trainer(max_steps=1, callbacks=[big]).fit(LabelDenoiser(), data)
    unused = SampleLogger(SHAPE, cond="batch:1")
    with pytest.raises(RuntimeError, match=r"cond: 'batch:1'\) is resolved at the first batch of the fit"):
        unused.sample(make_trainer(), LabelDenoiser(), torch.zeros(SHAPE), torch.Generator())


# --------------------------------------------------------------------------------------- trainer.predict samples
def test_trainer_predict_samples_like_sample() -> None:
    model = LabelDenoiser()
    noise = torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer = make_trainer()
    # a Tensor batch is x_T; a pair is (x_T, cond)
    out = trainer.predict(model, DataLoader(TensorDataset(noise), batch_size=4))
    assert out is not None and len(out) == 2
    for k, batch in enumerate(out):
        x_T = noise[4 * k : 4 * k + 4]
        assert torch.equal(batch, model.sample(SHAPE, x_T=x_T))  # type: ignore[arg-type]
    pairs = trainer.predict(model, DataLoader(TensorDataset(noise, labels), batch_size=8))
    assert pairs is not None
    assert torch.equal(pairs[0], model.sample((8, *SHAPE[1:]), x_T=noise, cond=labels))  # type: ignore[arg-type]
    # a mapping batch carries sample()'s options, here η > 0 with a generator
    batches = [{"x_T": noise[:4], "cond": {"label": labels[:4]}, "eta": 1.0, "num_steps": 7,
                "generator": torch.Generator().manual_seed(9)}]  # fmt: skip
    got = trainer.predict(model, DataLoader(batches, batch_size=None))  # batch_size=None: each dict is a batch
    want = model.sample(SHAPE, x_T=noise[:4], cond={"label": labels[:4]}, eta=1.0, num_steps=7,
                        generator=torch.Generator().manual_seed(9))  # fmt: skip
    assert got is not None and torch.equal(got[0], want)  # type: ignore[arg-type]
    shaped = trainer.predict(
        model, DataLoader([{"shape": SHAPE, "generator": torch.Generator().manual_seed(4)}], batch_size=None)
    )
    assert shaped is not None
    assert torch.equal(shaped[0], model.sample(SHAPE, generator=torch.Generator().manual_seed(4)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        (3, TypeError, r"a predict batch must be a Tensor .* got int"),
        ({"x_T": torch.zeros(SHAPE), "steps": 3}, ValueError, r"the predict batch has key\(s\) \['steps'\] that "),
        ({"num_steps": 4}, ValueError, r"the predict batch needs 'shape' or a Tensor 'x_T', got keys \['num_steps'\]"),
    ],
)
def test_predict_batch_errors(batch: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LabelDenoiser().predict_step(batch, 0)


# ------------------------------------------------------------------------------------------------ progress bar
class Bars:
    """Stands in for ``tqdm.auto.tqdm``: records each bar's total and updates."""

    made: list[Bars] = []  # noqa: RUF012

    def __init__(self, total: int | None = None, **kwargs: Any) -> None:
        self.total, self.updates, self.closed, self.kwargs = total, 0, False, kwargs
        Bars.made.append(self)

    def update(self, n: int = 1) -> None:
        self.updates += n

    def refresh(self) -> None: ...

    def close(self) -> None:
        self.closed = True


def test_progress_counts_the_sampling_steps(monkeypatch: pytest.MonkeyPatch, sampler: Any = None) -> None:
    """DDIM here; ``tests/test_lightning_habits_diffusers.py`` passes a diffusers scheduler."""
    model = LabelDenoiser()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    options: dict[str, Any] = {"num_steps": 7, "x_T": noise}
    steps = len(make_ddim_timesteps("uniform", 7, T, verbose=False))  # T // 7 = 14: 8 steps, not 7
    assert steps == 8
    if sampler is not None:
        options["sampler"] = sampler
        steps = 7
    monkeypatch.setattr("tqdm.auto.tqdm", Bars)  # after importing diffusers: huggingface_hub subclasses tqdm
    Bars.made = []
    plain = model.sample(SHAPE, **options)
    assert Bars.made == []  # off by default
    shown = model.sample(SHAPE, progress=True, **options)
    assert torch.equal(shown, plain)  # type: ignore[arg-type]
    (bar,) = Bars.made
    assert (bar.total, bar.updates, bar.closed) == (steps, steps, True)
    with pytest.raises(TypeError, match=r"progress must be a bool, got 1 of type int"):
        model.sample(SHAPE, progress=1)  # type: ignore[arg-type]


def test_sample_logger_samples_without_a_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tqdm.auto.tqdm", Bars)
    Bars.made = []
    logger = SampleLogger(SHAPE, every_n_steps=1, cond={"label": LABELS}, sample_kwargs={"num_steps": 4})
    make_trainer(max_steps=1, callbacks=[logger]).fit(LabelDenoiser(), LabelData().train_dataloader())
    assert logger.last_samples is not None and Bars.made == []


# ---------------------------------------------------------------------------- EMA that never updates before the end
@pytest.mark.parametrize(
    ("max_steps", "start", "every", "warns"),
    [(4, 100, 1, True), (4, 3, 1, False), (4, 4, 1, True), (4, 1, 3, False), (3, 1, 3, True), (4, None, 0, True)],
)
def test_warns_when_ema_never_updates_before_max_steps(
    max_steps: int, start: int | None, every: int, warns: bool
) -> None:
    model = LabelDenoiser()
    initial = [p.detach().clone() for p in model.parameters()]
    ema = EMAWeightAveraging(update_starting_at_step=start, update_every_n_steps=every)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=max_steps, callbacks=[ema]).fit(model, LabelData().train_dataloader())
    messages = [str(w.message) for w in caught if "never-updated average" in str(w.message)]
    assert len(messages) == int(warns), messages
    final = [p.detach() for p in model.parameters()]
    # the warning's point: without an update Lightning installs the initial weights at the end of the fit
    assert all(torch.equal(a, b) for a, b in zip(initial, final, strict=True)) == warns
    if warns:
        assert f"but the fit ends at max_steps={max_steps}" in messages[0] and "LabelDenoiser" in messages[0]


# ----------------------------------------------------------------------------- frozen first stage: no eval warning
class AE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Dropout(0.5))
        self.dec = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(2, 1, 1))

    def encode(self, x: Tensor) -> Tensor:
        return self.enc(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z)


class TimeConv(nn.Conv2d):
    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)


class Latent(LatentDiffusionMixin, L.LightningModule):
    def __init__(self, compvis_frozen: bool = False, frozen_extra: bool = False) -> None:
        super().__init__()
        self.register_schedule(timesteps=T)
        self.register_first_stage(ref.freeze_stage(AE()) if compvis_frozen else AE())
        self.model = TimeConv(2, 2, 1)
        self.extra = nn.Linear(1, 1)
        if frozen_extra:
            self.extra.eval()
        self.ae_modes: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        assert self.first_stage is not None
        self.ae_modes += [m.training for m in self.first_stage.autoencoder.modules()]
        return self.diffusion_loss(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trainable_parameters(), lr=0.1)


@pytest.mark.parametrize("compvis_frozen", [False, True])
def test_a_latent_fit_has_no_eval_mode_warning(compvis_frozen: bool) -> None:
    model = Latent(compvis_frozen=compvis_frozen)
    data = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4)), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=2, num_sanity_val_steps=2, callbacks=[DiffusionSeedCallback(seed=0)]).fit(model, data)
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]
    assert model.ae_modes and not any(model.ae_modes)  # the autoencoder computed in eval mode on every step
    assert model.first_stage is not None and not any(m.training for m in model.first_stage.autoencoder.modules())


def test_other_eval_modules_are_still_reported() -> None:
    model = Latent(frozen_extra=True)
    data = DataLoader(TensorDataset(torch.randn(8, 1, 4, 4)), batch_size=4)
    with pytest.warns(UserWarning, match=r"Found 1 module\(s\) in eval mode at the start of training"):
        make_trainer(max_steps=1).fit(model, data)


def test_the_first_stage_encodes_in_eval_mode_whatever_its_flags() -> None:
    model = Latent()
    assert model.first_stage is not None
    model.first_stage.autoencoder.train()  # what on_fit_start does to the flags; nn.Dropout(0.5) would show it
    x = torch.randn(2, 1, 4, 4)
    want = model.first_stage.autoencoder.enc[0](x)  # Conv2d only: dropout off
    torch.testing.assert_close(model.first_stage.encode(x, scaled=False), want, rtol=0, atol=0)
    assert not model.first_stage.autoencoder.training


# ------------------------------------------------------------------------------------------- Pillow at setup
def _without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else find_spec(name, *a))


def test_missing_pillow_is_reported_at_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without_pillow(monkeypatch)
    counted: list[int] = []

    class Counting(LabelDenoiser):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            counted.append(batch_idx)
            return super().training_step(batch, batch_idx)

    logger = SampleLogger(SHAPE, every_n_steps=2, cond={"label": LABELS})
    trainer = make_trainer(max_steps=2, callbacks=[logger], logger=CSVLogger(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=r"SampleLogger writes PNG files for \['CSVLogger'\] with Pillow, "
                       r"which is not installed: pip install \"lightning_ldm\[logging\]\""):  # fmt: skip
        trainer.fit(Counting(), LabelData().train_dataloader())
    assert counted == []  # refused before the first step
    clips = SampleLogger((2, 1, 2, 4, 4), every_n_steps=2)
    with pytest.raises(ModuleNotFoundError, match=r"SampleLogger writes animated GIFs of clips with Pillow"):
        make_trainer(callbacks=[clips], logger=TensorBoardLogger(tmp_path)).fit(
            Counting(), LabelData().train_dataloader()
        )


def test_tensorboard_images_need_no_pillow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without_pillow(monkeypatch)
    logger = SampleLogger(SHAPE, every_n_steps=1, cond={"label": LABELS}, sample_kwargs={"num_steps": 4})
    make_trainer(max_steps=1, callbacks=[logger], logger=TensorBoardLogger(tmp_path)).fit(
        LabelDenoiser(), LabelData().train_dataloader()
    )
    assert logger.last_samples is not None and logger.last_samples.shape == SHAPE
