"""fastlayers.data: shapes, splits, caching, determinism and augmentation of the datasets."""

import numpy as np
import pytest
import torch

from fastlayers import data


def test_digits_as_images_are_a_stratified_80_20_split_of_scaled_pixels():
    ds = data.load("digits", "image")
    x, y = ds.train.tensors
    x_test, y_test = ds.test.tensors
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(torch.bincount(y_test, minlength=10) >= 35, torch.ones(10, dtype=torch.bool))
    assert ds.model_kwargs == {"in_channels": 1, "image_size": 8, "num_classes": 10}


def test_digits_as_sequences_read_the_rows_as_steps():
    images, sequences = data.load("digits", "image"), data.load("digits", "sequence")
    assert sequences.train.tensors[0].shape[1:] == (8, 8)
    assert torch.equal(sequences.train.tensors[0], images.train.tensors[0][:, 0])
    assert sequences.model_kwargs == {"input_size": 8, "num_classes": 10}


@pytest.fixture(scope="module")
def mnist1d():
    return data.load("mnist1d", "sequence")


def test_mnist1d_is_the_packages_default_dataset_as_sequences_of_one_value(mnist1d):
    x, y = mnist1d.train.tensors
    assert (len(mnist1d.train), len(mnist1d.test)) == (4000, 1000)
    assert x.shape[1:] == (40, 1) and y.min() == 0 and y.max() == 9
    assert mnist1d.model_kwargs == {"input_size": 1, "num_classes": 10}
    # make_dataset centres the whole set and scales it to unit variance
    all_x = torch.cat([x, mnist1d.test.tensors[0]])
    assert abs(all_x.mean().item()) < 1e-4 and abs(all_x.std().item() - 1) < 1e-3


def test_mnist1d_is_read_back_from_its_cache(mnist1d):
    again = data.load("mnist1d", "sequence")
    assert (data.cache_dir() / "mnist1d.npz").is_file()
    assert again.note.startswith("cached in")
    assert torch.equal(again.train.tensors[0], mnist1d.train.tensors[0])


def test_mnist1d_generation_leaves_numpys_global_generator_alone(monkeypatch, tmp_path):
    import mnist1d.data

    def fake_make_dataset(args):  # reseeds numpy's global generator, as the real one does
        np.random.seed(args.seed)
        return {k: np.zeros((2, 40)) if k.startswith("x") else np.zeros(2) for k in ("x", "y", "x_test", "y_test")}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    np.random.seed(7)
    expected = np.random.get_state()[1].copy()
    data._generate_mnist1d()
    assert np.array_equal(np.random.get_state()[1], expected)


def test_mnist1d_needs_a_sequence_model():
    with pytest.raises(ValueError, match="sequence model"):
        data.load("mnist1d", "image")


@pytest.mark.parametrize("kind,shape", [("image", (3, 32, 32)), ("sequence", (20, 10))])
def test_synthetic_data_is_fixed_and_learnable(kind, shape):
    a, b = data.load("synthetic", kind), data.load("synthetic", kind)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and a.train.tensors[0].shape[1:] == shape
    # labels come from a linear rule: a least-squares linear classifier fits the training set well
    x, y = a.train.tensors
    w = torch.linalg.lstsq(x.flatten(1).double(), torch.nn.functional.one_hot(y, 10).double()).solution
    assert ((x.flatten(1).double() @ w).argmax(1) == y).float().mean() > 0.9


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError, match="digits, mnist1d, synthetic"):
        data.load("cifar", "image")


def test_loader_order_depends_only_on_the_seed():
    ds = data.load("digits", "image").train
    first = [y for _, y in data.loader(ds, 100, shuffle=True, seed=3)]
    again = [y for _, y in data.loader(ds, 100, shuffle=True, seed=3)]
    other = [y for _, y in data.loader(ds, 100, shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_image_augmentation_shifts_each_image_by_at_most_one_pixel():
    x = torch.rand(16, 1, 8, 8)
    out = data.augment(x, "image", torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(16):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)


def test_sequence_augmentation_shifts_in_time_and_adds_small_noise():
    x = torch.randn(16, 40, 1)
    out = data.augment(x, "sequence", torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (0, 0, 2, 2))
    for i in range(16):
        errors = [(out[i] - padded[i, s : s + 40]).abs().max() for s in range(5)]
        assert min(errors) < 0.05 * 6  # noise std 0.05
    assert out.shape == x.shape
