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
    from defenses.core import data

    return data.load("mnist5k")


@pytest.fixture(scope="session")
def trained_cnn(mnist):
    """small_cnn after one epoch of standard training on mnist5k (≈97 % clean), eval mode."""
    from defenses.core import data, models

    # one thread: the float reduction order, and so the weights, must not depend on how many
    # threads the tests that ran before left set (run_trial sets its own)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = models.build("small_cnn", 10, 1)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        gen = torch.Generator().manual_seed(0)
        for x, y in data.batches(mnist.train_x, mnist.train_y, 64, shuffle=True, generator=gen):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def cnn_first_1000(mnist):
    """small_cnn after one epoch on the first 1,000 training images, eval mode: a classifier a
    detector guards, leaving the other 3,000 training images unseen (validation, checks)."""
    from defenses.core import data, models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as trained_cnn: weights independent of earlier tests' threads
    try:
        torch.manual_seed(0)
        model = models.build("small_cnn", 10, 1)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for x, y in data.batches(mnist.train_x[:1000], mnist.train_y[:1000], 50, shuffle=True,
                                 generator=torch.Generator().manual_seed(0)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def linear(mnist):
    """A linear MNIST classifier (≈85 % clean, no robustness at ε = 0.3), trained in seconds.
    Callers must not train it further (shared by the session)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    opt = torch.optim.Adam(model.parameters(), 0.02)
    x, y = mnist.train_x[:1000], mnist.train_y[:1000]
    for _ in range(80):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: the machine is shared, and one thread each is
    faster than oversubscribed cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
