import os
from pathlib import Path

import pytest
import torch

try:  # property tests draw the same examples on every run: CI results do not depend on luck
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("quantsd", derandomize=True, deadline=None)
    _hsettings.load_profile("quantsd")
except ImportError:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("QUANTSD_ASSETS", REPO.parent / "shared" / "assets"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipe():
    """One shared tiny pipeline; tests that mutate weights must restore them or build their own."""
    from quantsd.models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def sd15_meta_pipe():
    from quantsd.models import load_pipeline

    return load_pipeline("sd15-arch", device="meta")


@pytest.fixture
def packed_tiny_unet_cuda():
    """(unet, latents, context): the tiny UNet packed with recipes/paper-final.yaml on CUDA, and a
    CFG-batch input for it (fp16; a fresh model per test: compiled tests group or prefetch it)."""
    from quantsd.bench.core import to_packed
    from quantsd.models import load_pipeline
    from quantsd.recipe import load_recipe

    pipe, _ = to_packed(load_pipeline("tiny"), load_recipe(REPO / "recipes" / "paper-final.yaml"))
    unet = pipe.unet.to("cuda").eval()
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 16, 16, generator=g).to("cuda", torch.float16)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to("cuda", torch.float16)
    return unet, lat, ctx
