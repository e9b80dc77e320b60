"""Model-level fingerprint (papers/004, Ch. 6) with the committed weights: instances are plain
TAEF2 decoders, their faces decode (owner-side detector, the fitted model as reference) to
their code, other codes and unfingerprinted faces do not."""

import pytest
import torch

from faceprint.errors import InputError
from faceprint.fingerprint.modulated import (
    ModulatedFingerprinter,
    bits_from_hex,
    bits_to_hex,
    fingerprint_generator,
    random_code,
)
from faceprint.latent.generator import Generator, GeneratorConfig


@pytest.fixture(scope="module")
def fp(taef2):
    return ModulatedFingerprinter.load(autoencoder=taef2)


@pytest.fixture(scope="module")
def gen(taef2, celeba_latents):
    return Generator(GeneratorConfig(components=1), autoencoder=taef2).fit(celeba_latents, seed=0)


@pytest.fixture(scope="module")
def faces(gen, fp):
    """12 faces of an instance, the same 12 faces unfingerprinted, and the code."""
    code = random_code(11)
    inst = fingerprint_generator(gen, code, {"user": "test"}, fingerprinter=fp)
    x, _ = inst.generate(12, seed=5)
    y, _ = gen.generate(12, seed=5)
    q = lambda t: (t * 255).round() / 255  # noqa: E731  (saved as 8-bit)
    return q(x), q(y), code, inst


def acc(p, code):
    return float(((p > 0.5).float() == code).float().mean())


def test_instance_is_an_ordinary_decoder_and_only_the_tail_changes(fp, taef2):
    from faceprint.autoencoder.taef2 import TAEF2Decoder

    state = fp.instance_decoder_state(random_code(1))
    TAEF2Decoder().load_state_dict(state, strict=True)
    base = taef2.decoder.state_dict()
    assert set(state) == set(base)
    start = fp.config.modulate_from
    for k, v in state.items():
        if int(k.split(".")[0]) < start:
            assert torch.equal(v, base[k]), k
    changed = [k for k in state if not torch.equal(state[k], base[k])]
    assert changed and all(int(k.split(".")[0]) >= start for k in changed)
    # two codes give two different instances
    other = fp.instance_decoder_state(random_code(2))
    assert any(not torch.equal(state[k], other[k]) for k in changed)


def test_folded_weights_render_like_the_unfolded_modulated_forward(fp, taef2, celeba_latents):
    from faceprint.autoencoder.taef2 import TAEF2Decoder

    code = random_code(3)
    z = celeba_latents.latents[:2]
    unfolded = fp.modulated_decode(z, code)
    dec = TAEF2Decoder()
    dec.load_state_dict(fp.instance_decoder_state(code))
    with torch.no_grad():
        folded = dec(z).clamp(0, 1)
    assert (folded - unfolded).abs().max() < 1e-4
    # and the fast bf16 inference path of an instance agrees to within its rounding
    fast = taef2.with_decoder_state(fp.instance_decoder_state(code)).decode(z)
    assert (fast - folded).pow(2).mean().sqrt() < 0.01


def test_instance_faces_decode_to_their_code(fp, faces, gen):
    x, _, code, _ = faces
    p = fp.decode_bits(x, reference=gen)
    assert p.shape == (12, 128) and p.dtype == torch.float32
    # measured ~0.85 (128 bits: >= 0.7 has a binomial p-value below 1e-5)
    assert acc(p, code) >= 0.7


def test_other_codes_and_unfingerprinted_faces_do_not_match(fp, faces, gen):
    x, y, code, _ = faces
    assert 0.35 <= acc(fp.decode_bits(x, reference=gen), random_code(12)) <= 0.65
    assert 0.35 <= acc(fp.decode_bits(y, reference=gen), code) <= 0.65


def test_fingerprint_is_invisible(faces):
    x, y, _, _ = faces
    mse = float(((x - y) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(1 / mse)) > 30  # PSNR (dB) of the fingerprint (31-36 by content)


@pytest.mark.xfail(strict=True, reason="known shortfall: the output-conv fingerprint does not survive JPEG 50 / "
                                       "blur k5 (measured ~0.55); see python -m faceprint.bench fingerprint")
def test_fingerprint_survives_jpeg_and_blur(fp, faces, gen):
    from faceprint.fingerprint.attacks import gaussian_blur, jpeg

    x, _, code, _ = faces
    assert acc(fp.decode_bits(jpeg(x, 50), reference=gen), code) >= 0.75  # papers/004 working range: >= 75 %
    assert acc(fp.decode_bits(gaussian_blur(x, 5), reference=gen), code) >= 0.75


def test_fingerprinted_model_survives_save_and_load(tmp_path, taef2, fp, faces):
    x, _, code, inst = faces
    path = tmp_path / "inst.safetensors"
    inst.save(path)
    back = Generator.load(path, autoencoder=taef2)
    assert back.fingerprint_["code"] == bits_to_hex(code) and back.fingerprint_["user"] == "test"
    assert back.fingerprint_["mechanism"] == "modulated"
    z, _ = back.generate(2, seed=5)
    assert torch.equal((z * 255).round() / 255, x[:2])


def test_codes_are_validated():
    code = random_code(4)
    assert torch.equal(bits_from_hex(bits_to_hex(code)), code)
    with pytest.raises(InputError):
        bits_from_hex("abc")
    fp_stub = ModulatedFingerprinter.__new__(ModulatedFingerprinter)
    from faceprint.fingerprint.modulated import ModulationConfig

    fp_stub.config = ModulationConfig()
    with pytest.raises(InputError):
        fp_stub.instance_decoder_state(torch.ones(64))
    with pytest.raises(InputError):
        fp_stub.instance_decoder_state(torch.full((128,), 2.0))
    with pytest.raises(InputError):
        fp_stub.decode_bits(torch.rand(3, 128, 128))
    fp_stub.extractor = None
    with pytest.raises(InputError, match="reference"):
        fp_stub.decode_bits(torch.rand(2, 3, 128, 128))  # no blind extractor shipped: the owner passes the model
