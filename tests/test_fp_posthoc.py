"""Post-hoc DWT-DCT watermark baseline on real 128 px faces (invisible-watermark)."""

import pytest
import torch

from faceprint.errors import ConfigError, InputError
from faceprint.fingerprint.verification import binomial_p_value, matching_bits
from faceprint.seeding import generator

pytest.importorskip("imwatermark", reason="install with: pip install --no-deps invisible-watermark==0.2.0")
pytest.importorskip("cv2", reason="invisible-watermark needs opencv-python-headless")
pytest.importorskip("pywt", reason="invisible-watermark needs PyWavelets")

from faceprint.fingerprint.posthoc import PosthocConfig, PosthocWatermark, upsample_factor  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces(celeba_dir):
    from faceprint.data import FaceFolder

    images, _, _ = FaceFolder(celeba_dir, size=128, limit=6).load()
    return images


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 2, (6, 128), generator=generator(0)).bool()


@pytest.fixture(scope="module")
def marked(faces, codes):
    return PosthocWatermark().embed(faces, codes)


def test_round_trip_on_real_faces(faces, codes, marked):
    assert marked.shape == faces.shape and marked.dtype == torch.float32
    assert float(marked.min()) >= 0 and float(marked.max()) <= 1
    assert torch.equal((marked * 255).round() / 255, marked)  # 8-bit levels, as saved
    psnr = 10 * torch.log10(1 / ((marked - faces) ** 2).mean((1, 2, 3)))
    assert float(psnr.min()) > 35  # invisible: measured 41 dB
    acc = matching_bits(PosthocWatermark().decode(marked), codes).double() / 128
    assert float(acc.min()) >= 0.9  # measured 1.000 on 50 faces


def test_wrong_code_and_unmarked_faces_do_not_match(faces, codes, marked):
    wm = PosthocWatermark()
    decoded = wm.decode(marked)
    wrong = torch.randint(0, 2, (6, 128), generator=generator(1)).bool()
    for m in matching_bits(decoded, wrong).tolist():
        assert m < 90 and binomial_p_value(m) > 1e-6  # about 64 of 128: chance
    for m in matching_bits(wm.decode(faces), codes).tolist():
        assert m < 90
    # each face carries its own code, not its neighbour's
    shifted = matching_bits(decoded, codes.roll(1, 0))
    assert int(shifted.max()) < 90


def test_one_code_for_all_and_work_size_output(faces, codes):
    wm = PosthocWatermark(PosthocConfig(keep_work_size=True))
    big = wm.embed(faces[:2], codes[0])
    assert big.shape == (2, 3, 256, 256)
    assert (matching_bits(wm.decode(big), codes[0]) >= 120).all()
    assert upsample_factor(128, 128) == 2 and upsample_factor(256, 300) == 1 and upsample_factor(100, 100) == 3


def test_config_and_input_validation(faces):
    with pytest.raises(ConfigError, match="32 bits"):
        PosthocConfig(method="rivaGan")
    with pytest.raises(ConfigError, match="method"):
        PosthocConfig(method="lsb")
    wm = PosthocWatermark()
    with pytest.raises(InputError, match=r"\(128,\)"):
        wm.embed(faces[:1], torch.zeros(64, dtype=torch.bool))
    with pytest.raises(InputError, match="rows"):
        wm.embed(faces[:2], torch.zeros(3, 128, dtype=torch.bool))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        wm.embed(faces[:1] * 2, torch.zeros(128, dtype=torch.bool))
