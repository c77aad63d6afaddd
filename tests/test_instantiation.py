import sys

import pytest
import torch
from torch import nn

from lightning_ldm.blending import AlphaBlender
from lightning_ldm.conditioning import HybridConditioner
from lightning_ldm.instantiation import ConfigImportError, get_obj_from_str, instantiate_from_config

SAFE = ["lightning_ldm.", "torch.nn."]


def test_builds_target_with_params():
    lin = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (2, 3)
    blender = instantiate_from_config(
        {"target": "lightning_ldm.blending.AlphaBlender", "params": {"alpha": 0.2, "merge_strategy": "fixed"}},
        allowed_prefixes=SAFE,
    )
    assert isinstance(blender, AlphaBlender) and blender.mix_factor.item() == pytest.approx(0.2)


def test_params_optional_and_none_is_empty():
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), nn.Identity)
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity", "params": None}), nn.Identity)


def test_sentinels_give_none():
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None


def test_get_obj_from_str_returns_attribute():
    assert get_obj_from_str("torch.nn.Linear") is nn.Linear
    assert get_obj_from_str("torch.nn.functional.relu", allowed_prefixes=SAFE) is torch.nn.functional.relu


def test_allowed_prefix_matches_whole_components():
    assert get_obj_from_str("torch.nn.Linear", allowed_prefixes=["torch.nn"]) is nn.Linear
    with pytest.raises(ValueError, match=r"target='torch.nnx.Linear' is not allowed"):
        get_obj_from_str("torch.nnx.Linear", allowed_prefixes=["torch.nn"])


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "builtins.eval", "torch.load"])
def test_disallowed_targets_refused(target):
    with pytest.raises(ValueError, match=rf"target='{target}' is not allowed: it lies outside allowed_prefixes="):
        instantiate_from_config({"target": target, "params": {}}, allowed_prefixes=SAFE)


def test_disallowed_target_is_refused_before_importing(monkeypatch):
    monkeypatch.delitem(sys.modules, "xml.dom.minidom", raising=False)
    with pytest.raises(ValueError, match="is not allowed"):
        get_obj_from_str("xml.dom.minidom.parseString", allowed_prefixes=SAFE)
    assert "xml.dom.minidom" not in sys.modules


def test_reexported_object_outside_prefixes_refused():
    # lightning_ldm.instantiation imports importlib; the allowed module must not hand out importlib.import_module
    with pytest.raises(ConfigImportError, match="has no attribute 'import_module'"):
        get_obj_from_str("lightning_ldm.instantiation.import_module", allowed_prefixes=SAFE)
    with pytest.raises(ValueError, match=r"resolves to an object defined in 'importlib', outside allowed_prefixes"):
        get_obj_from_str("lightning_ldm.instantiation.importlib", allowed_prefixes=SAFE)
    with pytest.raises(ValueError, match=r"resolves to an object defined in 'collections.abc'"):
        get_obj_from_str("lightning_ldm.instantiation.Sequence", allowed_prefixes=SAFE)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"params": {}}, KeyError, "Expected key `target` to instantiate."),
        ({}, KeyError, "Expected key `target` to instantiate."),
        ("not_a_config", KeyError, "Expected key `target` to instantiate. Got the string 'not_a_config'"),
        (None, TypeError, "config must be a mapping with a 'target' key .* got None of type NoneType"),
        ([("target", "torch.nn.Identity")], TypeError, "config must be a mapping .* got .* of type list"),
        ({"target": "Linear"}, ValueError, r"target='Linear' is not a dotted path; expected 'package.module.Name'"),
        ({"target": ".Linear"}, ValueError, r"target='.Linear' is not a dotted path"),
        ({"target": 42}, TypeError, "target must be a str 'package.module.Name', got 42 of type int"),
        (
            {"target": "no_such_pkg_xyz.Model"},
            ConfigImportError,
            r"target='no_such_pkg_xyz.Model': could not import module 'no_such_pkg_xyz': No module named",
        ),
        (
            {"target": "torch.nn.NoSuchLayer"},
            ConfigImportError,
            r"target='torch.nn.NoSuchLayer': module 'torch.nn' has no attribute 'NoSuchLayer'",
        ),
        (
            {"target": "torch.nn.Identity", "params": [1, 2]},
            TypeError,
            r"params of target='torch.nn.Identity' must be a mapping, got .* of type list",
        ),
        ({"target": "torch.nn.Identity", "params": {1: 2}}, TypeError, r"must have str keys, got \[1\]"),
    ],
)
def test_errors(config, error, match):
    with pytest.raises(error, match=match):
        instantiate_from_config(config)


def test_import_error_is_also_value_error():
    with pytest.raises(ImportError):
        get_obj_from_str("no_such_pkg_xyz.Model")
    with pytest.raises(ValueError):
        get_obj_from_str("torch.nn.NoSuchLayer")


@pytest.mark.parametrize(
    ("prefixes", "match"),
    [
        ("lightning_ldm.", r"allowed_prefixes must be a sequence of module prefixes .* got 'lightning_ldm.'"),
        ([1], "got \\[1\\]"),
    ],
)
def test_bad_allowed_prefixes(prefixes, match):
    with pytest.raises(TypeError, match=match):
        get_obj_from_str("torch.nn.Linear", allowed_prefixes=prefixes)


def test_hybrid_conditioner_from_configs():
    torch.manual_seed(0)
    cond = HybridConditioner(
        {"target": "torch.nn.Conv2d", "params": {"in_channels": 3, "out_channels": 4, "kernel_size": 1}},
        {"target": "torch.nn.Linear", "params": {"in_features": 5, "out_features": 6}},
        allowed_prefixes=SAFE,
    )
    assert isinstance(cond.concat_conditioner, nn.Conv2d) and isinstance(cond.crossattn_conditioner, nn.Linear)
    assert {name.split(".")[0] for name, _ in cond.named_parameters()} == {
        "concat_conditioner",
        "crossattn_conditioner",
    }
    c_concat, c_cross = torch.randn(2, 3, 4, 4), torch.randn(2, 7, 5)
    out = cond(c_concat, c_cross)
    assert list(out) == ["c_concat", "c_crossattn"]
    assert len(out["c_concat"]) == 1 and len(out["c_crossattn"]) == 1
    assert torch.equal(out["c_concat"][0], cond.concat_conditioner(c_concat))
    assert torch.equal(out["c_crossattn"][0], cond.crossattn_conditioner(c_cross))


def test_hybrid_conditioner_accepts_ready_modules_and_mixes():
    concat = nn.Identity()
    cond = HybridConditioner(concat, {"target": "torch.nn.Flatten"})
    assert cond.concat_conditioner is concat
    x = torch.randn(2, 3, 4)
    out = cond(x, x)
    assert out["c_concat"][0] is x and out["c_crossattn"][0].shape == (2, 12)


def test_hybrid_conditioner_errors():
    with pytest.raises(ValueError, match=r"target='os.system' is not allowed"):
        HybridConditioner({"target": "torch.nn.Identity"}, {"target": "os.system"}, allowed_prefixes=SAFE)
    with pytest.raises(TypeError, match=r"c_concat_config must be an nn.Module or a config that builds a callable"):
        HybridConditioner("__is_unconditional__", nn.Identity())
    with pytest.raises(KeyError, match=r"Expected key `target` to instantiate."):
        HybridConditioner(nn.Identity(), {"params": {}})


# ======= allowed_prefixes holds for everything built from a config
# The escapes below are what a config author would try with the documented allow-list; each must be refused, and the
# command must never run. ``_canary`` records a call instead of running a shell command.

ESCAPE_RAN: list[object] = []


def _canary(*args: object, **kwargs: object) -> None:
    ESCAPE_RAN.append((args, kwargs))


@pytest.fixture
def canary(monkeypatch):
    """``os.system`` replaced by a recorder: an escape that got through would append to ESCAPE_RAN."""
    import os

    ESCAPE_RAN.clear()
    monkeypatch.setattr(os, "system", _canary)
    _canary.__module__ = "posix"  # what the real os.system reports
    yield ESCAPE_RAN
    assert ESCAPE_RAN == []


def test_canary_records_when_unrestricted(canary):
    # the same configs without allowed_prefixes do reach os.system: the escapes below test the restriction, not typos
    instantiate_from_config({"target": "os.system", "params": {"command": "true"}})
    assert canary == [((), {"command": "true"})]
    canary.clear()


def test_hybrid_conditioner_nested_configs_inherit_the_restriction(canary):
    config = {
        "target": "lightning_ldm.conditioning.HybridConditioner",
        "params": {"c_concat_config": {"target": "torch.nn.Identity"}, "c_crossattn_config": {"target": "os.system"}},
    }
    with pytest.raises(ValueError, match=r"target='os.system' is not allowed: it lies outside allowed_prefixes="):
        instantiate_from_config(config, allowed_prefixes=SAFE)
    # the nested config cannot widen the list it inherits
    config["params"]["allowed_prefixes"] = ["os.", "lightning_ldm.", "torch.nn."]
    with pytest.raises(ValueError, match=r"target='os.system' is not allowed: .*\['lightning_ldm.', 'torch.nn.'\]"):
        instantiate_from_config(config, allowed_prefixes=SAFE)
    # but may narrow it
    config["params"] = {
        "c_concat_config": {"target": "torch.nn.Identity"},
        "c_crossattn_config": {"target": "torch.nn.Identity"},
        "allowed_prefixes": ["lightning_ldm."],
    }
    with pytest.raises(ValueError, match=r"target='torch.nn.Identity' is not allowed: .*\['lightning_ldm.'\]"):
        instantiate_from_config(config, allowed_prefixes=SAFE)


def test_nested_hybrid_conditioners_inherit_at_every_depth(canary):
    inner = {
        "target": "lightning_ldm.conditioning.HybridConditioner",
        "params": {"c_concat_config": {"target": "torch.nn.Identity"}, "c_crossattn_config": {"target": "os.system"}},
    }
    outer = {
        "target": "lightning_ldm.conditioning.HybridConditioner",
        "params": {"c_concat_config": {"target": "torch.nn.Identity"}, "c_crossattn_config": inner},
    }
    with pytest.raises(ValueError, match=r"target='os.system' is not allowed"):
        instantiate_from_config(outer, allowed_prefixes=SAFE)
    good = {
        "target": "lightning_ldm.conditioning.HybridConditioner",
        "params": {
            "c_concat_config": {"target": "torch.nn.Identity"},
            "c_crossattn_config": {
                "target": "lightning_ldm.conditioning.HybridConditioner",
                "params": {
                    "c_concat_config": {"target": "torch.nn.Flatten"},
                    "c_crossattn_config": {"target": "torch.nn.Tanh"},
                },
            },
        },
    }
    built = instantiate_from_config(good, allowed_prefixes=SAFE)
    assert isinstance(built.crossattn_conditioner.concat_conditioner, nn.Flatten)
    x = torch.linspace(-2.0, 2.0, 6).reshape(1, 2, 3)
    out = built.crossattn_conditioner(x, x)
    assert torch.equal(out["c_crossattn"][0], torch.tanh(x)) and out["c_concat"][0].shape == (1, 6)


class _BuildsInInit(nn.Module):
    """A user class (in an allowed package) whose __init__ builds a config given as a param."""

    def __init__(self, sub: dict) -> None:
        super().__init__()
        self.sub = instantiate_from_config(sub)


def test_any_class_building_configs_in_init_inherits(canary, monkeypatch):
    monkeypatch.setattr(_BuildsInInit, "__module__", "lightning_ldm.user_block")
    monkeypatch.setattr(sys.modules["lightning_ldm.instantiation"], "BuildsInInit", _BuildsInInit, raising=False)
    config = {"target": "lightning_ldm.instantiation.BuildsInInit", "params": {"sub": {"target": "os.system"}}}
    with pytest.raises(ValueError, match=r"target='os.system' is not allowed"):
        instantiate_from_config(config, allowed_prefixes=SAFE)
    config["params"]["sub"] = {"target": "torch.nn.ReLU"}
    assert isinstance(instantiate_from_config(config, allowed_prefixes=SAFE).sub, nn.ReLU)
    # outside a restricted call the class builds without restriction again: the restriction does not leak
    assert instantiate_from_config(config).sub.__class__ is nn.ReLU
    assert get_obj_from_str("os.system") is _canary


@pytest.mark.parametrize("loader", ["instantiate_from_config", "get_obj_from_str"])
@pytest.mark.parametrize("module", ["lightning_ldm.instantiation", "lightning_ldm"])
def test_loaders_are_not_targets(canary, loader, module):
    params = (
        {"config": {"target": "os.system", "params": {"command": "true"}}}
        if loader.startswith("inst")
        else {"string": "os.system"}
    )
    with pytest.raises(ValueError, match=rf"target='{module}.{loader}' is not allowed: the config loaders"):
        instantiate_from_config({"target": f"{module}.{loader}", "params": params}, allowed_prefixes=SAFE)
    with pytest.raises(ValueError, match=r"the config loaders \(instantiate_from_config, get_obj_from_str\) are not"):
        get_obj_from_str(f"{module}.{loader}", allowed_prefixes=SAFE)


def test_loaders_called_inside_a_restricted_build_stay_restricted(canary, monkeypatch):
    # even if a loader were reached some other way, e.g. through a user class that calls it, the active list holds
    class Relay(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.fn = get_obj_from_str(name)

    monkeypatch.setattr(Relay, "__module__", "lightning_ldm.relay")
    monkeypatch.setattr(sys.modules["lightning_ldm.instantiation"], "Relay", Relay, raising=False)
    with pytest.raises(ValueError, match=r"target='os.system' is not allowed"):
        instantiate_from_config(
            {"target": "lightning_ldm.instantiation.Relay", "params": {"name": "os.system"}}, allowed_prefixes=SAFE
        )


def test_out_of_prefix_callable_is_never_returned(canary, monkeypatch):
    def hand_out(name: str):  # an allowed factory that returns whatever it is asked for
        return get_obj_from_str.__globals__["importlib"].import_module("os").system if name else None

    hand_out.__module__ = "lightning_ldm.factory"
    monkeypatch.setattr(sys.modules["lightning_ldm.instantiation"], "hand_out", hand_out, raising=False)
    with pytest.raises(
        ValueError, match=r"target='lightning_ldm.instantiation.hand_out' returned an object defined in 'posix'"
    ):
        instantiate_from_config(
            {"target": "lightning_ldm.instantiation.hand_out", "params": {"name": "x"}}, allowed_prefixes=SAFE
        )
    # a non-callable result (None here) is fine
    assert (
        instantiate_from_config(
            {"target": "lightning_ldm.instantiation.hand_out", "params": {"name": ""}}, allowed_prefixes=SAFE
        )
        is None
    )


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        # an attribute path that walks through a module object into another package: not a module, so not importable
        ("lightning_ldm.instantiation.importlib.import_module", ConfigImportError, "could not import module"),
        ("torch.nn.modules.module.torch.load", ConfigImportError, "could not import module"),
        # an imported module or a re-exported object is judged by where it is really defined
        (
            "torch.nn.modules.module.torch",
            ValueError,
            r"resolves to an object defined in 'torch', outside .* \(a module\)",
        ),
        ("lightning_ldm.instantiation.contextvars", ValueError, r"resolves to an object defined in 'contextvars'"),
        ("lightning_ldm.conditioning.Tensor", ValueError, r"resolves to an object defined in 'torch'"),
        ("torch.nn.functional.torch", ValueError, r"defined in 'torch', outside .* \(a module\)"),
        # private and dunder names (module __getattr__, __builtins__, __loader__) are not targets
        ("lightning_ldm.__getattr__", ValueError, "private names"),
        ("torch.nn.functional.__builtins__", ValueError, "private names"),
        ("lightning_ldm.instantiation.__loader__", ValueError, "private names"),
        ("lightning_ldm._checks.check_int", ValueError, "private names"),
        # a prefix matches at a dot boundary only
        ("torch.nnx.Linear", ValueError, "is not allowed: it lies outside"),
        ("lightning_ldmx.Linear", ValueError, "is not allowed: it lies outside"),
    ],
)
def test_other_escapes_refused(canary, target, error, match):
    with pytest.raises(error, match=match):
        get_obj_from_str(target, allowed_prefixes=SAFE)
    with pytest.raises(error, match=match):
        instantiate_from_config({"target": target}, allowed_prefixes=SAFE)


def test_module_in_allowed_package_may_be_resolved_but_not_returned_when_outside():
    # lightning_ldm.conditioning.nn is torch.nn itself: defined under 'torch.nn', so allowed (and not callable)
    assert get_obj_from_str("lightning_ldm.conditioning.nn", allowed_prefixes=SAFE) is nn
    with pytest.raises(
        ValueError, match=r"defined in 'torch.nn', outside allowed_prefixes=\['lightning_ldm.'\] \(a module\)"
    ):
        get_obj_from_str("lightning_ldm.conditioning.nn", allowed_prefixes=["lightning_ldm."])


def test_restriction_is_reset_after_a_failed_build(canary):
    with pytest.raises(ValueError):
        instantiate_from_config(
            {
                "target": "lightning_ldm.conditioning.HybridConditioner",
                "params": {
                    "c_concat_config": {"target": "os.system"},
                    "c_crossattn_config": {"target": "torch.nn.Identity"},
                },
            },
            allowed_prefixes=SAFE,
        )
    assert get_obj_from_str("os.system") is _canary  # unrestricted again outside the call


def test_configs_from_text_cannot_reach_anything_else(canary):
    # a whole YAML-like document with every escape in one place
    import json

    doc = json.loads(
        '{"target": "lightning_ldm.conditioning.HybridConditioner", "params": {'
        '"c_concat_config": {"target": "lightning_ldm.instantiation.instantiate_from_config",'
        ' "params": {"config": {"target": "os.system", "params": {"command": "echo pwned"}}}},'
        '"c_crossattn_config": {"target": "torch.nn.Identity"}}}'
    )
    with pytest.raises(ValueError, match="the config loaders"):
        instantiate_from_config(doc, allowed_prefixes=SAFE)
