import sys

import pytest
import torch
from torch import nn

from lightning_ldm.blending import AlphaBlender
from lightning_ldm.config import ConfigImportError, HybridConditioner, get_obj_from_str, instantiate_from_config

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
    # lightning_ldm.config imports importlib; the allowed module must not hand out importlib.import_module
    with pytest.raises(ConfigImportError, match="has no attribute 'import_module'"):
        get_obj_from_str("lightning_ldm.config.import_module", allowed_prefixes=SAFE)
    with pytest.raises(ValueError, match=r"resolves to an object defined in 'importlib', outside allowed_prefixes"):
        get_obj_from_str("lightning_ldm.config.importlib", allowed_prefixes=SAFE)
    with pytest.raises(ValueError, match=r"resolves to an object defined in 'collections.abc'"):
        get_obj_from_str("lightning_ldm.config.Mapping", allowed_prefixes=SAFE)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"params": {}}, KeyError, "Expected key `target` to instantiate."),
        ({}, KeyError, "Expected key `target` to instantiate."),
        ("not_a_config", KeyError, "Expected key `target` to instantiate. Got the string 'not_a_config'"),
        (None, TypeError, "config must be a mapping with a 'target' key .* got NoneType"),
        ([("target", "torch.nn.Identity")], TypeError, "config must be a mapping .* got list"),
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
            r"params of target='torch.nn.Identity' must be a mapping, got list",
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
