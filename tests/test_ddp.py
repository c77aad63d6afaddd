"""Two-process DDP on CPU (gloo): per-rank draws, weights in sync, samplers identical, bucket loss over both ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lightning_ldm.callbacks import DiffusionSeedCallback, TimestepLossMonitor
from lightning_ldm.seeding import derive_seed
from lightning_ldm.timestep_samplers import LossAwareSampler, UniformSampler
from tests.lightning_helpers import RankRecorder, make_loader, run_spawned

T = 20
SEED = 5


@pytest.mark.slow
def test_two_process_ddp(tmp_path: Path) -> None:
    model = RankRecorder(str(tmp_path), timesteps=T)
    cbs = [DiffusionSeedCallback(LossAwareSampler(history_per_term=1), seed=SEED), TimestepLossMonitor(num_buckets=4)]
    trainer = run_spawned(  # 16 samples per rank: 4 steps of 4
        lambda trainer: trainer.fit(model, make_loader(n=32, batch_size=4)),
        max_epochs=1, max_steps=-1, callbacks=cbs, use_distributed_sampler=True,
    )  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    rec0, rec1 = ranks[0]["recorded"], ranks[1]["recorded"]
    assert len(rec0) == len(rec1) == 4

    # each rank drew its own timesteps, from (seed, rank, batch counter); before warm-up, the uniform draw
    for rank, rec in enumerate((rec0, rec1)):
        first = UniformSampler().sample(4, T, "cpu", torch.Generator().manual_seed(derive_seed(SEED, 0, rank, 0)))
        assert torch.equal(rec[0][0], first)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(rec0, rec1, strict=True))

    # DDP kept the weights in sync
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(p0, p1)

    # the loss-aware samplers saw the same gathered history, in rank order
    reference = LossAwareSampler(history_per_term=1)
    reference.prepare(T)
    for (t0, l0), (t1, l1) in zip(rec0, rec1, strict=True):
        reference.update(torch.cat([t0, t1]), torch.cat([l0, l1]))
    for rank in ranks:
        assert torch.equal(rank["sampler"]["loss_history"], reference.state_dict()["loss_history"])
        assert torch.equal(rank["sampler"]["loss_counts"], reference.state_dict()["loss_counts"])

    # loss by bucket: the mean over both ranks' samples, the same on both ranks and in the main process
    t_all = torch.cat([t for t, _ in rec0 + rec1])
    l_all = torch.cat([loss for _, loss in rec0 + rec1]).double()
    for b in range(4):
        lo, hi = math.ceil(b * T / 4), math.ceil((b + 1) * T / 4) - 1
        name = f"loss_bucket/{lo:02d}-{hi:02d}"
        sel = (t_all >= lo) & (t_all <= hi)
        assert bool(sel.any())
        expected = float(l_all[sel].mean())
        assert ranks[0]["metrics"][name] == pytest.approx(expected, rel=1e-6)
        assert ranks[1]["metrics"][name] == ranks[0]["metrics"][name]
        assert float(trainer.callback_metrics[name]) == pytest.approx(expected, rel=1e-6)
        # and not the mean of one rank alone (both ranks contributed to this check overall)
    one_rank = torch.cat([t for t, _ in rec0])
    assert t_all.numel() == 2 * one_rank.numel()


def _exited(signal_name: str | None, exit_code: int = -6) -> mp.ProcessExitedException:
    return mp.ProcessExitedException("process 0 terminated", 0, 1, exit_code=exit_code, signal_name=signal_name)


def test_run_spawned_retries_an_abort_at_exit_once_and_nothing_else() -> None:
    calls: list[object] = []

    def abort_once(trainer: object) -> None:
        calls.append(trainer)
        if len(calls) == 1:
            raise _exited("SIGABRT")

    trainer = run_spawned(abort_once, max_steps=1)
    assert len(calls) == 2 and trainer is calls[1] and calls[0] is not calls[1]  # a new Trainer for the retry
    for failure in (_exited("SIGSEGV"), _exited(None, exit_code=1), RuntimeError("a real failure")):
        calls.clear()

        def fail(trainer: object, failure: Exception = failure) -> None:
            calls.append(trainer)
            raise failure

        with pytest.raises(type(failure)):
            run_spawned(fail, max_steps=1)
        assert len(calls) == 1  # not retried
    calls.clear()

    def abort(trainer: object) -> None:
        calls.append(trainer)
        raise _exited("SIGABRT")

    with pytest.raises(mp.ProcessExitedException):
        run_spawned(abort, max_steps=1)
    assert len(calls) == 2  # retried once, then raised
