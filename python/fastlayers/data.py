"""Datasets for ``train`` and ``demo``: real data that needs no network, plus random data.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  as images ``(1, 8, 8)`` for image models or as sequences of 8 rows of 8 pixels for
  sequence models. Pixels scaled to [0, 1]; a stratified 80/20 split.
- ``mnist1d``: MNIST-1D (Greydanus 2020), 10 classes of 1-D signals of length 40, as
  sequences ``(40, 1)``. Generated locally by the ``mnist1d`` package's
  ``make_dataset`` with its default arguments (never downloaded; 4000 train / 1000
  test) and cached as ``mnist1d.npz`` in ``$FASTLAYERS_CACHE`` (default
  ``~/.cache/fastlayers``).
- ``synthetic``: the seed's random data, images ``(3, 32, 32)`` or sequences
  ``(20, 10)`` drawn from a normal distribution, labelled by a fixed random linear
  rule (so a model can learn it).

``load(name, kind)`` returns a :class:`Dataset` of two ``TensorDataset`` s and the model
arguments that fit the data; ``loader`` wraps one in a ``DataLoader``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

DATASETS = ("digits", "mnist1d", "synthetic")
KINDS = ("image", "sequence")
NUM_CLASSES = 10
# A fixed split: the seed of a run changes initialisation and shuffling, not the test set.
SPLIT_SEED = 0
SYNTHETIC_SEED = 1234
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 512, 128

AUGMENTATION = {
    "image": "random shift of the image by up to 1 pixel in each direction (zero fill)",
    "sequence": "random time shift by up to 2 steps (zero fill) plus Gaussian noise (std 0.05)",
}


@dataclass
class Dataset:
    name: str
    kind: str  # "image" or "sequence"
    train: TensorDataset
    test: TensorDataset
    # Constructor arguments of a model for this data: in_channels/image_size or input_size.
    model_kwargs: dict
    note: str = ""  # e.g. how long generating it took

    @property
    def num_classes(self) -> int:
        return self.model_kwargs["num_classes"]


def cache_dir() -> Path:
    return Path(os.environ.get("FASTLAYERS_CACHE", Path.home() / ".cache" / "fastlayers"))


def load(name: str, kind: str) -> Dataset:
    """Dataset `name` shaped for a model taking `kind` ("image" or "sequence") input."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown input kind {kind!r}; expected one of {', '.join(KINDS)}")
    if name == "digits":
        return _digits(kind)
    if name == "mnist1d":
        if kind != "sequence":
            raise ValueError("mnist1d holds 1-D signals: it needs a sequence model, not an image model")
        return _mnist1d()
    return _synthetic(kind)


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


def _digits(kind: str) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), pixel values 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=SPLIT_SEED
    )
    if kind == "image":
        x_train, x_test = x_train[:, None], x_test[:, None]
        model_kwargs = {"in_channels": 1, "image_size": 8, "num_classes": NUM_CLASSES}
    else:  # rows as time steps
        model_kwargs = {"input_size": 8, "num_classes": NUM_CLASSES}
    return Dataset("digits", kind, _tensors(x_train, y_train), _tensors(x_test, y_test), model_kwargs)


def _mnist1d() -> Dataset:
    path = cache_dir() / "mnist1d.npz"
    note = f"cached in {path}"
    if not path.exists():
        start = time.perf_counter()
        arrays = _generate_mnist1d()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        note = f"generated in {time.perf_counter() - start:.1f} s, {note}"
    with np.load(path) as arrays:
        x, y, x_test, y_test = (arrays[k] for k in ("x", "y", "x_test", "y_test"))
    model_kwargs = {"input_size": 1, "num_classes": NUM_CLASSES}
    return Dataset("mnist1d", "sequence", _tensors(x[..., None], y), _tensors(x_test[..., None], y_test), model_kwargs, note)


def _generate_mnist1d() -> dict[str, np.ndarray]:
    # make_dataset only computes (its get_dataset wrapper would download); it reseeds
    # numpy's global generator, so the caller's state is put back afterwards.
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _synthetic(kind: str) -> Dataset:
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    shape = (3, 32, 32) if kind == "image" else (20, 10)
    x = torch.randn(SYNTHETIC_TRAIN + SYNTHETIC_TEST, *shape, generator=g)
    rule = torch.randn(x[0].numel(), NUM_CLASSES, generator=g)
    y = (x.flatten(1) @ rule).argmax(1)
    train = TensorDataset(x[:SYNTHETIC_TRAIN], y[:SYNTHETIC_TRAIN])
    test = TensorDataset(x[SYNTHETIC_TRAIN:], y[SYNTHETIC_TRAIN:])
    if kind == "image":
        model_kwargs = {"in_channels": 3, "image_size": 32, "num_classes": NUM_CLASSES}
    else:
        model_kwargs = {"input_size": 10, "num_classes": NUM_CLASSES}
    return Dataset("synthetic", kind, train, test, model_kwargs)


def loader(
    dataset: TensorDataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader in the main process; with `shuffle`, the order is fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=generator)


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A randomly perturbed copy of the batch `x` (see ``AUGMENTATION``), drawn from `generator`
    (a CPU generator; the result is moved to `x`'s device)."""
    n = x.shape[0]
    if kind == "image":  # (N, C, H, W): shift each image by (dy, dx) in {-1, 0, 1}^2
        shifts = torch.randint(-1, 2, (n, 2), generator=generator)
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        return torch.stack(
            [padded[i, :, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w] for i, (dy, dx) in enumerate(shifts.tolist())]
        )
    # (N, T, F): shift along time by s in {-2..2}, then add noise
    shifts = torch.randint(-2, 3, (n,), generator=generator)
    t = x.shape[1]
    padded = torch.nn.functional.pad(x, (0, 0, 2, 2))
    shifted = torch.stack([padded[i, 2 - s : 2 - s + t] for i, s in enumerate(shifts.tolist())])
    noise = torch.randn(shifted.shape, generator=generator).to(x.device)
    return shifted + 0.05 * noise
