"""Shared test setup: nothing in the test suite may reach the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The tests run tiny models: one intra-op thread is as fast, and on a busy shared machine the
# default (all cores, spin-waiting) made small ops up to ~80x slower. Override by setting it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from slurm_cluster import slurm_cluster, two_node_cluster  # noqa: E402, F401  (fixtures: slow SLURM tests)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random Stable Diffusion folder of `p2pz make-tiny` (seed 0), built once per session.

    Holds model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ and captioner/.
    Treat it as read-only: every test of the session shares it.
    """
    from p2pz.data.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the default run's addopts): one worker per core this process may use, at most 4.
    Each worker imports torch and builds its own tiny model, and a file's tests stay on one worker
    (``--dist loadfile``): beyond a few workers the largest files set the time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))
