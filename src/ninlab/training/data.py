"""Fashion-MNIST from disk: find the four IDX files, verify them, read them into uint8 tensors.

A directory the user names (`--data-dir`, else `$NINLAB_DATA`: a `NamedDataDir`) is the only
place looked in: it is used, or refused in one line (missing, a file, some of the four files
missing), never replaced by another copy; with none of the files it is where they are downloaded.
Without one, the files are looked for in a fixed order (see `default_search_path`); if none of
those places has them they are downloaded from the official mirror into the user cache.
`FashionMNIST.source` says which place it was. Every file is
checked against the SHA-256 of its *decompressed* bytes, because mirrors and distributions
recompress the .gz files (Debian's differ from Zalando's byte for byte, not in content).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ninlab.errors import NinlabError
from ninlab.inputs import regular_file
from ninlab.outputs import atomic_write

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "FILES",
    "MAX_IDX_BYTES",
    "MIRROR_URL",
    "FashionMNIST",
    "IdxFile",
    "NamedDataDir",
    "Split",
    "default_search_path",
    "download_fashion_mnist",
    "find_data_dir",
    "load_fashion_mnist",
    "named_data_dir",
    "read_idx",
]

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Zalando's own mirror, as given in https://github.com/zalandoresearch/fashion-mnist#get-the-data
MIRROR_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Debian's `dataset-fashion-mnist` package installs the four .gz files here.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class IdxFile:
    """One of the four files: its name without `.gz`, the SHA-256 of its uncompressed bytes,
    its shape."""

    name: str
    sha256: str
    shape: tuple[int, ...]


# Checksums of the decompressed files, computed from Debian's dataset-fashion-mnist
# 0.0~git20200523.55506a9-1 (`zcat FILE.gz | sha256sum`).
FILES: dict[str, IdxFile] = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        (60000, 28, 28),
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        (60000,),
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        (10000, 28, 28),
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        (10000,),
    ),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur in (Fashion-)MNIST.
_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Split:
    """Images as one uint8 tensor (N, 28, 28) and labels as int64 (N,), on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, count: int) -> Split:
        """The first `count` examples (Fashion-MNIST's order is already shuffled across classes)."""
        return Split(self.images[:count], self.labels[:count])


@dataclass(frozen=True)
class FashionMNIST:
    train: Split
    test: Split
    directory: Path
    source: str = "found"  # how `directory` was chosen, e.g. "--data-dir", "downloaded"


@dataclass(frozen=True)
class NamedDataDir:
    """The directory the user named for the data, and how (for the messages)."""

    path: Path
    option: str  # "--data-dir" or "$NINLAB_DATA"


def named_data_dir(data_dir: str | os.PathLike[str] | None = None) -> NamedDataDir | None:
    """`data_dir` (--data-dir) if given, else $NINLAB_DATA if set, else None."""
    if data_dir is not None and os.fspath(data_dir):
        return NamedDataDir(Path(data_dir), "--data-dir")
    if os.environ.get("NINLAB_DATA"):
        return NamedDataDir(Path(os.environ["NINLAB_DATA"]), "$NINLAB_DATA")
    return None


# An IDX file is 4 bytes of magic (0, 0, type, number of dimensions), each dimension as a big-endian
# uint32, then the values. Fashion-MNIST's largest holds 47,040,016 bytes; a header announcing more
# than this is refused before anything is allocated or decompressed (a gzip bomb, a sparse file).
MAX_IDX_BYTES = 1 << 30
_CHUNK_BYTES = 1 << 20


# The fix for a data file that is not what its name says.
_REFETCH = "replace it with Fashion-MNIST's file, or delete it so that ninlab downloads it again"
# A data file that is not a regular file (a FIFO would be waited on forever).
_NOT_REGULAR_FIX = "put the IDX file itself there, or remove it so that ninlab downloads it"


def read_idx(path: str | os.PathLike[str], *, expected: IdxFile | None = None) -> np.ndarray:
    """Read an IDX file (gzipped when its name ends in .gz) into a uint8 array of its shape.

    With `expected`, the decompressed bytes must have that SHA-256 and the array that shape.
    The header is checked first, and no more bytes are read (or decompressed) than it announces.
    """
    path = Path(path)
    return _read_idx(path, gzipped=path.suffix == ".gz", expected=expected)


def _read_idx(path: Path, *, gzipped: bool, expected: IdxFile | None) -> np.ndarray:
    regular_file(path, what="data file", fix=_NOT_REGULAR_FIX)
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as stream:
            header, values = _idx_bytes(path, stream, gzipped=gzipped, expected=expected)
    except (OSError, EOFError, zlib.error) as error:
        raise NinlabError(
            f"cannot read {path} ({error}); delete it so that ninlab downloads it again, "
            "or reinstall the dataset-fashion-mnist package"
        ) from None
    if expected is not None:
        digest = _sha256(header, values)
        if digest != expected.sha256:
            raise NinlabError(
                f"{path} is corrupt: SHA-256 of its contents is {digest[:12]}..., "
                f"expected {expected.sha256[:12]}...; delete it so that ninlab downloads a fresh "
                "copy (or reinstall dataset-fashion-mnist if it is Debian's)"
            )
    return np.frombuffer(values, dtype=np.uint8).reshape(_shape(header))


def _sha256(header: bytes, values: bytearray) -> str:
    digest = hashlib.sha256(header)
    digest.update(values)
    return digest.hexdigest()


def _shape(header: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(header[3]))


def _idx_bytes(
    path: Path, stream: BinaryIO, *, gzipped: bool, expected: IdxFile | None
) -> tuple[bytes, bytearray]:
    """The header and the values of an open IDX file, read no further than the header says."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != _IDX_UBYTE:
        raise NinlabError(
            f"{path} is not an IDX file of unsigned bytes (bad magic number); {_REFETCH}"
        )
    header = magic + stream.read(4 * magic[3])
    if len(header) < 4 + 4 * magic[3]:
        raise NinlabError(f"{path} is truncated: its header ends early; {_REFETCH}")
    shape = _shape(header)
    if expected is not None and shape != expected.shape:
        raise NinlabError(f"{path} holds shape {shape}, expected {expected.shape}; {_REFETCH}")
    size = math.prod(shape)
    if size > MAX_IDX_BYTES:
        raise NinlabError(
            f"{path} announces shape {shape} ({size:,} bytes), more than the "
            f"{MAX_IDX_BYTES:,} bytes ninlab reads from an IDX file; {_REFETCH}"
        )
    if not gzipped:  # the file's size is known before reading it
        on_disk = os.fstat(stream.fileno()).st_size
        if on_disk < len(header) + size:
            raise NinlabError(
                f"{path} is truncated: its header announces shape {shape}; {_REFETCH}"
            )
        if on_disk > len(header) + size:
            raise NinlabError(
                f"{path} is longer than its header announces (shape {shape}); it is not an "
                f"IDX file, or another file was appended; {_REFETCH}"
            )
    values = bytearray(size)
    view, done = memoryview(values), 0
    while done < size:
        count = stream.readinto(view[done : done + _CHUNK_BYTES])  # type: ignore[attr-defined]
        if not count:
            raise NinlabError(
                f"{path} is truncated: its header announces shape {shape}; {_REFETCH}"
            )
        done += count
    if stream.read(1):
        raise NinlabError(
            f"{path} decompresses to more than its header announces (shape {shape}); it is not "
            f"an IDX file, or another file was appended; {_REFETCH}"
        )
    return header, values


def _user_cache_dir() -> Path:
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ninlab" / "fashion-mnist"


def default_search_path(data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, ...]:
    """Where the files are looked for, in order. A named directory (`data_dir`, else
    `$NINLAB_DATA`): itself, then torchvision's layout inside it (`<dir>/FashionMNIST/raw`).
    Otherwise: Debian's package, torchvision's layout under `./data`, the user cache."""
    named = named_data_dir(data_dir)
    if named is not None:
        return (named.path, _torchvision_layout(named.path))
    return (DEBIAN_DIR, _torchvision_layout(Path("data")), _user_cache_dir())


def _torchvision_layout(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _source(directory: Path, named: NamedDataDir | None) -> str:
    if named is not None:
        return named.option
    if directory == DEBIAN_DIR:
        return "Debian's dataset-fashion-mnist"
    if directory == _user_cache_dir():
        return "the user cache"
    return "torchvision's layout under ./data"


def _check_named(named: NamedDataDir, *, download: bool) -> None:
    """Refuse a named directory that cannot be the data: missing, not a directory, or holding
    some but not all of the four files (a copy interrupted, or a file mistyped)."""
    where = f"{named.option} {named.path}"
    if not named.path.exists():
        raise NinlabError(f"{where} does not exist; check the name, or create it to download into")
    if not named.path.is_dir():
        raise NinlabError(f"{where} is not a directory; name the directory that holds the files")
    for directory in (named.path, _torchvision_layout(named.path)):
        present = [spec.name for spec in FILES.values() if _file_in(directory, spec.name)]
        if present:
            missing = [spec.name for spec in FILES.values() if spec.name not in present]
            raise NinlabError(
                f"{directory} ({named.option}) holds {len(present)} of the 4 Fashion-MNIST files; "
                f"missing: {', '.join(name + '[.gz]' for name in missing)}"
            )
    if not download:
        raise NinlabError(
            f"{where} holds none of the 4 Fashion-MNIST files ({', '.join(_NAMES)}, .gz or not) "
            "and --no-download is given; put them there or drop --no-download"
        )


def _file_in(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if regular_file(candidate, what="data file", fix=_NOT_REGULAR_FIX).is_file():
            return candidate
    return None


def find_data_dir(search_path: Sequence[Path]) -> Path | None:
    """The first directory in `search_path` that holds all four files (gzipped or not)."""
    for directory in search_path:
        if all(_file_in(directory, spec.name) for spec in FILES.values()):
            return directory
    return None


ProgressHook = Callable[[str, int, int | None], None]  # (file name, bytes so far, total or None)


def download_fashion_mnist(
    directory: Path,
    *,
    mirror: str = MIRROR_URL,
    progress: ProgressHook | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Fetch the four .gz files into `directory`, each verified before it is renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    for spec in FILES.values():
        if _file_in(directory, spec.name):
            continue
        url = f"{mirror.rstrip('/')}/{spec.name}.gz"
        # Written through atomic_write so that only a verified file ever takes the final name.
        with atomic_write(directory / f"{spec.name}.gz", durable=False) as out:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                total = response.length
                received = 0
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    received += len(chunk)
                    if progress:
                        progress(spec.name, received, total)
            out.flush()  # the check reads the temporary file back
            _verify_download(Path(out.name), spec, url)


def _verify_download(path: Path, spec: IdxFile, url: str) -> None:
    """Refuse a download whose decompressed bytes are not `spec`'s (`path` is the temporary file,
    whose name does not end in .gz), decompressing no more than its header announces."""
    try:
        with gzip.open(path, "rb") as stream:
            header, values = _idx_bytes(path, stream, gzipped=True, expected=spec)
    except (OSError, EOFError, zlib.error) as error:
        raise NinlabError(
            f"the download of {url} is not a valid gzip file ({error}); try again"
        ) from None
    except NinlabError:
        raise NinlabError(
            f"the download of {url} has the wrong contents (not an IDX file of shape "
            f"{spec.shape}); try again"
        ) from None
    digest = _sha256(header, values)
    if digest != spec.sha256:
        raise NinlabError(
            f"the download of {url} has the wrong contents (SHA-256 {digest[:12]}...); try again"
        )


def _first_writable(directories: Sequence[Path]) -> Path | None:
    for directory in directories:
        probe = directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.is_dir() and os.access(probe, os.W_OK):
            return directory
    return None


_NAMES = tuple(spec.name for spec in FILES.values())


def load_fashion_mnist(
    *,
    named: NamedDataDir | None = None,
    search_path: Sequence[Path] | None = None,
    download: bool = True,
    mirror: str = MIRROR_URL,
    progress: ProgressHook | None = None,
) -> FashionMNIST:
    """Find (or download), verify and read Fashion-MNIST; raises `NinlabError` with the fix if
    impossible. `named`: the directory the user named, the only one used (downloaded into when it
    holds none of the files); else `search_path` (default: `default_search_path()`)."""
    if named is None and search_path is None:
        named = named_data_dir()
    if named is not None:
        search_path = (named.path, _torchvision_layout(named.path))
    search_path = tuple(search_path) if search_path is not None else default_search_path()
    directory = find_data_dir(search_path)
    source = _source(directory, named) if directory is not None else f"downloaded from {mirror}"
    if directory is None and named is not None:
        _check_named(named, download=download)
    if directory is None:
        places = ", ".join(str(p) for p in search_path)
        hint = (
            f"put the four IDX files ({', '.join(s.name + '[.gz]' for s in FILES.values())}) in "
            "--data-dir or $NINLAB_DATA, or install Debian's dataset-fashion-mnist package"
        )
        if not download:
            raise NinlabError(f"Fashion-MNIST not found in {places}; {hint}")
        # Download into the first place the user named, else the cache (Debian's dir is
        # the package's).
        targets = [p for p in search_path if p != DEBIAN_DIR and "FashionMNIST" not in p.parts]
        directory = _first_writable(targets)
        if directory is None:
            raise NinlabError(
                f"Fashion-MNIST not found in {places} and none of them is writable; {hint}"
            )
        try:
            download_fashion_mnist(directory, mirror=mirror, progress=progress)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise NinlabError(
                f"Fashion-MNIST not found in {places} and the download from {mirror} failed "
                f"({reason}); {hint}"
            ) from None
    arrays = {
        key: read_idx(_file_in(directory, spec.name), expected=spec)  # type: ignore[arg-type]
        for key, spec in FILES.items()
    }

    def split(prefix: str) -> Split:
        return Split(
            torch.from_numpy(arrays[f"{prefix}_images"].copy()),
            torch.from_numpy(arrays[f"{prefix}_labels"].astype(np.int64)),
        )

    return FashionMNIST(
        train=split("train"), test=split("test"), directory=directory, source=source
    )
