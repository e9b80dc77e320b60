"""TAEF2 autoencoder: weight lookup and checksums, layout, accuracy on real faces, batch
invariance, input validation. CPU only; reads ../shared at run time (skips without it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from faceprint.autoencoder import TAEF2, Autoencoder, TAEF2Config, TAEF2Decoder, TAEF2Encoder, find_weights
from faceprint.autoencoder import weights as W
from faceprint.errors import ConfigError, InputError, WeightsError

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()
WEIGHTS = SHARED / "weights" / "taef2"
FACES = SHARED / "datasets" / "celeba-10k" / "images"

needs_weights = pytest.mark.skipif(
    not all((WEIGHTS / f).is_file() for f in W.WEIGHT_FILES), reason=f"TAEF2 weights not found in {WEIGHTS}"
)
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"face dataset not found at {FACES} (../shared/datasets)")

# Measured with 16 faces (celeba-10k 000001-000016, 128 px): mean fp32 33.50 dB, bf16 33.48 dB
# (worst single face 30.0 dB); 64 faces: 33.58 dB. The floor leaves 2 dB of margin on the mean; a
# wrong layer order or a broken fast path decodes to noise (random latents give ~10 dB).
PSNR_FLOOR_DB = 31.5


def psnr(a, b):
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def load_faces(n, size=128):
    from PIL import Image

    files = sorted(FACES.glob("*.jpg"))[:n]
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)  # (n, 3, size, size)


@pytest.fixture(scope="module")
def model():
    if not all((WEIGHTS / f).is_file() for f in W.WEIGHT_FILES):
        pytest.skip(f"TAEF2 weights not found in {WEIGHTS}")
    return TAEF2.load(WEIGHTS)


@pytest.fixture(scope="module")
def model_fp32():
    if not all((WEIGHTS / f).is_file() for f in W.WEIGHT_FILES):
        pytest.skip(f"TAEF2 weights not found in {WEIGHTS}")
    return TAEF2.load(WEIGHTS, config=TAEF2Config(precision="fp32"))


@pytest.fixture(scope="module")
def faces():
    if not FACES.is_dir():
        pytest.skip(f"face dataset not found at {FACES} (../shared/datasets)")
    return load_faces(16)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    return monkeypatch


def copy_weights(dst: Path, *, symlink: bool = True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in W.WEIGHT_FILES:
        if symlink:
            (dst / f).symlink_to(WEIGHTS / f)
        else:
            shutil.copyfile(WEIGHTS / f, dst / f)
    return dst


# ---------------------------------------------------------------------------- layout and loading


@needs_weights
def test_state_dicts_load_strictly_into_the_modules(clean_env):
    folder, enc_sd, dec_sd = W.load_state_dicts(WEIGHTS)
    enc, dec = TAEF2Encoder(), TAEF2Decoder()
    for module, sd in ((enc, enc_sd), (dec, dec_sd)):
        result = module.load_state_dict(sd, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
    assert set(enc.state_dict()) == set(enc_sd) and set(dec.state_dict()) == set(dec_sd)
    assert sum(p.numel() for p in enc.parameters()) == 1_338_528
    assert sum(p.numel() for p in dec.parameters()) == 1_338_499


@needs_weights
def test_model_attributes(model):
    assert isinstance(model, Autoencoder)
    assert re.fullmatch(r"taef2-[0-9a-f]{16}", model.id)
    assert model.id == W.weights_id()
    assert model.latent_channels == 32
    assert model.latent_shape(128, 128) == (32, 16, 16)
    assert model.latent_shape(256, 64) == (32, 32, 8)
    assert model.config.precision in ("fp32", "bf16")  # "auto" is resolved at load
    with pytest.raises(InputError, match="height"):
        model.latent_shape(100, 128)


def test_config_validation():
    with pytest.raises(ConfigError, match="precision"):
        TAEF2Config(precision="fp16")
    with pytest.raises(ConfigError, match="chunk_pixels"):
        TAEF2Config(chunk_pixels=0)
    assert TAEF2Config().chunk_size(128, 128) == 4 and TAEF2Config().chunk_size(256, 256) == 1
    with pytest.raises(ConfigError, match="memory_format"):
        TAEF2Config(memory_format="nhwc")
    assert TAEF2Config(precision="fp32").resolved().precision == "fp32"
    assert TAEF2Config().resolved().precision in ("fp32", "bf16")


# ------------------------------------------------------------------------ accuracy on real faces


@needs_faces
def test_round_trip_psnr_on_real_faces(model, model_fp32, faces):
    scores = {}
    for name, m in (("default", model), ("fp32", model_fp32)):
        z = m.encode(faces)
        y = m.decode(z)
        scores[name] = psnr(y, faces).mean().item()
        assert scores[name] > PSNR_FLOOR_DB, f"{name} ({m.config.precision}) round trip {scores[name]:.2f} dB"
    # bf16 (when it is the default) may cost at most ~0.3 dB against fp32.
    assert scores["default"] > scores["fp32"] - 0.3, scores


@needs_faces
def test_fast_path_matches_reference_modules(model_fp32, faces):
    """The fused/subpixel fp32 plan computes what the plain nn.Sequential modules compute."""
    x = faces[:4]
    with torch.no_grad():
        z_ref = model_fp32.encoder(x)
        y_ref = model_fp32.decoder(z_ref).clamp(0, 1)
    z = model_fp32.encode(x)
    y = model_fp32.decode(z_ref)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- shapes and output


@needs_weights
def test_shapes_dtypes_and_range(model):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 96, generator=g, dtype=torch.float64)
    z = model.encode(x)
    assert z.shape == (2, 32, 8, 12) and z.dtype == torch.float32
    y = model.decode(z)
    assert y.shape == (2, 3, 64, 96) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # Outputs are ordinary tensors: callers may modify them in place.
    assert not z.is_inference() and not y.is_inference()
    z.add_(1.0)
    assert model.encode(torch.zeros(0, 3, 16, 16)).shape == (0, 32, 2, 2)
    assert model.decode(torch.zeros(0, 32, 2, 2)).shape == (0, 3, 16, 16)


@needs_faces
@pytest.mark.parametrize("precision", ["default", "fp32"])
def test_one_image_alone_equals_it_inside_a_batch_of_9(model, model_fp32, faces, precision):
    """Bit-identical, not just close: "same seed, same image at batch size 1 and 64" rests on it.

    At 128 px a chunk holds 4 images: image 6 sits mid-chunk, image 8 in the zero-padded last
    chunk; alone, each sits first in a chunk padded with 3 zeros.
    """
    m = model if precision == "default" else model_fp32
    batch = faces[:9]
    z_all = m.encode(batch)
    y_all = m.decode(z_all)
    for k in (6, 8):
        z_one = m.encode(batch[k : k + 1])
        assert torch.equal(z_one[0], z_all[k])
        y_one = m.decode(z_all[k : k + 1])
        assert torch.equal(y_one[0], y_all[k])
    assert torch.equal(m.decode(z_all[8:9], batch_size=4), m.decode(z_all[8:9]))


@needs_faces
def test_zero_padded_chunks_make_256px_batches_invariant(model):
    """At 256 px oneDNN picks other kernels for a batch of 1 than for 4 (measured: latents
    differ by up to 3e-2 in bf16, 3e-6 in fp32). Padding every chunk to batch_size removes it."""
    x = load_faces(5, size=256)
    z_all = model.encode(x, batch_size=4)
    assert torch.equal(model.encode(x[4:5], batch_size=4)[0], z_all[4])
    assert torch.equal(model.encode(x[2:3], batch_size=4)[0], z_all[2])
    y_all = model.decode(z_all[:5], batch_size=4)
    assert torch.equal(model.decode(z_all[2:3], batch_size=4)[0], y_all[2])


# --------------------------------------------------------------------------------- weight lookup


@needs_weights
def test_explicit_folder_comes_first(tmp_path, clean_env):
    a = copy_weights(tmp_path / "a")
    b = copy_weights(tmp_path / "b")
    clean_env.setenv(W.ENV_VAR, str(b))
    assert find_weights(a) == a
    assert find_weights(str(a)) == a
    assert find_weights() == b  # then the environment variable
    clean_env.delenv(W.ENV_VAR)
    assert find_weights().resolve() == WEIGHTS  # then ../shared beside the repository


@needs_weights
def test_user_cache_is_the_last_place(tmp_path, clean_env):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path))
    places = W.search_path()
    assert places[-1][1] == tmp_path / "faceprint" / "weights" / "taef2"
    assert any(p.resolve() == WEIGHTS for _, p in places[:-1])


@needs_weights
def test_loaded_from_symlinked_copies_gives_same_model(tmp_path, clean_env, model):
    m = TAEF2.load(copy_weights(tmp_path / "w"), config=model.config)
    assert m.id == model.id
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.encode(x), model.encode(x))


def test_missing_weights_list_places_and_upstream(tmp_path, clean_env):
    with pytest.raises(WeightsError) as err:
        find_weights(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert W.ENCODER_FILE in msg and W.DECODER_FILE in msg
    assert "madebyollin" in msg and "MIT" in msg and "--weights" in msg and W.ENV_VAR in msg
    assert isinstance(err.value, FileNotFoundError)


@needs_weights
def test_partial_folder_names_the_missing_file(tmp_path, clean_env):
    d = tmp_path / "half"
    d.mkdir()
    (d / W.ENCODER_FILE).symlink_to(WEIGHTS / W.ENCODER_FILE)
    with pytest.raises(WeightsError, match=f"has no {re.escape(W.DECODER_FILE)}"):
        TAEF2.load(d)


def test_env_var_folder_is_authoritative(tmp_path, clean_env):
    empty = tmp_path / "empty"
    empty.mkdir()
    clean_env.setenv(W.ENV_VAR, str(empty))
    with pytest.raises(WeightsError) as err:
        find_weights()
    msg = str(err.value)
    assert str(empty) in msg and W.ENV_VAR in msg and "holds neither file" in msg


@needs_weights
def test_corrupted_weights_are_refused(tmp_path, clean_env):
    d = copy_weights(tmp_path / "bad", symlink=False)
    f = d / W.DECODER_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as err:
        TAEF2.load(d)
    msg = str(err.value)
    assert str(f) in msg and "corrupted" in msg
    assert W.SHA256[W.DECODER_FILE] in msg  # expected digest, next to the actual one
    assert str(d) in msg  # the places looked
    assert "madebyollin" in msg and "--weights" in msg


# ----------------------------------------------------------------------------- input validation


@needs_weights
@pytest.mark.parametrize(
    "images, pattern",
    [
        (torch.rand(2, 4, 32, 32), r"images.*3 channels.*\(2, 4, 32, 32\)"),
        (torch.rand(2, 32, 32, 3), r"images.*3 channels.*\(2, 32, 32, 3\)"),
        (torch.rand(1, 3, 30, 32), r"images.*multiples of 8.*30x32"),
        (torch.rand(3, 32, 32), r"images.*4-D.*\(3, 32, 32\)"),
        (torch.full((1, 3, 32, 32), float("nan")), r"images.*NaN"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), r"images.*floating.*uint8.*/ 255"),
        (torch.rand(1, 3, 32, 32) * 255, r"images.*\[0, 1\].*max 2"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), r"images.*torch.Tensor.*ndarray"),
    ],
)
def test_bad_images_raise_input_error(model, images, pattern):
    with pytest.raises(InputError, match=pattern):
        model.encode(images)


@needs_weights
@pytest.mark.parametrize(
    "latents, pattern",
    [
        (torch.zeros(1, 16, 4, 4), r"latents.*32 channels.*\(1, 16, 4, 4\)"),
        (torch.full((1, 32, 4, 4), float("inf")), r"latents.*infinite"),
        (torch.zeros(1, 32, 4, 4, dtype=torch.int64), r"latents.*floating.*int64"),
    ],
)
def test_bad_latents_raise_input_error(model, latents, pattern):
    with pytest.raises(InputError, match=pattern):
        model.decode(latents)


@needs_weights
def test_bad_batch_size(model):
    with pytest.raises(InputError, match="batch_size"):
        model.encode(torch.rand(1, 3, 16, 16), batch_size=0)


@needs_weights
def test_progress_stays_quiet_off_a_terminal(model, capsys):
    model.decode(torch.zeros(2, 32, 2, 2), progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""

