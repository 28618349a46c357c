import pytest
import torch
from torch import nn

from ninlab.models import (
    ModelSpecError,
    NiNConfig,
    build_nin,
    get_config,
    list_configs,
    parse_variant,
    register_config,
    resolve_model,
)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_d2l_nin_has_the_chapter_parameter_count_and_layout():
    model = build_nin()
    assert count(model) == 1_992_166
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs[::3]] == [
        (96, 11, 4, 0),
        (256, 5, 1, 2),
        (384, 3, 1, 1),
        (10, 3, 1, 1),
    ]
    assert all(c.kernel_size == (1, 1) for i, c in enumerate(convs) if i % 3)
    assert [type(m).__name__ for m in model] == [
        "Sequential",
        "MaxPool2d",
        "Sequential",
        "MaxPool2d",
        "Sequential",
        "MaxPool2d",
        "Dropout",
        "Sequential",
        "AdaptiveAvgPool2d",
        "Flatten",
    ]
    assert model(torch.zeros(2, 1, 224, 224)).shape == (2, 10)


def test_xavier_uniform_initialisation_bounds_the_weights():
    torch.manual_seed(0)
    conv = build_nin()[0][0]
    fan_in, fan_out = 1 * 11 * 11, 96 * 11 * 11
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert conv.weight.abs().max() <= bound
    assert conv.weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("nin-d2l-1x1", 1_769_112),
        ("nin-d2l-0x1", 1_546_058),
        ("nin-d2l-bn", 1_994_404),
        ("nin-d2l-no-squeeze", 1_961_226),
    ],
)
def test_registered_variants(name, parameters):
    assert count(resolve_model(name)) == parameters


def test_variant_spelled_on_the_command_line():
    config = parse_variant(
        "nin-d2l:num_1x1=1,num_classes=5,in_channels=3,global_pool=max,batch_norm=true"
    )
    assert (
        config.num_1x1,
        config.num_classes,
        config.in_channels,
        config.global_pool,
        config.batch_norm,
    ) == (1, 5, 3, "max", True)
    model = build_nin(config)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 5)
    assert isinstance(model[-2], nn.AdaptiveMaxPool2d)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nin-nope", "unknown model 'nin-nope'"),
        ("nin-d2l:depth=3", "cannot read variant setting 'depth=3'"),
        ("nin-d2l:num_1x1=two", "num_1x1='two' is not a valid num_1x1"),
        ("nin-d2l:global_pool=min", "global_pool must be 'avg' or 'max'"),
        ("no_such_module_xyz:factory", "cannot import 'no_such_module_xyz'"),
        ("torch.nn:Linear", "failed when called with no arguments"),
        ("math:pi", "'math:pi' is not a function but a float"),
        ("math:nope", "'math' has no 'nope'"),
        ("collections:OrderedDict", "returned OrderedDict, not an nn.Module"),
    ],
)
def test_bad_model_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(spec)


def test_factory_path_builds_any_module():
    model = resolve_model("cnn_zoo:resnet_bn")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_registry_refuses_duplicates():
    with pytest.raises(ModelSpecError, match="already registered"):
        register_config("nin-d2l", NiNConfig(get_config("nin-d2l").layers))
    assert "nin-d2l" in list_configs()
