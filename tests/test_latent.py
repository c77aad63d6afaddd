"""LatentDiffusionMixin through real Lightning fits: frozen first stage, scale_by_std (2 DDP ranks, resume), condition
dropout from the per-batch generator, CompVis' apply_model routing, and a CompVis-style DDIM sampler run unchanged.

The tiny models live here (importable as ``tests.test_latent``) so that DDP-spawned processes can unpickle them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.callbacks import DiffusionSeedCallback
from lightning_ldm.callbacks.sample_logger import SampleLogger
from lightning_ldm.compat import CompVisCompat
from lightning_ldm.embedding import SinusoidalTimestepEmbedding
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.seeding import derive_seed
from tests import compvis_reference as ref
from tests.lightning_helpers import make_trainer, run_spawned

T = 20
SEED = 7
Z = 2  # latent channels
CTX = 6  # context width
NUM_CLASSES = 4
Y_DIM = 3  # adm vector width
BATCH = 4


# ------------------------------------------------------------------------------------------------ tiny models
class Posterior:
    """A diagonal Gaussian with ``mean``/``std`` (what FirstStage samples as mean + std·ε)."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


class TinyAE(nn.Module):
    """(B, 3, 8, 8) images ↔ (B, Z, 4, 4) latents; dropout in both halves, so eval mode shows in the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 2 * Z, 2, stride=2), nn.Dropout(0.5))
        self.decoder = nn.Sequential(nn.Dropout(0.5), nn.ConvTranspose2d(Z, 3, 2, stride=2))

    def encode(self, x: Tensor) -> Posterior:
        return Posterior(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)


class TinyCondUNet(nn.Module):
    """``model(x, t, context=None, y=None)`` on (B, C, 4, 4); float ``t`` accepted (Euler-type schedulers)."""

    def __init__(self, in_channels: int, *, context: bool = True, y: bool = False, hidden: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.embed_t = SinusoidalTimestepEmbedding(hidden)
        self.lin_t = nn.Linear(hidden, hidden)
        self.lin_c = nn.Linear(CTX, hidden) if context else None
        self.lin_y = nn.Linear(Y_DIM, hidden) if y else None
        self.conv_out = nn.Conv2d(hidden, Z, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        emb = self.lin_t(self.embed_t(t))
        if self.lin_c is not None and context is not None:
            emb = emb + self.lin_c(context.mean(1))
        if self.lin_y is not None and y is not None:
            emb = emb + self.lin_y(y)
        return self.conv_out(torch.nn.functional.silu(self.conv_in(x) + emb[:, :, None, None]))


class LDM(LatentDiffusionMixin, L.LightningModule):
    """A class-conditional latent diffusion model; records what each training step saw."""

    def __init__(
        self,
        conditioning_key: str | None = "crossattn",
        dropout: float = 0.0,
        scale_by_std: bool = True,
        scale_factor: float | None = None,
        timesteps: int = T,
        parameterization: str = "eps",
        out_dir: str | None = None,
        **schedule: Any,
    ) -> None:
        super().__init__()
        self.register_schedule(timesteps=timesteps, parameterization=parameterization, **schedule)  # type: ignore[arg-type]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            autoencoder = TinyAE()
            concat = conditioning_key in ("concat", "hybrid")
            self.model = TinyCondUNet(
                2 * Z if concat else Z, context=conditioning_key in ("crossattn", "hybrid"), y=conditioning_key == "adm"
            )
            self.class_embed = nn.Embedding(NUM_CLASSES, CTX)
        self.register_first_stage(autoencoder, scale_by_std=scale_by_std, scale_factor=scale_factor)
        self.register_conditioning(conditioning_key, dropout=dropout)
        self.out_dir = out_dir
        self.records: dict[str, list[Any]] = {"x": [], "masks": [], "ae_training": [], "scale": []}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = batch
        assert self.first_stage is not None
        self.records["x"].append(x.detach().clone())
        self.records["ae_training"].append([m.training for m in self.first_stage.autoencoder.modules()])
        loss = self.diffusion_loss(x, cond=self.class_embed(labels)[:, None, :])
        self.records["scale"].append(self.first_stage.scale)
        return loss

    def drop_conditions(self, cond: Any) -> Any:
        dropped = super().drop_conditions(cond)
        if self.training and cond is not None:  # null = zeros: a dropped row is the one that changed
            self.records["masks"].append((dropped["c_crossattn"][0] != cond).flatten(1).any(1).detach().clone())
        return dropped

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trainable_parameters(), lr=1e-2)

    def on_train_end(self) -> None:
        if self.out_dir is not None:
            assert self.first_stage is not None
            torch.save(
                {**self.records, "fitted": self.first_stage.scale, "world_size": self.trainer.world_size},
                f"{self.out_dir}/rank{self.global_rank}.pt",
            )


def images(n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.8 + 0.3
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, labels


def loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(*images(n)), batch_size=BATCH, shuffle=False)


def hand_latents(model: LDM, x: Tensor, g: torch.Generator) -> Tensor:
    """The posterior draw mean + std·ε, ε ~ N(0, 1) in float32 from ``g`` (unscaled latents)."""
    assert model.first_stage is not None
    with torch.no_grad():
        posterior = model.first_stage.autoencoder.encode(x)
        return posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)


def hand_mask(rank: int, counter: int, p: float) -> Tensor:
    """The dropout mask of training batch ``counter`` on ``rank``: after the posterior draw, rand(B) < p."""
    g = torch.Generator().manual_seed(derive_seed(SEED, 0, rank, counter))
    torch.randn(BATCH, Z, 4, 4, generator=g)  # the posterior draw comes first
    return torch.rand(BATCH, generator=g) < p


def params(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------------------------------- frozen first stage
def test_first_stage_is_frozen_through_fit() -> None:
    model = LDM()
    assert model.first_stage is not None
    ae = model.first_stage.autoencoder
    ae_state = {k: v.clone() for k, v in ae.state_dict().items()}
    denoiser_before = params(model.model)
    ae_ids = {id(p) for p in ae.parameters()}
    trainable_ids = [id(p) for p in model.trainable_parameters()]
    assert not ae_ids & set(trainable_ids)
    assert set(trainable_ids) == {id(p) for p in model.parameters()} - ae_ids

    trainer = make_trainer(max_steps=4, callbacks=[DiffusionSeedCallback(seed=SEED)])
    trainer.fit(model, loader())

    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in ae_state.items())
    assert not torch.equal(denoiser_before[0], model.model.conv_in.weight)  # the denoiser trained
    optimizer = trainer.optimizers[0]
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(trainable_ids)
    assert not any(id(p) in ae_ids for p in optimizer.state)
    assert {id(p) for p in optimizer.state} == set(trainable_ids)  # Adam state for each trainable one, no frozen one
    assert not any(p.requires_grad for p in ae.parameters())
    assert len(model.records["ae_training"]) == 4
    assert all(not any(flags) for flags in model.records["ae_training"])  # every autoencoder submodule in eval


def test_compvis_frozen_stages_with_disabled_train_register_and_fit() -> None:
    """Issue 13.9: CompVis' LatentDiffusion freezes its first and cond stage models with ``train = disabled_train``
    (``.eval()`` then returns False); ``register_first_stage`` takes such an autoencoder and a fit runs with it."""
    model = LDM(scale_by_std=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ae = ref.freeze_stage(TinyAE())  # CompVis: self.first_stage_model (built like LDM's own TinyAE)
    ref.freeze_stage(model.class_embed)  # CompVis: self.cond_stage_model
    stage = model.register_first_stage(ae, scale_by_std=True)
    assert stage.autoencoder is ae and model.first_stage is stage
    embed_before = params(model.class_embed)
    make_trainer(max_steps=2, callbacks=[DiffusionSeedCallback(seed=SEED)]).fit(model, loader())
    assert all(not any(flags) for flags in model.records["ae_training"])  # the autoencoder stayed in eval
    assert not model.class_embed.training and all(
        torch.equal(a, b) for a, b in zip(embed_before, params(model.class_embed), strict=True)
    )
    z = hand_latents(model, model.records["x"][0], torch.Generator().manual_seed(derive_seed(SEED, 0, 0, 0)))
    assert stage.is_scale_fitted and stage.scale == pytest.approx(1.0 / float(z.double().flatten().std()), rel=2**-24)


# ------------------------------------------------------------------------------------------------ scale_by_std
def test_scale_by_std_is_one_over_std_of_the_first_batch() -> None:
    model = LDM(scale_by_std=True)
    make_trainer(max_steps=3, callbacks=[DiffusionSeedCallback(seed=SEED)]).fit(model, loader())
    assert model.first_stage is not None
    z = hand_latents(model, model.records["x"][0], torch.Generator().manual_seed(derive_seed(SEED, 0, 0, 0)))
    expected = 1.0 / float(z.double().flatten().std())
    assert model.first_stage.scale == pytest.approx(expected, rel=2**-24)  # 1/std in float64, rounded to float32
    assert model.records["scale"] == [model.first_stage.scale] * 3  # fitted once, kept afterwards
    assert float(model.first_stage.scale_factor) == pytest.approx(expected, rel=1e-7)
    assert abs(expected - 1.0) > 0.05  # the fit changed the factor


@pytest.mark.slow
def test_scale_by_std_and_dropout_under_two_process_ddp(tmp_path: Path) -> None:
    p = 0.5
    model = LDM(scale_by_std=True, dropout=p, out_dir=str(tmp_path))
    run_spawned(  # 8 samples per rank: 2 steps of 4
        lambda trainer: trainer.fit(model, loader(16)),
        max_steps=2, callbacks=[DiffusionSeedCallback(seed=SEED)], use_distributed_sampler=True,
    )  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert not torch.equal(ranks[0]["x"][0], ranks[1]["x"][0])  # the ranks saw different first batches

    latents = [
        hand_latents(model, ranks[r]["x"][0], torch.Generator().manual_seed(derive_seed(SEED, 0, r, 0)))
        for r in range(2)
    ]
    pooled = 1.0 / float(torch.cat([z.flatten() for z in latents]).double().std())
    assert ranks[0]["fitted"] == ranks[1]["fitted"]
    assert ranks[0]["fitted"] == pytest.approx(pooled, rel=2**-24)  # 1/std in float64, rounded to float32
    local = 1.0 / float(latents[0].double().std())
    assert abs(local - pooled) / pooled > 1e-3  # the rank-local statistic differs: the pooling is what is tested
    for r in range(2):
        assert ranks[r]["scale"] == [ranks[r]["fitted"]] * 2  # fitted on the first batch, kept on the second

    # each rank's masks are the hand draws from (seed, rank, counter); the ranks draw independently
    for r in range(2):
        assert len(ranks[r]["masks"]) == 2
        for counter, mask in enumerate(ranks[r]["masks"]):
            assert torch.equal(mask, hand_mask(r, counter, p)), (r, counter)
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["masks"], ranks[1]["masks"], strict=True))


class _CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_crash_and_resume_restores_the_scale_and_the_dropout_draws(tmp_path: Path) -> None:
    p, n, k = 0.5, 6, 2  # 2 batches per epoch: the crash comes at an epoch boundary
    uninterrupted = LDM(dropout=p)
    make_trainer(max_steps=n, callbacks=[DiffusionSeedCallback(seed=SEED)]).fit(uninterrupted, loader())
    masks = uninterrupted.records["masks"]
    assert len(masks) == n
    for counter, mask in enumerate(masks):
        assert torch.equal(mask, hand_mask(0, counter, p)), counter
    assert any(bool(m.any()) and not bool(m.all()) for m in masks)  # some samples dropped, some kept

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    crashed = LDM(dropout=p)
    with pytest.raises(RuntimeError, match=f"simulated crash at step {k}"):
        make_trainer(
            max_steps=n, callbacks=[DiffusionSeedCallback(seed=SEED), ckpt, _CrashAt(k)], enable_checkpointing=True
        ).fit(crashed, loader())
    path = str(tmp_path / f"step={k}.ckpt")

    resumed = LDM(dropout=p)
    assert resumed.first_stage is not None
    fits: list[Tensor] = []
    original_fit = resumed.first_stage.fit_scale

    def spy(latents: Tensor, **kwargs: Any) -> float:
        fits.append(latents)
        return original_fit(latents, **kwargs)

    resumed.first_stage.fit_scale = spy  # type: ignore[method-assign]
    make_trainer(max_steps=n, callbacks=[DiffusionSeedCallback(seed=SEED)]).fit(resumed, loader(), ckpt_path=path)
    assert fits == []  # restored from the checkpoint, not fitted again
    assert uninterrupted.first_stage is not None
    fitted = uninterrupted.first_stage.scale
    stored = float(torch.tensor(fitted, dtype=torch.float32))  # the checkpoint keeps the factor in float32
    assert resumed.first_stage.scale == stored and resumed.first_stage.is_scale_fitted
    assert resumed.records["scale"] == [stored] * (n - k)
    assert len(resumed.records["masks"]) == n - k
    for a, b in zip(masks[k:], resumed.records["masks"], strict=True):
        assert torch.equal(a, b)
    # the latents are scaled in float32 (float32 tensor × Python float), so the float32 record trains identically
    assert all(torch.equal(a, b) for a, b in zip(params(uninterrupted), params(resumed), strict=True))

    fixed = LDM(dropout=p, scale_by_std=False, scale_factor=0.5)
    with pytest.raises(ValueError, match=r"first_stage\.scale_factor=.* differs from the fixed scale_factor=0\.5"):
        make_trainer(max_steps=n, callbacks=[DiffusionSeedCallback(seed=SEED)]).fit(fixed, loader(), ckpt_path=path)


def test_resumed_scale_is_bitwise_the_uninterrupted_one(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    model = LDM()
    make_trainer(max_steps=1, callbacks=[DiffusionSeedCallback(seed=SEED), ckpt], enable_checkpointing=True).fit(
        model, loader()
    )
    resumed = LDM()
    make_trainer(max_steps=2, callbacks=[DiffusionSeedCallback(seed=SEED)]).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert model.first_stage is not None and resumed.first_stage is not None
    assert resumed.first_stage.scale == model.first_stage.scale


# --------------------------------------------------------------------------------- the fitted scale under EMA
_EMA_CASES = {
    "no_ema": None,
    "ema": {"decay": 0.5},
    "ema_late_start": {"decay": 0.5, "update_starting_at_step": 100},  # the averaged copy is never updated
}


def _fit_with_checkpoints(tmp_path: Path, ema: dict[str, Any] | None) -> tuple[LDM, L.Trainer, dict[str, Path]]:
    """Two steps with EMA (or not); checkpoints by ModelCheckpoint (full, weights only) and trainer.save_checkpoint."""
    full = ModelCheckpoint(dirpath=tmp_path / "full", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    weights = ModelCheckpoint(dirpath=tmp_path / "weights", every_n_train_steps=2, save_weights_only=True)
    callbacks: list[Callback] = [DiffusionSeedCallback(seed=SEED), full, weights]
    if ema is not None:
        callbacks.insert(1, EMAWeightAveraging(**ema))
    model = LDM()
    trainer = make_trainer(max_steps=2, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(model, loader())
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    paths = {
        "model_checkpoint_step1": tmp_path / "full" / "step=1.ckpt",
        "model_checkpoint_step2": tmp_path / "full" / "step=2.ckpt",
        "weights_only": next((tmp_path / "weights").glob("*.ckpt")),
        "trainer_save_checkpoint": tmp_path / "after_fit.ckpt",
    }
    return model, trainer, paths


@pytest.mark.parametrize("ema", list(_EMA_CASES))
def test_every_checkpoint_carries_the_fitted_scale_with_and_without_ema(tmp_path: Path, ema: str) -> None:
    """Issue 13.1: EMA's averaged copy, made before the fit, must not write its never-fitted factor."""
    model, _, paths = _fit_with_checkpoints(tmp_path, _EMA_CASES[ema])
    assert model.first_stage is not None and model.first_stage.is_scale_fitted
    z = hand_latents(model, model.records["x"][0], torch.Generator().manual_seed(derive_seed(SEED, 0, 0, 0)))
    fitted = 1.0 / float(z.double().flatten().std())
    stored = float(torch.tensor(fitted, dtype=torch.float32))
    assert model.first_stage.scale == pytest.approx(fitted, rel=2**-24) and abs(fitted - 1.0) > 0.05
    latents = torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(3))
    for route, path in paths.items():
        state = torch.load(path, weights_only=False)["state_dict"]
        assert float(state["first_stage.scale_factor"]) == model.first_stage.scale, route
        assert bool(state["first_stage.scale_fitted"]), route
        loaded = LDM.load_from_checkpoint(path)
        assert loaded.first_stage is not None
        assert loaded.first_stage.scale == model.first_stage.scale == stored, route
        assert loaded.first_stage.is_scale_fitted and not loaded.first_stage.needs_scale_fit, route
        with torch.no_grad():  # decodes with the fitted factor: z / scale into the (frozen) decoder
            expected = model.first_stage.autoencoder.decode(latents / stored)
            torch.testing.assert_close(loaded.eval().decode_first_stage(latents), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("resume_with_ema", [True, False])
@pytest.mark.parametrize("ema", ["ema", "ema_late_start"])
def test_resume_from_an_ema_checkpoint_restores_the_fitted_scale(
    tmp_path: Path, ema: str, resume_with_ema: bool
) -> None:
    """Issue 13.1: resuming (with or without EMA) restores the fitted factor instead of fitting on other data."""
    model, _, paths = _fit_with_checkpoints(tmp_path, _EMA_CASES[ema])
    assert model.first_stage is not None
    resumed = LDM()
    assert resumed.first_stage is not None
    fits: list[Tensor] = []
    original_fit = resumed.first_stage.fit_scale

    def spy(latents: Tensor, **kwargs: Any) -> float:
        fits.append(latents)
        return original_fit(latents, **kwargs)

    resumed.first_stage.fit_scale = spy  # type: ignore[method-assign]
    callbacks: list[Callback] = [DiffusionSeedCallback(seed=SEED)]
    if resume_with_ema:
        callbacks.append(EMAWeightAveraging(**(_EMA_CASES[ema] or {})))
    make_trainer(max_steps=3, callbacks=callbacks).fit(resumed, loader(), ckpt_path=paths["model_checkpoint_step1"])
    assert fits == []  # restored, not fitted again on the resumed run's first batch
    assert resumed.first_stage.scale == model.first_stage.scale and resumed.first_stage.is_scale_fitted
    assert resumed.records["scale"] == [model.first_stage.scale] * 2


@pytest.mark.parametrize("corrupt", [float("nan"), 0.0, -1.0, float("inf")])
def test_load_from_checkpoint_refuses_a_corrupt_scale_factor(tmp_path: Path, corrupt: float) -> None:
    """Issue 13.2: the corrupt factor is refused at load, with the constructor's message."""
    _, _, paths = _fit_with_checkpoints(tmp_path, None)
    checkpoint = torch.load(paths["trainer_save_checkpoint"], weights_only=False)
    checkpoint["state_dict"]["first_stage.scale_factor"] = torch.tensor(corrupt)
    torch.save(checkpoint, tmp_path / "corrupt.ckpt")
    with pytest.raises(ValueError, match=rf"the checkpoint's first_stage\.scale_factor={corrupt:g} .*\(0, inf\]"):
        LDM.load_from_checkpoint(tmp_path / "corrupt.ckpt")


# ---------------------------------------------------------------------------------------------- SampleLogger
def test_sample_logger_leaves_the_training_weights_bitwise_unchanged(tmp_path: Path) -> None:
    def fit(with_logger: bool) -> tuple[LDM, SampleLogger | None]:
        model = LDM()
        context = torch.randn(2, 1, CTX, generator=torch.Generator().manual_seed(2))
        logger = (
            SampleLogger(
                (2, Z, 4, 4), every_n_steps=2, at_validation_end=False, cond=context, sample_kwargs={"num_steps": 4}
            )
            if with_logger
            else None
        )
        callbacks: list[Callback] = [DiffusionSeedCallback(seed=SEED), EMAWeightAveraging(decay=0.5)]
        make_trainer(max_steps=4, callbacks=callbacks + ([logger] if logger else []), default_root_dir=tmp_path).fit(
            model, loader()
        )
        return model, logger

    plain, _ = fit(False)
    logged, logger = fit(True)
    assert logger is not None and logger.last_samples is not None
    assert logger.last_samples.shape == (2, 3, 8, 8)  # decoded through the first stage
    assert torch.isfinite(logger.last_samples).all()
    assert all(torch.equal(a, b) for a, b in zip(params(plain), params(logged), strict=True))
    assert plain.first_stage is not None and logged.first_stage is not None
    assert plain.first_stage.scale == logged.first_stage.scale


# -------------------------------------------------------------------------------------------- apply_model routing
class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor, dict[str, Any]]] = []

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.calls.append((x, t, kwargs))
        return x[:, :Z] * 2.0


class Bare(LatentDiffusionMixin, L.LightningModule):
    def __init__(self, conditioning_key: str | None) -> None:
        super().__init__()
        self.register_schedule(timesteps=T)
        self.register_conditioning(conditioning_key)
        self.model = Recorder()


def _stack_channels(*parts: Tensor) -> Tensor:
    """Channel concatenation written out element by element (the golden value of torch.cat(parts, 1))."""
    out = torch.empty(parts[0].shape[0], sum(p.shape[1] for p in parts), *parts[0].shape[2:])
    start = 0
    for part in parts:
        out[:, start : start + part.shape[1]] = part
        start += part.shape[1]
    return out


def _stack_tokens(*parts: Tensor) -> Tensor:
    out = torch.empty(parts[0].shape[0], sum(p.shape[1] for p in parts), parts[0].shape[2])
    start = 0
    for part in parts:
        out[:, start : start + part.shape[1]] = part
        start += part.shape[1]
    return out


def _routing_cases() -> list[tuple[str | None, Any, Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]]]:
    g = torch.Generator().manual_seed(3)
    c1, c2 = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    e1, e2 = torch.randn(2, 3, CTX, generator=g), torch.randn(2, 5, CTX, generator=g)
    y = torch.randn(2, Y_DIM, generator=g)
    return [
        (None, None, lambda x: (x, {})),
        ("concat", c1, lambda x: (_stack_channels(x, c1), {})),
        ("concat", [c1, c2], lambda x: (_stack_channels(x, c1, c2), {})),
        ("concat", {"c_concat": [c2]}, lambda x: (_stack_channels(x, c2), {})),
        ("crossattn", e1, lambda x: (x, {"context": e1})),
        ("crossattn", [e1, e2], lambda x: (x, {"context": _stack_tokens(e1, e2)})),
        ("crossattn", {"c_crossattn": [e2]}, lambda x: (x, {"context": e2})),
        (
            "hybrid",
            {"c_concat": [c1, c2], "c_crossattn": [e1, e2]},
            lambda x: (_stack_channels(x, c1, c2), {"context": _stack_tokens(e1, e2)}),
        ),
        ("adm", y, lambda x: (x, {"y": y})),
        ("adm", {"c_crossattn": [y]}, lambda x: (x, {"y": y})),
    ]


@pytest.mark.parametrize(("key", "cond", "expected"), _routing_cases())
def test_apply_model_routes_as_compvis(key: str | None, cond: Any, expected: Callable[..., Any]) -> None:
    module = Bare(key)
    x = torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([3, 11])
    out = module.apply_model(x, t, cond)
    (x_in, t_in, kwargs) = module.model.calls[-1]
    x_expected, kw_expected = expected(x)
    assert torch.equal(x_in, x_expected)
    assert torch.equal(t_in, t)
    assert sorted(kwargs) == sorted(kw_expected)
    for name, value in kw_expected.items():
        assert torch.equal(kwargs[name], value), name
    assert torch.equal(out, 2.0 * x)


@pytest.mark.parametrize(
    ("key", "cond", "match"),
    [
        (None, torch.zeros(2, 1, CTX), r"conditioning_key=None uses \[\]; cond has \['c_crossattn'\]"),
        ("crossattn", {"c_concat": [torch.zeros(2, 1, 4, 4)]}, r"uses \['c_crossattn'\].*unused: \['c_concat'\]"),
        ("adm", [torch.zeros(2, Y_DIM)] * 2, r"conditioning_key='adm' takes one class/vector condition, got 2"),
        ("concat", torch.zeros(2, 1, 3, 3), r"c_concat\[0\] has shape \(2, 1, 3, 3\), which does not concatenate"),
    ],
)
def test_apply_model_refuses_what_compvis_misroutes(key: str | None, cond: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Bare(key).apply_model(torch.zeros(2, Z, 4, 4), torch.tensor([1, 2]), cond)


def test_apply_model_takes_no_extra_keywords() -> None:
    with pytest.raises(TypeError, match=r"apply_model\(\) got an unexpected keyword argument 'mask'"):
        Bare("crossattn").apply_model(torch.zeros(2, Z, 4, 4), torch.tensor([1, 2]), torch.zeros(2, 1, CTX), mask=1)


# --------------------------------------------------------------------------------------------------- errors
class NoDecode(nn.Module):
    def encode(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.register_first_stage(nn.Linear(2, 2)), TypeError, r"Linear has no callable `encode`"),
        (lambda m: m.register_first_stage(NoDecode()), TypeError, r"NoDecode has no callable `decode`"),
        (lambda m: m.register_conditioning("film"), ValueError, r"conditioning_key='film' is not supported"),
        (
            lambda m: m.register_conditioning("crossattn", dropout=1.5),
            ValueError,
            r"dropout\['c_crossattn'\]=1\.5 is out of range",
        ),
        (
            lambda m: m.register_conditioning("hybrid", dropout={"c_concat": -0.1}),
            ValueError,
            r"dropout\['c_concat'\]=-0\.1 is out of range",
        ),
        (
            lambda m: m.register_conditioning("crossattn", dropout={"c_concat": 0.1}),
            ValueError,
            r"dropout names \['c_concat'\], which conditioning_key='crossattn' does not use",
        ),
        (lambda m: m.register_first_stage(TinyAE(), scale_factor=0.0), ValueError, r"scale_factor=0"),
    ],
)
def test_registration_errors(call: Callable[[LDM], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(LDM())


def test_null_condition_of_the_wrong_shape_is_refused() -> None:
    model = LDM()
    model.register_conditioning("crossattn", dropout=0.5, null={"c_crossattn": torch.zeros(3)})
    model.train()
    with pytest.raises(ValueError, match=r"null\['c_crossattn'\] has shape \(3,\), which does not fit .* \(4, 1, 6\)"):
        model.drop_conditions(torch.ones(4, 1, CTX))


def test_null_condition_replaces_dropped_rows() -> None:
    model = LDM()
    null = torch.full((1, CTX), -2.0)
    model.register_conditioning("crossattn", dropout=0.5, null={"c_crossattn": null})
    model.train()
    model.diffusion_generator = torch.Generator().manual_seed(4)
    cond = torch.ones(BATCH, 1, CTX)
    out = model.drop_conditions(cond)["c_crossattn"][0]
    mask = torch.rand(BATCH, generator=torch.Generator().manual_seed(4)) < 0.5
    assert bool(mask.any()) and not bool(mask.all())
    assert torch.equal(out[mask], null.expand(int(mask.sum()), 1, CTX))
    assert torch.equal(out[~mask], cond[~mask])
    model.eval()
    assert model.drop_conditions(cond) is cond


def test_sample_logger_interval_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"every_n_steps=0 is out of range; expected an integer >= 1"):
        SampleLogger((2, Z, 4, 4), every_n_steps=0)


def test_sample_without_a_first_stage_and_intermediates() -> None:
    with pytest.raises(RuntimeError, match=r"Bare has no first stage: call self.register_first_stage"):
        Bare(None).decode_first_stage(torch.zeros(1, Z, 4, 4))
    # intermediates (latents) come back with the decoded samples
    model = LDM(None)
    images, intermediates = model.sample((1, Z, 4, 4), num_steps=5, return_intermediates=True)  # type: ignore[misc]
    assert images.shape == (1, 3, 8, 8) and intermediates["x_inter"][-1].shape == (1, Z, 4, 4)
    assert torch.equal(images, model.decode_first_stage(intermediates["x_inter"][-1]))


# ------------------------------------------------------------------------- CompVis' DDIMSampler, run unchanged
class CompVisDDIMSampler:
    """CompVis' ``DDIMSampler`` (SD 2 version: eps and v), reading only what it reads from ``LatentDiffusion``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0) -> None:
        self.ddim_timesteps = ref.make_ddim_timesteps("uniform", ddim_num_steps, self.ddpm_num_timesteps)
        alphas_cumprod = self.model.alphas_cumprod
        assert alphas_cumprod.shape[0] == self.ddpm_num_timesteps, "alphas have to be defined for each timestep"
        self.betas = self.model.betas.clone().detach().to(torch.float32)
        self.alphas_cumprod_prev = self.model.alphas_cumprod_prev.clone().detach().to(torch.float32)
        sigmas, alphas, alphas_prev = ref.make_ddim_sampling_parameters(
            alphas_cumprod.cpu().numpy(), self.ddim_timesteps, ddim_eta
        )
        self.ddim_sigmas = sigmas
        self.ddim_alphas = alphas
        self.ddim_alphas_prev = alphas_prev
        self.ddim_sqrt_one_minus_alphas = np.sqrt(1.0 - alphas)

    @torch.no_grad()
    def sample(self, steps: int, x_T: Tensor, c: Any, uc: Any = None, scale: float = 1.0) -> Tensor:  # noqa: N803
        self.make_schedule(steps)
        x = x_T
        total = self.ddim_timesteps.shape[0]
        for i, step in enumerate(np.flip(self.ddim_timesteps)):
            index = total - i - 1
            ts = torch.full((x.shape[0],), int(step), dtype=torch.long)
            x = self.p_sample_ddim(x, c, ts, index, uc, scale)
        return x

    def p_sample_ddim(self, x: Tensor, c: Any, t: Tensor, index: int, uc: Any, scale: float) -> Tensor:
        b = x.shape[0]
        if uc is None or scale == 1.0:
            model_output = self.model.apply_model(x, t, c)
        else:
            x_in, t_in = torch.cat([x] * 2), torch.cat([t] * 2)
            if isinstance(c, dict):
                c_in = {k: [torch.cat([uc[k][i], c[k][i]]) for i in range(len(c[k]))] for k in c}
            else:
                c_in = torch.cat([uc, c])
            model_uncond, model_t = self.model.apply_model(x_in, t_in, c_in).chunk(2)
            model_output = model_uncond + scale * (model_t - model_uncond)
        if self.model.parameterization == "v":
            e_t = self.model.predict_eps_from_z_and_v(x, t, model_output)
        else:
            e_t = model_output
        a_t = torch.full((b, 1, 1, 1), float(self.ddim_alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(self.ddim_alphas_prev[index]))
        sigma_t = torch.full((b, 1, 1, 1), float(self.ddim_sigmas[index]))
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float(self.ddim_sqrt_one_minus_alphas[index]))
        if self.model.parameterization != "v":
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        else:
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, model_output)
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        return a_prev.sqrt() * pred_x0 + dir_xt


class CompVisLDM(CompVisCompat, LDM):
    """``LDM`` with CompVis' names (``num_timesteps``, the tables, ``parameterization``) that its sampler reads."""


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize(("key", "timesteps", "steps", "scale"), [("hybrid", 1000, 50, 3.0), ("crossattn", T, 5, 1.0)])
def test_compvis_ddim_sampler_runs_against_the_mixin(
    key: str, timesteps: int, steps: int, scale: float, parameterization: str
) -> None:
    model = CompVisLDM(
        key, timesteps=timesteps, parameterization=parameterization, linear_start=0.00085, linear_end=0.012
    )
    model.eval()
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(3, Z, 4, 4, generator=g)
    context = model.class_embed(torch.tensor([0, 2, 3]))[:, None, :].detach()
    if key == "hybrid":
        image = torch.randn(3, Z, 4, 4, generator=g)
        c: Any = {"c_concat": [image], "c_crossattn": [context]}
        uc: Any = {"c_concat": [image], "c_crossattn": [torch.zeros_like(context)]}
    else:
        c, uc = context, None
    theirs = CompVisDDIMSampler(model).sample(steps, x_T, c, uc, scale)
    ours = model.sample(
        x_T.shape, cond=c, uncond=uc, guidance_scale=scale, num_steps=steps, method="uniform", x_T=x_T, decode=False
    )
    diff, size = float((ours - theirs).abs().max()), float(theirs.abs().max())
    print(
        f"CompVis DDIMSampler vs sample() [{key}, {parameterization}, T={timesteps}, {steps} steps]: {diff:.3g} "
        f"(max |x| {size:.3g})"
    )
    assert torch.isfinite(ours).all() and float(theirs.abs().max()) > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((2.7, Z, 4, 4), r"shape\[0\] must be an integer, got 2.7"), ((2, Z, 4, True), r"shape\[3\] must be an integer")],
)
def test_sample_refuses_a_shape_of_non_integers(shape: Any, match: str) -> None:  # issue 13, point 7
    with pytest.raises(TypeError, match=match):
        LDM(None).sample(shape, num_steps=2)
