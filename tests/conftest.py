"""Shared fixtures: one local Ray for the whole test session, a small trained MNIST model."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per test run (starting Ray costs seconds; tests share it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mnist():
    from defenses import data

    return data.load("mnist5k")


@pytest.fixture(scope="session")
def trained_cnn(mnist):
    """small_cnn after one epoch of standard training on mnist5k (≈97 % clean), eval mode."""
    from defenses import data, models

    torch.manual_seed(0)
    model = models.build("small_cnn", 10, 1)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    for x, y in data.batches(mnist.train_x, mnist.train_y, 64, shuffle=True, generator=gen):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
