"""Output files: a path is refused in one line before the work, and a file appears whole or not at
all, with the permissions of an ordinary open(), the previous one untouched by a failure."""

import ast
import os
import stat
import sys
from pathlib import Path

import pytest

import ninlab.outputs
from ninlab.errors import NinlabError
from ninlab.outputs import atomic_write, output_directory, output_path, write_text_atomically


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


# -- atomic_write ----------------------------------------------------------------------------------


def test_text_and_bytes_are_written_whole(tmp_path):
    write_text_atomically(tmp_path / "a.txt", "héllo\r\nworld\n", durable=False)
    # UTF-8, and the newlines as given on every platform.
    assert (tmp_path / "a.txt").read_bytes() == "héllo\r\nworld\n".encode()
    with atomic_write(tmp_path / "b.bin", durable=False) as handle:
        handle.write(b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert _names(tmp_path) == ["a.txt", "b.bin"]


def test_the_file_takes_its_name_only_when_complete(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with atomic_write(target, durable=False, text=True) as handle:
        handle.write("new\n")
        handle.flush()
        # Until the block ends the new bytes are in a hidden temporary beside the target, which
        # is the handle's name (the data download reads it back to verify it).
        assert target.read_text() == "old\n"
        temporary = Path(handle.name)
        assert temporary.parent == tmp_path and temporary.name.startswith(".metrics.csv.")
        assert temporary.read_text() == "new\n"
    assert target.read_text() == "new\n"
    assert _names(tmp_path) == ["metrics.csv"]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_the_previous_file_and_no_temporary(tmp_path, failure):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    with pytest.raises(type(failure)), atomic_write(target, durable=True) as handle:
        handle.write(b"half of the new")
        raise failure
    assert target.read_bytes() == b"previous"
    assert _names(tmp_path) == ["checkpoint.pt"]


def test_a_failure_before_a_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_write(tmp_path / "new.png", durable=False):
        raise ValueError("the figure could not be drawn")
    assert _names(tmp_path) == []


def test_mode_is_what_open_gives_under_the_umask(tmp_path, umask_027):
    write_text_atomically(tmp_path / "config.json", "{}\n", durable=True)
    with open(tmp_path / "plain.json", "w") as handle:
        handle.write("{}\n")
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o640


def test_replacing_a_file_gives_the_new_one_the_usual_mode(tmp_path, umask_027):
    target = tmp_path / "chart.png"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with atomic_write(target, durable=False) as handle:
        handle.write(b"new")
    # A new file (the rename), as `open` would create it: the old one's mode is not carried over.
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def _record_fsync(monkeypatch, target: Path) -> list[bool]:
    """For each os.fsync call, whether `target` existed at that moment."""
    calls: list[bool] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        calls.append(target.exists())
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_durable_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    calls = _record_fsync(monkeypatch, target)
    with atomic_write(target, durable=True) as handle:
        handle.write(b"weights")
    expected = [False, True] if os.name == "posix" else [False]
    assert calls == expected


def test_not_durable_never_syncs(tmp_path, monkeypatch):
    calls = _record_fsync(monkeypatch, tmp_path / "curves.png")
    write_text_atomically(tmp_path / "curves.png", "picture", durable=False)
    assert calls == []


def test_a_missing_directory_is_one_line_naming_the_file_and_creates_nothing(tmp_path):
    target = tmp_path / "missing" / "a.txt"
    with pytest.raises(
        NinlabError, match=rf"could not write {target} \(No such file or directory\)"
    ):
        write_text_atomically(target, "x", durable=False)
    assert _names(tmp_path) == []


# -- output_path -----------------------------------------------------------------------------------


def _refusal(path, **options) -> str:
    with pytest.raises(NinlabError) as caught:
        output_path(path, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_writable_path_is_returned(tmp_path):
    assert output_path(tmp_path / "flops.PNG") == tmp_path / "flops.PNG"  # suffix in any case
    report = output_path(str(tmp_path / "r.html"), suffixes=(".html",), what="report")
    assert report == tmp_path / "r.html"
    (tmp_path / "old.svg").write_text("<svg/>")
    assert output_path(tmp_path / "old.svg") == tmp_path / "old.svg"  # an existing file is replaced


def test_an_empty_name_is_refused():
    message = _refusal("")
    assert message == "cannot write the chart to '': it has no file name; name a .png or .svg file"


def test_a_directory_is_refused(tmp_path):
    message = _refusal(tmp_path)
    assert message == (
        f"cannot write the chart to {str(tmp_path)!r}: it is a directory; "
        "name a .png or .svg file inside it"
    )


def test_a_device_or_pipe_is_refused(tmp_path):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    message = _refusal(pipe, option="--plot")
    assert message.endswith(": it is not a regular file; choose another --plot")


def test_an_unsupported_suffix_is_refused(tmp_path):
    message = _refusal(tmp_path / "report.txt", suffixes=(".html", ".htm"), what="report")
    assert message == (
        f"cannot write the report to {str(tmp_path / 'report.txt')!r}: unsupported file type; "
        "name a .html or .htm file"
    )


def test_a_missing_parent_is_refused(tmp_path):
    path = tmp_path / "missing" / "flops.png"
    assert _refusal(path) == (
        f"cannot write the chart to {str(path)!r}: directory {str(path.parent)!r} does not exist; "
        "create it or choose another -o"
    )


def test_a_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "flops.png"
    assert _refusal(path).endswith(f": {str(path.parent)!r} is not a directory; choose another -o")


def test_a_parent_without_write_permission_is_refused(tmp_path, monkeypatch):
    # The check asks the kernel (os.access); root may write anywhere, so the answer is faked here
    # and checked for real below where the tests do not run as root.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert _refusal(tmp_path / "flops.png").endswith(
        f": directory {str(tmp_path)!r} is not writable (permission denied); choose another -o"
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_is_refused(tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    try:
        assert "is not writable" in _refusal(read_only / "flops.png")
    finally:
        read_only.chmod(0o755)


# -- output_directory ------------------------------------------------------------------------------


def test_output_directory_creates_the_missing_ones(tmp_path):
    assert output_directory(tmp_path / "runs" / "cpu") == tmp_path / "runs" / "cpu"
    assert (tmp_path / "runs" / "cpu").is_dir()
    assert output_directory(tmp_path / "runs" / "cpu") == tmp_path / "runs" / "cpu"  # exists: fine


def test_output_directory_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "runs").write_text("")
    expected = r"^cannot create output directory .*runs/cpu \(.*\); choose another --output-dir$"
    with pytest.raises(NinlabError, match=expected):
        output_directory(tmp_path / "runs" / "cpu")


def test_output_directory_refuses_one_without_write_permission(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(NinlabError, match=r"is not writable .*; choose another --output-dir$"):
        output_directory(tmp_path)


# -- the module's place ----------------------------------------------------------------------------


def test_outputs_imports_only_the_standard_library_and_errors():
    """Training and the visuals both use it, so it may depend on neither."""
    tree = ast.parse(Path(ninlab.outputs.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    outside = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"ninlab.errors"}


def test_a_symbolic_link_that_leads_nowhere_is_named_as_such(tmp_path):
    # A loop and a missing target were "does not exist" or "cannot create ... (File exists)".
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link in ("loop", "dangling"):
        with pytest.raises(NinlabError, match=r"symbolic link that leads nowhere.*--output-dir"):
            output_directory(tmp_path / link)
        with pytest.raises(NinlabError, match=r"symbolic link that leads nowhere.*-o$"):
            output_path(tmp_path / link / "x.png")
    assert not (tmp_path / "nowhere").exists()
