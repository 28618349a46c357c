"""Every private PyTorch name ninlab uses resolves on the installed torch, and says what for."""

import ast
import inspect

import pytest
import torch
from cli_run import run

from ninlab.analysis import torch_internals
from ninlab.analysis.measure import measure
from ninlab.analysis.torch_internals import (
    FakeTensorMode,
    composite_kernel,
    op_schema,
    runs_as_composite_parts,
    storage_address,
)
from ninlab.errors import NinlabError
from ninlab.models import build_nin

aten = torch.ops.aten


@pytest.mark.parametrize("name", torch_internals.__all__)
def test_every_name_resolves(name: str) -> None:
    """Those resolved when first asked for too (torch._inductor, torch.distributed)."""
    distributed = ("DEFAULT_FIRST_BUCKET_BYTES", "compute_bucket_assignment_by_size")
    if name in distributed and not torch.distributed.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    assert getattr(torch_internals, name) is not None


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        torch_internals.no_such_name  # noqa: B018


def test_every_name_says_what_it_is_for_and_where_it_was_checked() -> None:
    """The line that binds each name, or the comment line above it, or its docstring, says which
    torch versions it was checked on; the range itself and its check are no private name."""
    the_range = ("OLDEST_TORCH", "TESTED_TORCH", "require_supported_torch")
    source = inspect.getsource(torch_internals)
    lines = source.splitlines()
    functions = {
        node.name: ast.get_docstring(node) or ""
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef)
    }
    unchecked = []
    for name in set(torch_internals.__all__) - set(the_range):
        if name in functions:
            noted = "hecked on" in functions[name]
        else:
            binding = (f"{name},", f"{name} =", f"{name}:", f'"{name}":')
            binds = [
                i
                for i, line in enumerate(lines)
                if line.strip().startswith(binding) or f" import {name} " in line
            ]
            noted = any("checked on" in lines[i] or "checked on" in lines[i - 1] for i in binds)
        if not noted:
            unchecked.append(name)
    assert unchecked == []


def test_the_private_classes_have_the_attributes_ninlab_reads() -> None:
    """Attributes of FakeTensor and FakeTensorMode read where they are needed (see the module's
    docstring), not bound in `torch_internals`."""
    with FakeTensorMode() as mode:
        fake = torch.empty(2, 3)
    assert fake.constant is None
    assert fake.fake_device == torch.device("cpu")
    assert fake.fake_mode is mode
    assert mode.in_kernel_invocation is False
    assert isinstance(mode.cache_enabled, bool)
    assert mode.cpp_meta_supports_symint(aten.relu.default) in (True, False)
    converter = mode.fake_tensor_converter
    assert callable(converter.set_tensor_memo) and callable(converter.add_constant_storage_mapping)


def test_the_dispatcher_questions_answer_as_the_cpu_runs() -> None:
    """conv2d runs as its parts; silu_backward has a CPU kernel beside its composite one, which the
    dispatcher prefers; convolution is a kernel of its own."""
    assert runs_as_composite_parts("aten::conv2d")
    assert not runs_as_composite_parts("aten::silu_backward")
    assert not runs_as_composite_parts("aten::convolution")
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    parts = composite_kernel(aten.conv2d.default)(x, weight)
    assert torch.equal(parts, torch.nn.functional.conv2d(x, weight))
    assert op_schema(aten.add_.Tensor).is_mutable and not op_schema(aten.add.Tensor).is_mutable


def test_a_storage_has_one_address_however_many_views() -> None:
    x = torch.zeros(4, 4)
    assert storage_address(x.untyped_storage()) == storage_address(x[1:].t().untyped_storage())
    assert storage_address(x.untyped_storage()) != storage_address(x.clone().untyped_storage())


def test_this_torch_has_every_name_and_is_in_the_range() -> None:
    assert torch_internals._MISSING == []
    torch_internals.require_supported_torch()


@pytest.mark.parametrize("version", ["2.6.0", "2.7.1+cu126", "3.0.0"])
def test_a_torch_outside_the_range_is_refused_in_one_line_at_the_first_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    """Not the model's fault: torch 2.6 once failed inside the forward, and the message blamed
    the input sizes."""
    monkeypatch.setattr(torch, "__version__", version)
    code, out, err = run(capsys, "summary")
    assert (code, out) == (2, "")
    assert err == (
        f"ninlab: error: ninlab needs torch >= 2.8, < 3 (found {version}; tested on 2.8.0, "
        "2.13.0 and 2.14.1); pip install 'torch>=2.8,<3'\n"
    )
    with pytest.raises(NinlabError, match=r"^ninlab needs torch >= 2\.8"):
        measure(build_nin(), input_size=(1, 224, 224), batch_size=1)


def test_a_torch_without_a_private_name_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "torch._C._autograd._top_saved_tensors_default_hooks"
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    monkeypatch.setattr(torch_internals, "_MISSING", [])
    assert torch_internals._private(name) is None
    assert [name] == torch_internals._MISSING
    code, out, err = run(capsys, "summary")
    assert (code, out) == (2, "")
    assert err == (
        f"ninlab: error: this torch ({torch.__version__}) lacks {name}, which ninlab uses to "
        "trace the step; supported: torch >= 2.8, < 3, tested on 2.8.0, 2.13.0 and 2.14.1\n"
    )
