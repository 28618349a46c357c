import pytest
import torch
from torch import nn

from ninlab.errors import NinlabError
from ninlab.models import (
    Block,
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
        ("nin-28", 426_276),
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
        ("nin-d2l:num_1x1=5000", "num_1x1 must be 0 to 64, got 5000"),
        ("nin-d2l:num_classes=1000001", "num_classes must be 1 to 1,000,000, got 1,000,001"),
        ("nin-d2l:in_channels=10000000", "in_channels must be 1 to 1,000,000"),
        ("nin-d2l:dropout=nan", "dropout must be between 0 and 1, got nan"),
    ],
)
def test_bad_model_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(spec)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: resolve_model(42), "a model is named by text .*, not 42"),
        (lambda: build_nin("nin-d2l"), "build_nin takes a NiNConfig, not 'nin-d2l'"),
        (lambda: resolve_model("nin-d2l", weights="no"), "weights must be True or False"),
        (lambda: NiNConfig(layers=()), "layers must be a tuple .* at least one Block, got"),
        (lambda: NiNConfig(layers=("M",)), "at least one Block, got \\('M',\\)"),
        (lambda: NiNConfig(layers=[Block(8, 3)]), "layers must be a tuple"),
        (lambda: NiNConfig(layers=(Block(8, 3), "X")), "unknown layer 'X'"),
        (lambda: NiNConfig(layers=(Block(8, 3),), num_1x1=1.5), "num_1x1 must be a whole"),
        (lambda: NiNConfig(layers=(Block(8, 3),), batch_norm="yes"), "batch_norm must be True"),
        (lambda: NiNConfig(layers=(Block(8, 3),), dropout="0.1"), "dropout must be a number"),
        (lambda: NiNConfig(layers=(Block(8, 3),), description=3), "description must be a str"),
        (lambda: Block(8, 0), "kernel_size must be a whole number from 1 to 65,536, got 0"),
        (lambda: Block(8, 3, stride=1.5), "stride must be a whole number from 1"),
        (lambda: Block(8, 3, padding=-1), "padding must be a whole number from 0"),
        (lambda: Block(0, 3), "out_channels must be a whole number from 1 to 1,000,000"),
        (lambda: Block(8, 3, num_1x1=True), "num_1x1 must be a whole number from 0 to 64"),
    ],
)
def test_a_value_of_the_wrong_kind_is_one_line(call, message):
    # They raised AttributeError ('int' object has no attribute 'partition'; 'str' object has
    # no attribute 'in_channels'), or were taken as they came: a NiN of no block (a linear
    # layer), a stride of 1.5 (1), `batch_norm="yes"` (true), a kernel of 0 (failing mid-forward).
    with pytest.raises(NinlabError, match=message):
        call()


def test_factory_path_builds_any_module():
    model = resolve_model("cnn_zoo:resnet_bn")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_path_to_a_model_built_already_is_that_model():
    # It was called as a factory: its forward ran with no input, and the CLI said the factory
    # "failed when called with no arguments (TypeError: ... missing ... 'x')".
    import layer_zoo

    layer_zoo.built_already = torch.nn.Linear(3, 2)
    try:
        assert resolve_model("layer_zoo:built_already") is layer_zoo.built_already
    finally:
        del layer_zoo.built_already


def test_a_factory_that_exits_is_one_line():
    import layer_zoo

    def exits():
        raise SystemExit("no GPU here")

    layer_zoo.exits = exits
    try:
        with pytest.raises(ModelSpecError, match=r"failed .* \(SystemExit: no GPU here\)$"):
            resolve_model("layer_zoo:exits")
    finally:
        del layer_zoo.exits


def test_registry_refuses_duplicates():
    with pytest.raises(ModelSpecError, match="already registered"):
        register_config("nin-d2l", NiNConfig(get_config("nin-d2l").layers))
    assert "nin-d2l" in list_configs()


def test_a_registry_model_without_weights_is_the_same_network_on_the_meta_device():
    # A million classes: 4 TB of weights in the last block's 1x1 convolutions, none allocated.
    spec = "nin-d2l:num_classes=1000000"
    meta = resolve_model(spec, weights=False)
    assert all(p.is_meta for p in meta.parameters())

    def last_block(classes: int) -> int:  # 3x3 conv from 384 channels, two 1x1 convs, biases
        return 384 * 9 * classes + classes + 2 * (classes * classes + classes)

    expected = 1_992_166 - last_block(10) + last_block(1_000_000)
    assert sum(p.numel() for p in meta.parameters()) == expected == 2_003_460_957_376
    small = "nin-d2l-bn"
    shapes = [p.shape for p in resolve_model(small).parameters()]
    assert [p.shape for p in resolve_model(small, weights=False).parameters()] == shapes


def test_nin_28_keeps_fashion_mnist_sides_whole_and_ends_in_the_classes():
    """2x2 pooling halves 28 -> 14 -> 7 -> 3 exactly (3x3/2 would give 13 and 6), and the network
    is still a NiN: every block a 3x3 conv then two 1x1 convs, global average pooling, no linear."""
    model = resolve_model("nin-28")
    sides = []
    x = torch.zeros(2, 1, 28, 28)
    for module in model:
        x = module(x)
        if isinstance(module, nn.MaxPool2d):
            sides.append(x.shape[-1])
    assert sides == [14, 7, 3] and x.shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs[::3]] == [
        (32, 3),
        (96, 3),
        (256, 3),
        (10, 3),
    ]
    assert all(c.kernel_size == (1, 1) for i, c in enumerate(convs) if i % 3)
    assert not any(isinstance(m, (nn.Linear, nn.Dropout)) for m in model.modules())
