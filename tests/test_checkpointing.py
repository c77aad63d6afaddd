import functools
import warnings

import pytest
import torch
from torch import nn

from lightning_ldm.checkpointing import AUTOCAST_DEVICE_TYPES, CheckpointFunction, checkpoint


class Block(nn.Module):
    def __init__(self, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))))


class SeedCheckpoint(torch.autograd.Function):
    """CompVis' CheckpointFunction: no autocast, no RNG state. The reference bug."""

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return ctx.run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        ctx.input_tensors = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with torch.enable_grad():
            output_tensors = ctx.run_function(*[x.view_as(x) for x in ctx.input_tensors])
        grads = torch.autograd.grad(
            output_tensors, ctx.input_tensors + ctx.input_params, output_grads, allow_unused=True
        )
        return (None, None, *grads)


def grads_of(model: nn.Module, x: torch.Tensor, run, *, autocast: bool) -> list[torch.Tensor]:
    """Forward (inside CPU bf16 autocast when asked), backward OUTSIDE autocast, as Lightning does."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = run(model, x)
    (y.float() ** 2).sum().backward()
    return [x.grad, *(p.grad for p in model.parameters())]


def plain(model, x):
    return model(x)


def ours(model, x):
    return checkpoint(model, (x,), model.parameters(), True)


def ours_non_reentrant(model, x):
    return checkpoint(model, (x,), model.parameters(), True, use_reentrant=False)


def seed(model, x):
    return SeedCheckpoint.apply(model, 1, x, *model.parameters())


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((u.float() - v.float()).abs().max().item() for u, v in zip(a, b, strict=True))


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    return Block(32), torch.randn(8, 32)


def test_cpu_bf16_autocast_grads_equal_uncheckpointed(model_and_input):
    model, x = model_and_input
    reference = grads_of(model, x, plain, autocast=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated torch.cpu.amp / torch.cuda.amp API
        # ... in our code: torch < 2.5's own non-reentrant recompute still calls torch.cpu.amp.autocast
        warnings.filterwarnings("ignore", r"`torch\.cpu\.amp\.autocast\(", FutureWarning, "torch.utils.checkpoint")
        got = grads_of(model, x, ours, autocast=True)
        got_nr = grads_of(model, x, ours_non_reentrant, autocast=True)
    assert max_diff(got, reference) == 0.0
    assert max_diff(got_nr, reference) == 0.0
    # CompVis' checkpoint recomputes in float32 outside autocast: visibly different gradients
    assert max_diff(grads_of(model, x, seed, autocast=True), reference) > 1e-3
    assert not torch.is_autocast_enabled("cpu")


def test_float32_grads_equal_uncheckpointed(model_and_input):
    model, x = model_and_input
    assert max_diff(grads_of(model, x, ours, autocast=False), grads_of(model, x, plain, autocast=False)) == 0.0


def test_recompute_uses_forward_autocast_state_not_backward_one(model_and_input):
    model, x = model_and_input

    def run(fn):
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        loss = (fn(model, xg).float() ** 2).sum()  # float32 forward
        with torch.autocast("cpu", dtype=torch.bfloat16):  # backward inside autocast (manual_backward style)
            loss.backward()
        return [xg.grad, *(p.grad for p in model.parameters())]

    reference = run(plain)
    assert max_diff(run(ours), reference) == 0.0
    assert max_diff(run(seed), reference) > 1e-3  # the seed recomputes the forward in bf16 here


def test_dropout_recomputes_identically_and_rng_is_restored():
    torch.manual_seed(0)
    model = Block(32, dropout=0.5).train()
    x = torch.randn(8, 32)
    torch.manual_seed(123)
    reference = grads_of(model, x, plain, autocast=False)
    after_reference = torch.get_rng_state()
    torch.manual_seed(123)
    got = grads_of(model, x, ours, autocast=False)
    assert max_diff(got, reference) == 0.0
    assert torch.equal(torch.get_rng_state(), after_reference)  # backward left the global RNG where it was
    torch.manual_seed(123)
    no_rng = grads_of(
        model, x, lambda m, x: checkpoint(m, (x,), m.parameters(), True, preserve_rng_state=False), autocast=False
    )
    assert max_diff(no_rng, reference) > 0.0  # a different dropout mask without the RNG state


def count_saved_bytes(run) -> int:
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def test_saves_fewer_tensors_than_no_checkpoint():
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(64) for _ in range(8))
    x = torch.randn(16, 64, requires_grad=True)

    def stack(use_checkpoint: bool):
        h = x
        for block in blocks:
            h = checkpoint(block, (h,), block.parameters(), use_checkpoint)
        return h.sum()

    none = count_saved_bytes(lambda: stack(False))
    ckpt = count_saved_bytes(lambda: stack(True))
    assert ckpt == 8 * x.numel() * 4  # only each block's input
    assert ckpt <= none / 4, (ckpt, none)


def test_non_tensor_inputs_pass_through():
    lin = nn.Linear(4, 4)

    def func(x, scale, bias, label):
        assert label == "tag" and bias is None
        return lin(x) * scale

    x = torch.randn(3, 4, requires_grad=True)
    y = checkpoint(func, (x, 2.5, None, "tag"), lin.parameters(), True)
    y.sum().backward()
    expected = lin.weight.sum(0).expand(3, 4) * 2.5
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(lin.bias.grad, torch.full((4,), 7.5))


def test_integer_tensor_input_and_tuple_output_with_unused_part():
    emb = nn.Embedding(10, 4)

    def func(x, idx):
        return x * emb(idx), idx.float()

    x = torch.randn(3, 4, requires_grad=True)
    idx = torch.tensor([1, 2, 3])
    out, _ = checkpoint(func, (x, idx), emb.parameters(), True)
    out.sum().backward()
    torch.testing.assert_close(x.grad, emb.weight[idx].detach())
    assert emb.weight.grad[idx].eq(x.detach()).all()


def test_module_parameters_missing_from_params_are_added(model_and_input):
    model, x = model_and_input
    reference = grads_of(model, x, plain, autocast=False)
    for func in (model, model.forward, functools.partial(model.forward)):
        got = grads_of(model, x, lambda m, x, func=func: checkpoint(func, (x,), [], True), autocast=False)
        assert max_diff(got, reference) == 0.0


def test_duplicated_params_get_their_gradient_once(model_and_input):
    model, x = model_and_input
    reference = grads_of(model, x, plain, autocast=False)
    params = [*model.parameters(), *model.parameters()]
    got = grads_of(model, x, lambda m, x: checkpoint(m, (x,), params, True), autocast=False)
    assert max_diff(got, reference) == 0.0
    compvis_got = grads_of(model, x, lambda m, x: SeedCheckpoint.apply(m, 1, x, *params), autocast=False)
    assert max_diff(compvis_got, reference) > 0.0  # CompVis doubles them


def test_closure_parameters_need_params(model_and_input):
    model, x = model_and_input
    closure = lambda h: model(h)  # noqa: E731 - opaque to the module detection, as documented
    reference = grads_of(model, x, plain, autocast=False)
    got = grads_of(model, x, lambda m, x: checkpoint(closure, (x,), m.parameters(), True), autocast=False)
    assert max_diff(got, reference) == 0.0
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    checkpoint(closure, (xg,), [], True).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # the documented limit of the reentrant engine


def test_flag_false_calls_func_directly(model_and_input):
    model, x = model_and_input
    xg = x.clone().requires_grad_(True)
    y = checkpoint(model, (xg,), model.parameters(), False)
    assert torch.equal(y, model(xg))
    assert "CheckpointFunction" not in type(y.grad_fn).__name__


def test_nothing_requires_grad_runs_plainly(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        y = checkpoint(model, (x,), model.parameters(), True)
    assert y.grad_fn is None and torch.equal(y, model(x))
    model.requires_grad_(False)
    y = checkpoint(model, (x,), model.parameters(), True)
    assert y.grad_fn is None


def test_second_backward_raises_and_retain_graph_works(model_and_input):
    model, x = model_and_input
    xg = x.clone().requires_grad_(True)
    loss = ours(model, xg).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()

    xg = x.clone().requires_grad_(True)
    loss = ours(model, xg).sum()
    loss.backward(retain_graph=True)
    first = xg.grad.clone()
    loss.backward()
    torch.testing.assert_close(xg.grad, 2 * first)


def test_in_place_change_of_input_before_backward_is_detected(model_and_input):
    model, x = model_and_input
    h = x.clone().requires_grad_(True) * 1.0
    y = ours(model, h)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_apply_directly_like_the_seed(model_and_input):
    model, x = model_and_input
    xg = x.clone().requires_grad_(True)
    CheckpointFunction.apply(model, 1, xg, *model.parameters()).sum().backward()
    ref_x = x.clone().requires_grad_(True)
    model(ref_x).sum().backward()
    torch.testing.assert_close(xg.grad, ref_x.grad, rtol=0, atol=0)


def test_autocast_device_types_cover_cpu_and_cuda():
    assert {"cpu", "cuda"} <= set(AUTOCAST_DEVICE_TYPES)


@pytest.mark.parametrize(
    ("inputs", "params", "match"),
    [
        (torch.randn(2, 4), [], r"inputs must be a sequence .* got Tensor; wrap a single tensor as \(x,\)"),
        ("abc", [], "inputs must be a sequence .* got str"),
        ((torch.randn(2, 4),), torch.randn(3), "params must be an iterable of tensors .* got a single Tensor"),
        ((torch.randn(2, 4),), [1.0], r"params\[0\] must be a torch.Tensor, got float"),
        (([torch.randn(2, 4, requires_grad=True)],), [], r"inputs\[0\] is a list holding a tensor that requires grad"),
        (({"x": torch.randn(2, 4, requires_grad=True)},), [], r"inputs\[0\] is a dict holding a tensor"),
    ],
)
def test_argument_errors(inputs, params, match):
    with pytest.raises(TypeError, match=match):
        checkpoint(lambda *a: a[0] if isinstance(a[0], torch.Tensor) else torch.ones(1), inputs, params, True)


def test_list_output_refused_at_forward():
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"must return a Tensor or a tuple .* list"):
        checkpoint(lambda x: [x * 2], (x,), [], True)
    assert checkpoint(lambda x: [x * 2], (x,), [], True, use_reentrant=False)[0].requires_grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast_and_dropout():
    torch.manual_seed(0)
    model = Block(32, dropout=0.3).cuda().train()
    x = torch.randn(8, 32, device="cuda")

    def run(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.float16):
            y = fn(model, xg)
        (y.float() ** 2).sum().backward()
        return [xg.grad, *(p.grad for p in model.parameters())]

    assert max_diff(run(ours), run(plain)) == 0.0


class CondBlock(nn.Module):
    """A denoiser block with keyword conditions, as CompVis' UNet: ``block(x, context=..., y=..., scale=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin_x = nn.Linear(4, 4)
        self.lin_c = nn.Linear(3, 4)
        self.lin_y = nn.Linear(2, 4)

    def forward(self, x, context=None, y=None, scale=1.0, label=None):
        assert label in (None, "tag")
        out = self.lin_x(x) + self.lin_c(context).mean(1)
        return (out + self.lin_y(y)) * scale if y is not None else out * scale


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_keyword_tensors_get_their_gradient(use_reentrant):
    """Issue 13.3: tensors passed by keyword are differentiated (they travel positionally through the engine)."""
    torch.manual_seed(0)
    block, conditioner = CondBlock(), nn.Linear(5, 3)
    x, tokens, y = torch.randn(2, 4), torch.randn(2, 7, 5), torch.randn(2, 2)

    def grads(run):
        block.zero_grad(set_to_none=True)
        conditioner.zero_grad(set_to_none=True)
        xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        out = run(xg, conditioner(tokens), yg)
        (out**2).sum().backward()
        return [xg.grad, yg.grad, *(p.grad for p in (*block.parameters(), *conditioner.parameters()))]

    reference = grads(lambda x, c, y: block(x, context=c, y=y, scale=2.0, label="tag"))
    got = grads(
        lambda x, c, y: checkpoint(
            block,
            (x,),
            [],
            True,
            use_reentrant=use_reentrant,
            kwargs={"context": c, "y": y, "scale": 2.0, "label": "tag"},
        )
    )
    assert all(g is not None for g in got)
    assert max_diff(got, reference) == 0.0
    assert conditioner.weight.grad.abs().sum() > 0


def test_keyword_arguments_are_validated():
    block = CondBlock()
    x = torch.randn(2, 4, requires_grad=True)
    context = torch.randn(2, 7, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"kwargs\['context'\] is a list holding a tensor that requires grad"):
        checkpoint(block, (x,), [], True, kwargs={"context": [context]})
    with pytest.raises(TypeError, match=r"kwargs must be a mapping of keyword names \(str\) to func's arguments"):
        checkpoint(block, (x,), [], True, kwargs=[("context", context)])
    with pytest.raises(TypeError, match=r"kwargs must be a mapping of keyword names \(str\) .* got \{0: 1\}"):
        checkpoint(block, (x,), [], True, kwargs={0: 1})
    assert torch.equal(checkpoint(block, (x,), [], False, kwargs={"context": context}), block(x, context=context))
