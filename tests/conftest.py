from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CELEBA = SHARED / "datasets" / "celeba-10k" / "images"


@pytest.fixture(scope="session")
def celeba_dir():
    if not CELEBA.is_dir():
        pytest.skip(f"real photos not found at {CELEBA} (../shared beside the repository)")
    return CELEBA


@pytest.fixture(scope="session")
def taef2():
    from faceprint.autoencoder import TAEF2

    return TAEF2.load()


@pytest.fixture(scope="session")
def celeba_latents(celeba_dir, taef2, tmp_path_factory):
    """LatentSet of the first 96 celeba-10k photos at 128 px (encoded once per session)."""
    from faceprint.data import FaceFolder, LatentCache, encode_folder

    cache = LatentCache(tmp_path_factory.mktemp("cache"))
    return encode_folder(FaceFolder(celeba_dir, size=128, limit=96), taef2, cache=cache)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of small-tensor tests: faster, and far faster on a
    shared, loaded CPU. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
