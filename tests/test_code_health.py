"""Package-wide rules checked on the source: no private torch API, no import circle, a slim mixin, reference wording.

Each rule's detector is also run on a snippet that breaks it, so that a detector that finds nothing cannot pass
unnoticed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ldm"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def test_the_package_sources_are_found() -> None:
    names = {relative(p) for p in SOURCES}
    expected = {"lightning_ldm/mixin.py", "lightning_ldm/compat.py", "lightning_ldm/callbacks/diffusion_seed.py"}
    assert expected <= names


# --------------------------------------------------------------------------------------- (a) private torch API
def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _private_torch_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "torch" and any(_is_private(p) for p in parts[1:])


def private_torch_uses(source: str, filename: str = "<snippet>") -> list[str]:
    """Every ``torch._x`` attribute, import of an underscore torch module, or ``getattr(torch..., "_x")``."""
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):  # mark parents so that only the outermost attribute of a chain is reported
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    aliases: dict[str, str] = {}  # local name -> torch module path it is bound to
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    if _private_torch_module(alias.name):
                        found.append(f"{filename}:{node.lineno}: import {alias.name}")
                    aliases[alias.asname or "torch"] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "torch":
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _private_torch_module(full):
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {alias.name}")
                aliases[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            chain: list[str] = []
            base: ast.expr = node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                path = ".".join([aliases[base.id], *reversed(chain)])
                if _private_torch_module(path):
                    found.append(f"{filename}:{node.lineno}: {path}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
        ):
            target = node.args[0]
            root = target
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                found.append(f"{filename}:{node.lineno}: getattr({ast.unparse(target)}, {node.args[1].value!r})")
    return sorted(set(found))


#: Known uses, each to be replaced; the test fails on any other use, and on a listed one that has gone (so that the
#: list only shrinks). ``torch.device("privateuseone").type`` gives the same backend name through the public API.
KNOWN_PRIVATE_USES: frozenset[str] = frozenset()


def test_no_private_torch_api_in_the_package() -> None:
    found = {
        re.sub(r":\d+:", ":", use, count=1)  # without the line number
        for path in SOURCES
        for use in private_torch_uses(path.read_text(), relative(path))
    }
    assert sorted(found - KNOWN_PRIVATE_USES) == [], "private torch API used"
    assert sorted(KNOWN_PRIVATE_USES - found) == [], "fixed: remove it from KNOWN_PRIVATE_USES"


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("import torch\nx = torch._C._get_tracing_state()", "torch._C._get_tracing_state"),
        ("import torch as th\nth._dynamo.reset()", "torch._dynamo.reset"),
        ("import torch._dynamo", "import torch._dynamo"),
        ("import torch._inductor.config as cfg", "import torch._inductor.config"),
        ("from torch._functorch import config", "from torch._functorch import config"),
        ("from torch.utils._pytree import tree_map", "from torch.utils._pytree import tree_map"),
        ("from torch import _C", "from torch import _C"),
        ("from torch import nn\nnn.modules._functions", "torch.nn.modules._functions"),
        ("import torch\ngetattr(torch.ops, '_private')", "getattr(torch.ops, '_private')"),
    ],
)
def test_the_private_api_detector_finds_each_form(snippet: str, expected: str) -> None:
    found = private_torch_uses(snippet)
    assert len(found) >= 1 and any(expected in use for use in found), found


def test_the_private_api_detector_leaves_public_and_dunder_names_alone() -> None:
    snippet = (
        "import torch\nfrom torch import nn\nimport numpy as np\n"
        "torch.__version__\ntorch.compiler.is_compiling()\nnn.functional.silu\nnp._private\nx._version\n"
    )
    assert private_torch_uses(snippet) == []


# ---------------------------------------------------------------------------------------- (b) no import circle
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, lazy imports inside functions included.

    ``sources`` maps dotted module names to their source. The package's ``__init__`` (a facade that imports the
    Lightning layer on first use) is left out as a target, so that ``from lightning_ldm import noising`` counts as an
    import of ``lightning_ldm.noising``.
    """
    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lightning_ldm"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in sources else str(node.module))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lightning_ldm"))
        graph[name] = {m for m in found if m in sources and m not in (name, "lightning_ldm")}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_the_package_has_no_import_circle() -> None:
    graph = package_imports({_module_name(p): p.read_text() for p in SOURCES})
    assert len(graph) == len(SOURCES)
    assert import_circles(graph) == []


def test_the_circle_detector_finds_direct_lazy_and_long_circles() -> None:
    sources = {
        "lightning_ldm": "",
        "lightning_ldm.a": "from lightning_ldm.b import f",
        "lightning_ldm.b": "def f():\n    from lightning_ldm import a",  # lazy import inside a function
        "lightning_ldm.c": "import lightning_ldm.d",
        "lightning_ldm.d": "from lightning_ldm.e import g",
        "lightning_ldm.e": "from lightning_ldm.c import h",
        "lightning_ldm.f": "from lightning_ldm.a import x",  # depends on a circle, is not in one
    }
    circles = import_circles(package_imports(sources))
    assert sorted(circles) == [
        ["lightning_ldm.a", "lightning_ldm.b"],
        ["lightning_ldm.c", "lightning_ldm.d", "lightning_ldm.e"],
    ]


# ------------------------------------------------------------------------------------------ (c) a slim mixin
#: What mixing in adds to a ``LightningModule`` at most (issue 14: "at most ~25", done when <= 30).
MAX_MIXIN_NAMES = 25


def added_public_names(mixin: type) -> list[str]:
    import lightning.pytorch as L

    class Module(mixin, L.LightningModule):  # type: ignore[misc, valid-type]
        pass

    base = {name for name in dir(L.LightningModule) if not name.startswith("_")}
    return sorted({name for name in dir(Module) if not name.startswith("_")} - base)


def test_the_mixins_add_few_public_names_to_a_lightning_module() -> None:
    from lightning_ldm.latent import LatentDiffusionMixin
    from lightning_ldm.mixin import DiffusionMixin

    plain, latent = added_public_names(DiffusionMixin), added_public_names(LatentDiffusionMixin)
    assert plain == [
        "apply_model",
        "call_convention",
        "check_schedule_on_load",
        "denoiser_name",
        "diffusion_generator",
        "diffusion_loss",
        "draw_noise",
        "draw_timesteps",
        "fixed_timestep_loss",
        "last_timestep_losses",
        "noise_schedule",
        "register_schedule",
        "sample",
        "timestep_sampler",
    ]
    assert set(plain) < set(latent) and len(latent) <= MAX_MIXIN_NAMES, latent
    # CompVis' names (tables, num_timesteps, q_sample, ...) are opt-in: none of them comes with the plain mixins
    assert not {"alphas_cumprod", "betas", "num_timesteps", "parameterization", "q_sample", "snr"} & set(latent)


def test_the_name_counter_sees_what_a_mixin_adds() -> None:
    class Adds:
        extra = 1

        def method(self) -> None: ...

        def _private(self) -> None: ...

    assert added_public_names(Adds) == ["extra", "method"]


# ------------------------------------------------------------------------------- (d) words for the reference
#: Phrases that call the reference code (CompVis) "the seed". None occurs anywhere in the package.
ABSENT_EVERYWHERE = (r"\bseed formulae?\b", r"\bseed code\b", r"\bseed implementation\b", r"\bseed repo(sitory)?\b")
#: More such phrases; "seed" alone is legitimate (RNG seeds: ``seed=``, "seeded", ``derive_seed``) and not matched.
REFERENCE_PHRASES = (
    *ABSENT_EVERYWHERE,
    r"\bthe seed's\b",
    r"\(the seed\)",
    r"\b(as in|from|than) the seed\b",
    r"\bas the seed does\b",
    r"\bseed behaviou?r\b",
    r"\bseed utility\b",
    r"^\s*seed / ",
    r"\bthe seed (gives|returns|raises|rebuilds|mixes|silently|gets|computes)\b",
)
#: Modules that still use "the seed" for the reference (to be reworded to "CompVis"/"the reference"); the phrases
#: above are checked in every other module, and ABSENT_EVERYWHERE in these too.
STILL_WORDED: frozenset[str] = frozenset()


def reference_wording(source: str, patterns: tuple[str, ...], filename: str = "<snippet>") -> list[str]:
    compiled = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in patterns]
    return [
        f"{filename}:{number}: {line.strip()}"
        for number, line in enumerate(source.splitlines(), 1)
        if any(p.search(line) for p in compiled)
    ]


def test_the_reference_is_not_called_the_seed() -> None:
    found = []
    for path in SOURCES:
        patterns = ABSENT_EVERYWHERE if relative(path) in STILL_WORDED else REFERENCE_PHRASES
        found += reference_wording(path.read_text(), patterns, relative(path))
    assert found == []


def test_the_wording_detector_tells_reference_from_rng_seeds() -> None:
    flagged = [
        "Same numbers as the seed's ``timestep_embedding``.",
        "``range(0, T, T // n) + 1`` (the seed)",
        "no lower clip, as in the seed.",
        "the seed formula for sigma",
        "the seed returns a single scalar there",
        "seed / ``lightning_ldm``     diffusers",
    ]
    for line in flagged:
        assert reference_wording(line, REFERENCE_PHRASES), line
    legitimate = [
        "seed: Base seed (a non-negative integer) or ``None``.",
        "a generator seeded with ``derive_seed(seed, 0, r, i)``",
        "With ``seed=None`` the seed is taken from ``PL_GLOBAL_SEED``",
        "a resumed run continues with the seed stored in the checkpoint",
        'hint = " (the seed is the second argument: pass seed=...)"',
        "TypeError: An index or the seed is not an integer.",
    ]
    for line in legitimate:
        assert reference_wording(line, REFERENCE_PHRASES) == [], line
