import pickle

import numpy as np
import pytest
import torch

from defenses.core import data, models


def test_mnist5k_split_is_seeded_and_in_unit_range(mnist):
    assert mnist.train_x.shape == (4000, 1, 28, 28) and mnist.test_x.shape == (1000, 1, 28, 28)
    assert mnist.num_classes == 10 and mnist.train_x.dtype == torch.float32
    assert 0.0 <= float(mnist.train_x.min()) and float(mnist.train_x.max()) <= 1.0
    again = data.load("mnist5k")
    assert torch.equal(again.train_y, mnist.train_y)
    other = data.load("mnist5k", seed=1)
    assert not torch.equal(other.train_y, mnist.train_y)
    # train and test are disjoint images
    train = {tuple(r) for r in mnist.train_x.flatten(1)[:, ::7].numpy().round(3).tolist()}
    assert sum(tuple(r) in train for r in mnist.test_x.flatten(1)[:, ::7].numpy().round(3).tolist()) < 5


def _write_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)


def test_cifar10_reads_the_torchvision_format(tmp_path):
    _write_cifar10(tmp_path)
    ds = data.load("cifar10", tmp_path)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8  # large sets stream: converted per batch
    x, y = next(data.batches(ds.train_x, ds.train_y, 8, shuffle=False))
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0 and x.shape == (8, 3, 32, 32)


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DatasetError, match="download https://www.cs.toronto.edu"):
        data.load("cifar10", tmp_path)
    with pytest.raises(data.DatasetError, match="valid datasets"):
        data.load("imagenet")


@pytest.mark.parametrize("name,channels,size", [("small_cnn", 1, 28), ("preact_resnet18", 3, 32),
                                                ("wide_resnet34_10", 3, 32)])
def test_models_build_and_name_their_attention_layer(name, channels, size):
    model = models.build(name, 10, channels).eval()
    x = torch.rand(2, channels, size, size)
    assert model(x).shape == (2, 10)
    seen = {}
    handle = models.attention_module(model).register_forward_hook(
        lambda m, i, o: seen.update(shape=o.shape))
    model(x)
    handle.remove()
    assert len(seen["shape"]) == 4  # a convolutional block: (N, C, h, w)
    assert models.has_batchnorm(model)


def test_normalization_lives_inside_the_model():
    model = models.build("small_cnn", 10, 1).eval()
    x = torch.rand(2, 1, 28, 28)
    normalized = model.normalize(x)
    assert torch.allclose(normalized, (x - 0.1307) / 0.3081)


def test_unknown_model_lists_valid_ones():
    with pytest.raises(models.ModelError, match="small_cnn"):
        models.build("resnet50", 10, 3)


def test_mnist5k_is_parsed_once_per_process_and_callers_get_their_own_copy():
    a = data.load("mnist5k", seed=0)
    a.train_x.zero_()  # a caller modifying its copy in place
    b = data.load("mnist5k", seed=0)
    assert b.train_x.sum() > 0 and b.train_x.data_ptr() != a.train_x.data_ptr()
    assert data._mnist5k_arrays.cache_info().hits >= 1
