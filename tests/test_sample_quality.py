"""SampleQualityMonitor and the feature extractors: torchmetrics' FID/KID on the same features, DDP, resume, RNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_ldm.callbacks import SampleLogger, SampleQualityMonitor
from lightning_ldm.callbacks.sample_quality import _rows, _share, fid_and_kid
from lightning_ldm.features import InceptionFeatures, RandomConvFeatures
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.seeding import derive_seed
from tests.lightning_helpers import RecordingLogger, make_trainer, run_spawned

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

T = 20
M = 12  # samples per evaluation
CLASSES = 3


class ImageDenoiser(DiffusionMixin, L.LightningModule):
    """``forward(x_t, t, cond)`` on (B, 1, 4, 4) images: a 1×1 conv, a per-timestep and a per-class offset."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.register_schedule(beta_schedule="linear", timesteps=T)
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 1)
        self.emb = nn.Embedding(T, 1)
        self.cls = nn.Embedding(CLASSES, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.lr = lr

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        out = self.conv(x) + self.emb(t).view(-1, 1, 1, 1)
        return out if cond is None else out + self.cls(cond).view(-1, 1, 1, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.diffusion_loss(batch[0])

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.diffusion_loss(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def images(n: int, seed: int, shift: float = 0.0) -> Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)).tanh() + shift


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(images(n, 1)), batch_size=batch_size)


REFERENCE = images(20, 7)


class Recorder(SampleQualityMonitor):
    """Keeps every batch of samples; writes the published values to ``out_dir/rank{r}.json`` when given."""

    def __init__(self, *args: Any, out_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_dir = out_dir
        self.batches: list[Tensor] = []
        self.published: list[tuple[int, dict[str, float]]] = []
        self.reference_calls = 0

    def sample(self, *args: Any, **kwargs: Any) -> Tensor:
        samples = super().sample(*args, **kwargs)
        self.batches.append(samples.detach().clone())
        return samples

    def reference_images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        self.reference_calls += 1
        return super().reference_images(trainer, pl_module)

    def publish(self, trainer: L.Trainer, values: dict[str, float], step: int) -> None:
        super().publish(trainer, values, step)
        self.published.append((step, dict(values)))
        if self.out_dir is not None:
            Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.published))


class _Vectors(nn.Identity):
    """The identity with ``num_features`` (torchmetrics' FID otherwise probes it with a 299×299 image)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def features_net() -> RandomConvFeatures:
    return RandomConvFeatures(1, width=4, depth=2, grid=2, seed=3)


def torchmetrics_values(samples: Tensor, reference: Tensor, extractor: nn.Module, seed: int) -> dict[str, float]:
    """FID and KID by torchmetrics itself, its features computed by torchmetrics through ``extractor``."""
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(reference, real=True)
    fid.update(samples, real=False)
    kid = KernelInceptionDistance(feature=extractor, subset_size=min(len(samples), len(reference)), subsets=100)
    kid.update(reference, real=True)
    kid.update(samples, real=False)
    torch.manual_seed(derive_seed(seed, 2))
    kid_mean, kid_std = kid.compute()
    return {"quality/fid": float(fid.compute()), "quality/kid_mean": float(kid_mean), "quality/kid_std": float(kid_std)}


# ---------------------------------------------------------------------------------------------------- features
def test_random_conv_features_are_seeded_frozen_and_leave_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    net, again, other = RandomConvFeatures(3, seed=0), RandomConvFeatures(3, seed=0), RandomConvFeatures(3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.randn(5, 3, 9, 7)
    out = net(x)
    assert out.shape == (5, 16 * 4) and net.num_features == 64
    assert torch.equal(out, again(x)) and not torch.allclose(out, other(x))
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training
    # He-normal weights: std sqrt(2 / fan_in) for the first layer (fan_in = 3·9), no bias
    first = net.net[0]
    assert first.bias is None
    expected = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * (2.0 / 27) ** 0.5
    torch.testing.assert_close(first.weight, expected, rtol=0, atol=0)
    # the pooled layout: features of a 1×1 image, 2×2 grid → every cell holds the same activations
    tiny = RandomConvFeatures(1, width=2, depth=1, grid=2)(torch.ones(1, 1, 1, 1)).reshape(2, 4)
    assert torch.equal(tiny, tiny[:, :1].expand(2, 4))


def test_random_conv_features_refuse_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match=r"width=0 is out of range; expected an integer >= 1"):
        RandomConvFeatures(1, width=0)
    with pytest.raises(TypeError, match="in_channels must be an integer"):
        RandomConvFeatures(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\), got shape \(2, 1, 4, 4\)"):
        RandomConvFeatures(3)(torch.zeros(2, 1, 4, 4))
    with pytest.raises(TypeError, match="images must be a floating tensor"):
        RandomConvFeatures(1)(torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_inception_features_map_images_to_uint8_rgb(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Tensor] = []

    class Stub(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(x)
            return x.float().mean(dim=(2, 3))

    monkeypatch.setattr("lightning_ldm.features.load_inception", lambda weights_path=None: Stub())
    net = InceptionFeatures(value_range=(0.0, 2.0))
    out = net(torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2))
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (1, 3, 2, 2)
    assert seen[0][0, 2].flatten().tolist() == [0, 128, 255, 255]  # round(255·x/2), clamped
    assert out.shape == (1, 3)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1 or 3, H, W\), got shape \(1, 2, 2, 2\)"):
        net(torch.zeros(1, 2, 2, 2))


def test_inception_features_say_what_they_need_without_torch_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="InceptionFeatures needs torch-fidelity"):
            InceptionFeatures()
    else:  # pragma: no cover - only where torch-fidelity is installed
        pytest.skip("torch-fidelity is installed")


# --------------------------------------------------------------------------------------------------- helpers
def test_shares_tile_the_rows_in_rank_order_as_tensor_split_does() -> None:
    for total in (2, 5, 12, 13):
        for world in (1, 2, 3):
            if world > total:
                continue
            cuts = [_share(total, r, world) for r in range(world)]
            sizes = [len(part) for part in torch.tensor_split(torch.arange(total), world)]
            assert [b - a for a, b in cuts] == sizes
            assert cuts[0][0] == 0 and cuts[-1][1] == total
            assert all(cuts[r][1] == cuts[r + 1][0] for r in range(world - 1))


def test_conditioning_is_cut_with_the_noise() -> None:
    labels = torch.arange(6)
    cut = _rows({"y": labels, "scale": torch.tensor(2.0), "c": [labels * 2, "text"], "n": None}, 2, 4, 6)
    assert cut["y"].tolist() == [2, 3] and cut["c"][0].tolist() == [4, 6] and cut["c"][1] == "text"
    assert float(cut["scale"]) == 2.0 and cut["n"] is None
    assert _rows(torch.zeros(5, 2), 0, 1, 6).shape == (5, 2)  # another batch size: passed whole


# ------------------------------------------------------------------------------------------------ the metric
def test_fid_and_kid_equal_torchmetrics_on_the_same_features() -> None:
    torch.manual_seed(0)
    labels = torch.arange(M) % CLASSES
    logger = RecordingLogger()
    monitor = Recorder(
        (M, 1, 4, 4), REFERENCE, every_n_steps=2, at_validation_end=False, features=features_net(),
        cond=labels, uncond=labels, seed=11, batch_size=5, sample_kwargs={"num_steps": 5, "guidance_scale": 2.0},
    )  # fmt: skip
    make_trainer(max_steps=4, callbacks=[EMAWeightAveraging(), monitor], logger=logger).fit(ImageDenoiser(), loader())
    assert [step for step, _ in monitor.published] == [2, 4]
    # each evaluation sampled 12 = 5 + 5 + 2 images from SampleLogger's noise for the same shape and seed
    assert torch.equal(monitor.noise, SampleLogger((M, 1, 4, 4), seed=11).noise)
    assert [len(b) for b in monitor.batches] == [5, 5, 2, 5, 5, 2]
    for index, (step, values) in enumerate(monitor.published):
        samples = torch.cat(monitor.batches[3 * index : 3 * index + 3])
        expected = torchmetrics_values(samples, REFERENCE, features_net(), seed=11)
        assert values == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert values["quality/fid"] > 0 and values["quality/kid_std"] > 0
        for name, value in values.items():  # written to the logger at the evaluation's step
            assert (step, pytest.approx(value)) in logger.series(name)
    assert monitor.last_metrics == monitor.published[-1][1]
    assert monitor.reference_calls == 1  # computed once, cached


def test_the_metric_tells_shifted_images_from_the_reference() -> None:
    """Same features, same maths: a reference against itself-like data scores lower than against shifted data."""
    extractor = features_net()
    close = torchmetrics_values(images(20, 8), REFERENCE, extractor, 0)["quality/fid"]
    far = torchmetrics_values(images(20, 8, shift=1.0), REFERENCE, extractor, 0)["quality/fid"]
    assert 0 < close < far


def test_fid_and_kid_of_feature_sets_equal_torchmetrics_and_leave_the_rng_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 6, generator=gen), torch.randn(30, 6, generator=gen) * 1.5 + 0.5
    state = torch.get_rng_state()
    values = fid_and_kid(real, fake, kid_subset_size=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    fid = FrechetInceptionDistance(feature=_Vectors(6))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    kid = KernelInceptionDistance(feature=nn.Identity(), subset_size=20)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(derive_seed(3, 2))
    kid_mean, kid_std = kid.compute()
    assert values == {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
    # the closed form on the same features: ||mu_r - mu_f||² + tr(S_r + S_f - 2 (S_r S_f)^½), in float64
    r, f = real.double(), fake.double()
    s_r, s_f = torch.cov(r.T), torch.cov(f.T)
    root = torch.linalg.eigvals(s_r @ s_f).sqrt().real.sum()
    closed = float((r.mean(0) - f.mean(0)).square().sum() + s_r.trace() + s_f.trace() - 2 * root)
    assert values["fid"] == pytest.approx(closed, rel=1e-5)
    assert fid_and_kid(real, real)["fid"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    ("real", "fake", "kwargs", "error", "match"),
    [
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), {}, TypeError, "real must be a floating tensor"),
        (torch.zeros(4, 3), torch.zeros(1, 3), {}, ValueError, r"fake must be feature vectors \(count >= 2, D\)"),
        (torch.zeros(4, 3, 2), torch.zeros(4, 3), {}, ValueError, r"real must be feature vectors .* \(4, 3, 2\)"),
        (torch.zeros(4, 3), torch.zeros(4, 2), {}, ValueError, "real and fake features differ in length: 3 and 2"),
        (torch.zeros(4, 3), torch.zeros(5, 3), {"kid_subset_size": 5}, ValueError, "kid_subset_size=5 exceeds"),
        (torch.zeros(4, 3), torch.zeros(5, 3), {"kid_subsets": 0}, ValueError, r"kid_subsets=0 is out of range"),
    ],
)
def test_fid_and_kid_refuse_bad_features(
    real: Tensor, fake: Tensor, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fid_and_kid(real, fake, **kwargs)


def test_a_batch_size_does_not_change_the_values() -> None:
    values = []
    for batch_size in (None, 4, 5):
        monitor = Recorder(
            (M, 1, 4, 4),
            REFERENCE,
            every_n_steps=2,
            at_validation_end=False,
            batch_size=batch_size,
            sample_kwargs={"num_steps": 4},
        )
        torch.manual_seed(0)  # the same training draws in each fit
        make_trainer(max_steps=2, callbacks=[monitor]).fit(ImageDenoiser(), loader())
        values.append(monitor.last_metrics)
    assert values[1] == pytest.approx(values[0], rel=1e-6) and values[2] == pytest.approx(values[0], rel=1e-6)


def test_the_default_features_are_random_conv_features_of_the_reference_channels() -> None:
    monitor = Recorder(
        (M, 1, 4, 4), REFERENCE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 3}
    )
    make_trainer(max_steps=2, callbacks=[monitor]).fit(ImageDenoiser(), loader())
    samples = torch.cat(monitor.batches)
    expected = torchmetrics_values(samples, REFERENCE, RandomConvFeatures(1), seed=0)
    assert monitor.last_metrics == pytest.approx(expected, rel=1e-9)


def test_training_is_untouched_by_the_monitor() -> None:
    """The same fit with and without the monitor: the same weights, EMA weights and RNG states afterwards."""

    def fit(with_monitor: bool) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        torch.manual_seed(3)
        model = ImageDenoiser()
        model.diffusion_generator = torch.Generator().manual_seed(9)
        ema = EMAWeightAveraging()
        callbacks: list[Any] = [ema]
        if with_monitor:
            callbacks.append(
                SampleQualityMonitor(
                    (M, 1, 4, 4), REFERENCE, every_n_steps=1, sample_kwargs={"eta": 0.5, "num_steps": 3}
                )
            )
        trainer = make_trainer(max_steps=4, callbacks=callbacks)
        trainer.fit(model, DataLoader(TensorDataset(images(32, 1)), batch_size=8, shuffle=True))
        assert model.training
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, torch.get_rng_state(), model.diffusion_generator.get_state()

    (with_state, with_rng, with_gen), (without_state, without_rng, without_gen) = fit(True), fit(False)
    assert with_state.keys() == without_state.keys()
    assert all(torch.equal(with_state[k], without_state[k]) for k in with_state)
    assert torch.equal(with_rng, without_rng) and torch.equal(with_gen, without_gen)


def test_model_checkpoint_can_monitor_the_fid(tmp_path: Path) -> None:
    monitor = Recorder(
        (M, 1, 4, 4), REFERENCE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 3}
    )
    checkpoint = ModelCheckpoint(tmp_path, monitor="quality/fid", mode="min", every_n_train_steps=2, save_top_k=1)
    trainer = make_trainer(max_steps=6, callbacks=[monitor, checkpoint], enable_checkpointing=True)
    trainer.fit(ImageDenoiser(lr=0.3), loader())
    fids = [values["quality/fid"] for _, values in monitor.published]
    assert len(fids) == 3 and len(set(fids)) == 3
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(min(fids))
    best_step = next(step for step, values in monitor.published if values["quality/fid"] == min(fids))
    assert f"step={best_step}" in Path(checkpoint.best_model_path).name
    assert float(trainer.callback_metrics["quality/fid"]) == pytest.approx(fids[-1])


def test_validation_end_evaluates_and_validate_alone_works() -> None:
    monitor = Recorder((M, 1, 4, 4), REFERENCE, sample_kwargs={"num_steps": 3})
    trainer = make_trainer(max_steps=4, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=1)
    trainer.callbacks.append(monitor)  # type: ignore[attr-defined]
    trainer.fit(ImageDenoiser(), loader(), loader(8))
    assert [step for step, _ in monitor.published] == [2, 4]  # not the sanity check
    model = ImageDenoiser()
    alone = Recorder((M, 1, 4, 4), REFERENCE, sample_kwargs={"num_steps": 3})
    make_trainer(callbacks=[alone]).validate(model, loader(8), verbose=False)
    assert [step for step, _ in alone.published] == [0]
    assert alone.reference_calls == 1


# ----------------------------------------------------------------------------------------------------- resume
def test_resume_recomputes_the_reference_and_warns_when_it_changed(tmp_path: Path) -> None:
    first = Recorder((M, 1, 4, 4), REFERENCE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 3})
    checkpoint = ModelCheckpoint(tmp_path, save_last=True, every_n_train_steps=2, save_top_k=0)
    make_trainer(max_steps=2, callbacks=[first, checkpoint], enable_checkpointing=True).fit(ImageDenoiser(), loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("Recorder"))
    assert state["last_step"] == 2 and state["reference"]["count"] == 20 and state["reference"]["dim"] == 64
    assert set(state) == {"last_step", "reference"}  # no features in the checkpoint: they are recomputed

    same = Recorder((M, 1, 4, 4), REFERENCE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 3})
    with pytest.warns() as record:
        make_trainer(max_steps=4, callbacks=[same]).fit(ImageDenoiser(), loader(), ckpt_path=tmp_path / "last.ckpt")
        import warnings

        warnings.warn("sentinel", UserWarning, stacklevel=1)  # pytest.warns needs one
    assert not any("reference features differ" in str(w.message) for w in record)
    assert same.reference_calls == 1 and [step for step, _ in same.published] == [4]  # step 2 not repeated

    changed = Recorder(
        (M, 1, 4, 4), images(20, 99), every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 3}
    )
    with pytest.warns(UserWarning, match="reference features differ from those of the checkpoint"):
        make_trainer(max_steps=4, callbacks=[changed]).fit(ImageDenoiser(), loader(), ckpt_path=tmp_path / "last.ckpt")
    assert changed.reference_calls == 1


def test_a_second_fit_recomputes_the_reference() -> None:
    monitor = Recorder(
        (M, 1, 4, 4), REFERENCE, every_n_steps=2, at_validation_end=False, sample_kwargs={"num_steps": 3}
    )
    model = ImageDenoiser()
    make_trainer(max_steps=2, callbacks=[monitor]).fit(model, loader())
    monitor.reference = images(20, 5)
    make_trainer(max_steps=2, callbacks=[monitor]).fit(model, loader())
    assert monitor.reference_calls == 2 and [step for step, _ in monitor.published] == [2, 2]


# -------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_gloo_ranks_give_the_values_of_one_process(tmp_path: Path) -> None:
    """Odd counts (13 samples, 21 reference images) share unevenly over 2 ranks; the gathered metric is the same."""
    reference = images(21, 7)
    labels = torch.arange(13) % CLASSES

    def monitor(out_dir: str) -> Recorder:
        return Recorder(
            (13, 1, 4, 4), reference, features=features_net(), cond=labels, uncond=labels, seed=4, out_dir=out_dir,
            sample_kwargs={"num_steps": 3, "guidance_scale": 2.0},
        )  # fmt: skip

    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir(), ddp_dir.mkdir()
    make_trainer(callbacks=[monitor(str(single_dir))]).validate(ImageDenoiser(), loader(8), verbose=False)
    run_spawned(
        lambda trainer: trainer.validate(ImageDenoiser(), loader(8), verbose=False), callbacks=[monitor(str(ddp_dir))]
    )
    single = json.loads((single_dir / "rank0.json").read_text())
    ranks = [json.loads((ddp_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank computed the same values
    assert len(single) == len(ranks[0]) == 1
    assert ranks[0][0][1] == pytest.approx(single[0][1], rel=1e-6)
    assert single[0][1]["quality/fid"] > 0


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reference": None}, ValueError, "reference=None needs reference_images overridden"),
        ({"every_n_steps": None, "at_validation_end": False}, ValueError, "SampleQualityMonitor would never run"),
        ({"every_n_steps": 0}, ValueError, r"every_n_steps=0 is out of range"),
        ({"features": "inception"}, TypeError, "features must be an nn.Module mapping images"),
        ({"batch_size": 0}, ValueError, r"batch_size=0 is out of range"),
        ({"kid_subsets": 0}, ValueError, r"kid_subsets=0 is out of range"),
        ({"kid_subset_size": 1}, ValueError, r"kid_subset_size=1 is out of range; expected an integer >= 2"),
        ({"prefix": 3}, TypeError, "prefix must be a string, got 3 of type int"),
        ({"shape": (1, 1, 4, 4)}, ValueError, r"shape\[0\]=1 is out of range; expected an integer >= 2"),
        ({"reference": torch.zeros(4, 1, dtype=torch.long)}, TypeError, "reference must be a floating tensor"),
        ({"reference": torch.zeros(1, 1, 4, 4)}, ValueError, r"reference.shape\[0\]=1 is out of range"),
        ({"sample_kwargs": {"guidance_scale": 2.0}}, ValueError, "guidance_scale=2 needs both cond and uncond"),
        ({"sample_kwargs": {"num_steps": 0}}, ValueError, r"sample_kwargs\['num_steps'\]=0 is out of range"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    options: dict[str, Any] = {"shape": (M, 1, 4, 4), "reference": REFERENCE, **kwargs}
    with pytest.raises(error, match=match):
        SampleQualityMonitor(**options)


def test_a_module_that_cannot_sample_is_refused_at_setup() -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self.lin(batch[0][:, :1]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = SampleQualityMonitor((M, 1, 4, 4), REFERENCE, every_n_steps=1)
    with pytest.raises(TypeError, match=r"SampleQualityMonitor needs a LightningModule that mixes in .* got Plain"):
        make_trainer(callbacks=[monitor]).fit(Plain(), loader())


def test_a_kid_subset_larger_than_the_sets_and_a_non_image_reference_are_refused() -> None:
    too_big = SampleQualityMonitor(
        (M, 1, 4, 4), REFERENCE, every_n_steps=1, kid_subset_size=15, sample_kwargs={"num_steps": 2}
    )
    with pytest.raises(ValueError, match=r"kid_subset_size=15 exceeds the 12 samples or the 20 reference images"):
        make_trainer(callbacks=[too_big]).fit(ImageDenoiser(), loader())
    flat = SampleQualityMonitor((M, 1, 4, 4), torch.zeros(5, 16), every_n_steps=1, sample_kwargs={"num_steps": 2})
    with pytest.raises(ValueError, match=r"default feature extractor takes images \(N, C, H, W\), got reference shape"):
        make_trainer(callbacks=[flat]).fit(ImageDenoiser(), loader())


def test_reference_images_of_another_shape_are_refused_at_fit_start() -> None:
    rgb = SampleQualityMonitor((M, 3, 4, 4), REFERENCE, every_n_steps=1, sample_kwargs={"num_steps": 2})
    trainer = make_trainer(callbacks=[rgb])
    with pytest.raises(
        ValueError,
        match=r"^SampleQualityMonitor: the samples will have shape \(3, 4, 4\) each and the reference images "
        r"\(1, 4, 4\); FID compares images of one shape",
    ):
        trainer.fit(ImageDenoiser(), loader())
    assert trainer.global_step == 0  # refused at train start, not at the first evaluation


def test_samples_of_another_shape_than_the_reference_are_refused_before_their_features() -> None:
    class Upsampled(SampleQualityMonitor):  # an overridden sample: its shape is known only once it has run
        def sample(self, trainer: Any, pl_module: Any, noise: Tensor, *args: Any) -> Tensor:
            return super().sample(trainer, pl_module, noise, *args).repeat_interleave(2, dim=-1)

    monitor = Upsampled((M, 1, 4, 4), REFERENCE, every_n_steps=1, sample_kwargs={"num_steps": 2})
    with pytest.raises(ValueError, match=r"the samples have shape \(1, 4, 8\) each and the reference images \(1, 4, 4"):
        make_trainer(callbacks=[monitor]).fit(ImageDenoiser(), loader())


def test_an_averaging_callback_listed_after_is_warned_about() -> None:
    monitor = SampleQualityMonitor((M, 1, 4, 4), REFERENCE, every_n_steps=2, sample_kwargs={"num_steps": 2})
    with pytest.warns(UserWarning, match="listed before a WeightAveraging callback"):
        make_trainer(max_steps=2, callbacks=[monitor, EMAWeightAveraging()]).fit(ImageDenoiser(), loader())
