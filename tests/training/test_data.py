import gzip
import hashlib
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ninlab.errors import NinlabError
from ninlab.training.data import (
    DEBIAN_DIR,
    FILES,
    default_search_path,
    find_data_dir,
    load_fashion_mnist,
    read_idx,
)
from ninlab.training.pipeline import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def _source_dir(data) -> Path:
    return data.directory


def _copy_all(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for spec in FILES.values():
        shutil.copy(source / f"{spec.name}.gz", target / f"{spec.name}.gz")


def test_real_data_shapes_labels_and_statistics(fashion_mnist):
    train, test = fashion_mnist.train, fashion_mnist.test
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 28, 28)
    assert train.labels.dtype == torch.int64
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    pixels = train.images.double() / 255
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST_MEAN, abs=1e-4)
    assert pixels.std().item() == pytest.approx(FASHION_MNIST_STD, abs=1e-4)


def test_uncompressed_and_gzipped_files_read_the_same(fashion_mnist, tmp_path):
    source = _source_dir(fashion_mnist)
    for spec in FILES.values():
        gz = source / f"{spec.name}.gz"
        if spec.name.startswith("t10k"):
            (tmp_path / spec.name).write_bytes(gzip.decompress(gz.read_bytes()))
        else:
            (tmp_path / f"{spec.name}.gz").symlink_to(gz)
    data = load_fashion_mnist(search_path=[tmp_path], download=False)
    assert data.directory == tmp_path
    assert torch.equal(data.test.images, fashion_mnist.test.images)
    assert torch.equal(data.test.labels, fashion_mnist.test.labels)
    assert read_idx(tmp_path / FILES["test_labels"].name).shape == (10000,)


def test_a_named_directory_is_the_only_place_looked_in(tmp_path, monkeypatch):
    monkeypatch.setenv("NINLAB_DATA", str(tmp_path / "env"))
    assert default_search_path(tmp_path / "mine") == (
        tmp_path / "mine",
        tmp_path / "mine" / "FashionMNIST" / "raw",
    )
    assert default_search_path() == (tmp_path / "env", tmp_path / "env" / "FashionMNIST" / "raw")


def test_search_order_without_a_named_directory_debian_then_torchvision_then_cache(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("NINLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_search_path() == (
        DEBIAN_DIR,
        Path("data") / "FashionMNIST" / "raw",
        tmp_path / "cache" / "ninlab" / "fashion-mnist",
    )


def test_torchvision_layout_is_found(fashion_mnist, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    _copy_all(_source_dir(fashion_mnist), raw)
    assert raw in default_search_path(tmp_path)
    assert find_data_dir([tmp_path, raw]) == raw  # the root itself holds no files


def test_corrupt_file_is_named(fashion_mnist, tmp_path):
    _copy_all(_source_dir(fashion_mnist), tmp_path)
    labels = tmp_path / f"{FILES['test_labels'].name}.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one wrong label, still a well-formed IDX file
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(NinlabError, match=rf"{labels}.* is corrupt: SHA-256"):
        load_fashion_mnist(search_path=[tmp_path], download=False)


def test_truncated_gzip_is_named(fashion_mnist, tmp_path):
    _copy_all(_source_dir(fashion_mnist), tmp_path)
    images = tmp_path / f"{FILES['test_images'].name}.gz"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(NinlabError, match=rf"cannot read {images}"):
        load_fashion_mnist(search_path=[tmp_path], download=False)


def test_not_an_idx_file(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(NinlabError, match="not an IDX file of unsigned bytes"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(NinlabError, match=r"truncated: its header announces shape \(5,\)"):
        read_idx(path)


def test_offline_without_a_copy_is_one_clear_error(tmp_path):
    with pytest.raises(NinlabError) as error:
        # Port 9 (discard) refuses connections: a real failed download, no network needed.
        load_fashion_mnist(search_path=[tmp_path / "empty"], mirror="http://127.0.0.1:9/")
    message = str(error.value)
    assert "\n" not in message
    assert "download from http://127.0.0.1:9/ failed" in message
    assert "dataset-fashion-mnist" in message and "--data-dir" in message
    assert not list((tmp_path / "empty").glob("*")), "no partial files are left behind"
    with pytest.raises(NinlabError, match="Fashion-MNIST not found in"):
        load_fashion_mnist(search_path=[tmp_path / "empty"], download=False)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on localhost serving a directory, standing in for the official mirror."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *args: _Quiet(*args, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root
    server.shutdown()


def test_download_verifies_and_renames_atomically(fashion_mnist, tmp_path, mirror):
    url, root = mirror
    # A mirror that recompressed the files: different .gz bytes, same contents.
    for spec in FILES.values():
        contents = gzip.decompress((_source_dir(fashion_mnist) / f"{spec.name}.gz").read_bytes())
        (root / f"{spec.name}.gz").write_bytes(gzip.compress(contents, compresslevel=1))
    seen: list[tuple[str, int, int | None]] = []
    target = tmp_path / "cache"
    data = load_fashion_mnist(search_path=[target], mirror=url, progress=lambda *a: seen.append(a))
    assert data.directory == target
    assert sorted(p.name for p in target.iterdir()) == sorted(
        f"{s.name}.gz" for s in FILES.values()
    )
    assert torch.equal(data.train.labels, fashion_mnist.train.labels)
    assert {name for name, _, _ in seen} == {s.name for s in FILES.values()}
    last = {name: (received, total) for name, received, total in seen}
    assert all(received == total for received, total in last.values())


def test_download_with_wrong_contents_leaves_nothing(fashion_mnist, tmp_path, mirror):
    url, root = mirror
    for spec in FILES.values():
        shutil.copy(_source_dir(fashion_mnist) / f"{spec.name}.gz", root / f"{spec.name}.gz")
    # The mirror's test labels are the training labels: valid gzip, wrong contents.
    shutil.copy(root / "train-labels-idx1-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz")
    target = tmp_path / "cache"
    with pytest.raises(NinlabError, match=r"t10k-labels-idx1-ubyte.gz has the wrong contents"):
        load_fashion_mnist(search_path=[target], mirror=url)
    # The files verified before it stay; the bad one and its (hidden) temporary file do not.
    verified = [f"{s.name}.gz" for s in FILES.values() if s.name != "t10k-labels-idx1-ubyte"]
    assert sorted(os.listdir(target)) == sorted(verified)


def test_pinned_checksums_are_of_the_decompressed_files(fashion_mnist):
    for spec in FILES.values():
        contents = gzip.decompress((_source_dir(fashion_mnist) / f"{spec.name}.gz").read_bytes())
        assert hashlib.sha256(contents).hexdigest() == spec.sha256
        assert read_idx(_source_dir(fashion_mnist) / f"{spec.name}.gz").shape == spec.shape
    assert np.prod(FILES["train_images"].shape) == 47_040_000
