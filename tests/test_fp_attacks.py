"""Robustness harness: perturbations, the sweep and its plot."""

import pytest
import torch
import torch.nn.functional as F

from faceprint.errors import InputError
from faceprint.fingerprint.attacks import (
    ATTACKS,
    AttackSpec,
    autoencoder_attack,
    autoencoder_roundtrip,
    blur_sigma,
    crop_resize,
    format_sweep,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    plot_sweep,
    random_combination,
    resize_down_up,
    robustness_sweep,
)
from faceprint.seeding import generator


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces(celeba_dir):
    from faceprint.data import FaceFolder

    images, _, _ = FaceFolder(celeba_dir, size=128, limit=4).load()
    return images


def _highpass_energy(x):
    """Mean squared discrete Laplacian (interior pixels): the energy near the Nyquist frequency."""
    c = x[..., 1:-1, 1:-1]
    lap = 4 * c - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return float((lap**2).mean())


def test_every_attack_keeps_shape_and_range(faces):
    x = faces[:2]
    for name, spec in ATTACKS.items():
        if name == "autoencoder_roundtrip":
            continue
        for s in spec.strengths:
            y = spec.apply(x, s, generator=generator(0))
            assert y.shape == x.shape and y.dtype == x.dtype, (name, s)
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, (name, s)
    assert crop_resize(x[:, :, :, :96], 0.7).shape == (2, 3, 128, 96)  # non-square images too


def test_gaussian_noise_has_the_requested_std_and_is_reproducible():
    x = torch.full((2, 3, 96, 96), 0.5)
    y = gaussian_noise(x, 0.05, generator=generator(1))
    d = y - x
    assert float(d.std()) == pytest.approx(0.05, rel=0.03)
    assert abs(float(d.mean())) < 0.002
    assert torch.equal(y, gaussian_noise(x, 0.05, generator=generator(1)))
    assert not torch.equal(y, gaussian_noise(x, 0.05, generator=generator(2)))
    assert torch.equal(gaussian_noise(x, 0.0), x)
    with pytest.raises(InputError, match="generator"):
        gaussian_noise(x, 0.05)


def test_gaussian_blur_removes_high_frequencies(faces):
    x = faces[:2]
    energies = [_highpass_energy(gaussian_blur(x, k)) for k in (1, 3, 5, 9)]
    assert energies[0] == pytest.approx(_highpass_energy(x))
    assert energies[0] > 2 * energies[1] > 0 and energies[1] > 1.5 * energies[2] and energies[2] > 2 * energies[3]
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(gaussian_blur(flat, 7), flat, atol=1e-6)  # weights sum to 1
    assert [round(blur_sigma(k), 6) for k in (3, 5, 7, 9)] == [0.8, 1.1, 1.4, 1.7]
    with pytest.raises(InputError, match="odd"):
        gaussian_blur(x, 4)


def test_gaussian_blur_matches_opencv(faces):
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    x = faces[:1]
    img = x[0].permute(1, 2, 0).numpy().astype(np.float32)
    for k in (3, 5, 9):
        # sigma given explicitly: for k <= 7 and sigma 0 OpenCV substitutes fixed binomial tables
        ref = cv2.GaussianBlur(img, (k, k), blur_sigma(k), borderType=cv2.BORDER_REFLECT_101)
        ours = gaussian_blur(x, k)[0].permute(1, 2, 0).numpy()
        assert np.abs(ours - ref).max() < 1e-5, k


def test_jpeg_lower_quality_larger_error(faces):
    x = faces
    errs = [float(((jpeg(x, q) - x) ** 2).mean()) for q in (95, 75, 50, 10)]
    assert 0 < errs[0] < errs[1] < errs[2] < errs[3]
    y = jpeg(x, 50)
    assert torch.equal((y * 255).round() / 255, y)  # decoded 8-bit image
    assert torch.equal(y, jpeg(x, 50))  # deterministic
    with pytest.raises(InputError, match="quality"):
        jpeg(x, 0)


def test_crop_resize_keeps_size_and_crops_the_centre(faces):
    x = faces[:2]
    y = crop_resize(x, 0.5)
    assert y.shape == x.shape
    ref = F.interpolate(x[:, :, 32:96, 32:96], size=(128, 128), mode="bilinear", align_corners=False)
    assert torch.allclose(y, ref.clamp(0, 1), atol=1e-6)
    assert torch.equal(crop_resize(x, 1.0), x)
    r1 = crop_resize(x, 0.6, generator=generator(3))
    assert torch.equal(r1, crop_resize(x, 0.6, generator=generator(3)))
    assert not torch.equal(r1, crop_resize(x, 0.6))
    with pytest.raises(InputError, match="kept_fraction"):
        crop_resize(x, 0.0)


def test_resize_down_up(faces):
    x = faces[:2]
    e = [float(((resize_down_up(x, s) - x) ** 2).mean()) for s in (1.0, 0.75, 0.5, 0.25)]
    assert e[0] == 0 and e[1] < e[2] < e[3]


def test_random_combination_is_reproducible_and_scales_with_probability(faces):
    x = faces
    assert torch.equal(random_combination(x, 0.0, generator=generator(0)), x)
    a = random_combination(x, 0.5, generator=generator(5))
    assert torch.equal(a, random_combination(x, 0.5, generator=generator(5)))
    assert not torch.equal(a, random_combination(x, 0.5, generator=generator(6)))
    full = random_combination(x, 1.0, generator=generator(5))
    assert all(not torch.equal(full[i], x[i]) for i in range(len(x)))  # every image attacked
    with pytest.raises(InputError, match="generator"):
        random_combination(x, 0.5, generator=None)


def test_autoencoder_roundtrip(faces, taef2):
    x = faces[:2]
    y = autoencoder_roundtrip(x, autoencoder=taef2)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    mse1 = float(((y - x) ** 2).mean())
    assert 0 < mse1 < 0.01  # a faithful regeneration, not the identity
    spec = autoencoder_attack(taef2, strengths=(1,))
    assert torch.equal(spec.apply(x, 1), y)


# -- the sweep ------------------------------------------------------------------------------------


def _block_code(images_bits):
    """A toy protection: bit i is the brightness of block i of a 16 x 8 grid (8 x 16 px blocks)."""
    n = images_bits.shape[0]
    blocks = images_bits.view(n, 1, 16, 8).float() * 0.5 + 0.25
    return F.interpolate(blocks, scale_factor=(8, 16), mode="nearest").expand(n, 3, 128, 128).contiguous()


def _block_decode(images):
    centres = images[:, 0, 4::8, 8::16]  # (n, 16, 8): one pixel per block, so noise can flip it
    return (centres > 0.5).reshape(images.shape[0], 128)


def test_robustness_sweep_rows_and_determinism(tmp_path):
    g = generator(11)
    bits = torch.randint(0, 2, (6, 128), generator=g).bool()
    images = _block_code(bits)
    assert torch.equal(_block_decode(images), bits)
    names = ["gaussian_noise", "crop_resize", "jpeg"]
    rows = robustness_sweep(images, _block_decode, bits, names, seed=0, threshold=120, batch_size=4)
    assert [(r.attack, r.strength) for r in rows] == [(n, float(s)) for n in names for s in ATTACKS[n].strengths]
    by = {(r.attack, r.strength): r for r in rows}
    assert by[("gaussian_noise", 0.0)].bit_accuracy_mean == 1.0 and by[("gaussian_noise", 0.0)].verified_share == 1.0
    assert by[("gaussian_noise", 0.4)].bit_accuracy_mean < 0.9
    assert by[("crop_resize", 0.5)].bit_accuracy_mean < 0.8 and by[("crop_resize", 0.5)].verified_share == 0.0
    assert by[("jpeg", 95)].bit_accuracy_mean == 1.0
    assert all(r.n_images == 6 for r in rows)
    again = robustness_sweep(images, _block_decode, bits, names, seed=0, threshold=120, batch_size=4)
    assert again == rows
    # a row does not depend on which other attacks run
    alone = robustness_sweep(images, _block_decode, bits, ["gaussian_noise"], seed=0, threshold=120, batch_size=4)
    assert alone == [r for r in rows if r.attack == "gaussian_noise"]
    assert "gaussian_noise" in format_sweep(rows)

    out = tmp_path / "sweep.png"
    plot_sweep(rows, out, threshold_accuracy=120 / 128, title="toy")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


def test_robustness_sweep_validation():
    bits = torch.zeros(2, 128, dtype=torch.bool)
    images = _block_code(bits)
    with pytest.raises(InputError, match="random"):
        robustness_sweep(images, _block_decode, bits, ["gaussian_noise"])
    with pytest.raises(InputError, match="unknown attack"):
        robustness_sweep(images, _block_decode, bits, ["nope"], seed=0)
    with pytest.raises(InputError, match="decode_bits must return"):
        robustness_sweep(images, lambda x: torch.zeros(len(x), 64, dtype=torch.bool), bits, ["jpeg"])
    custom = AttackSpec("invert", lambda x, s, g: 1 - x, (1,), "none", "invert colours")
    (row,) = robustness_sweep(images, _block_decode, bits, [custom])
    assert row.attack == "invert" and row.bit_accuracy_mean == 0.0 and row.verified_share is None
