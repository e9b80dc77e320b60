"""Data-level fingerprint (papers/004, Ch. 5): a code embedded in the training latents reaches
every generated latent, and the linear decoder reads it back from the generated faces."""

from types import SimpleNamespace

import pytest
import torch

from faceprint.errors import ConfigError, InputError, NotFittedError
from faceprint.fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter, fingerprint_latent_set
from faceprint.fingerprint.modulated import random_code
from faceprint.latent.generator import Generator, GeneratorConfig


@pytest.fixture(scope="module")
def parts(taef2, celeba_latents):
    """Bank fingerprinter (channels chosen on photos 64..95), a plain and a fingerprinted model
    fitted on photos 0..63, and the code."""
    train = celeba_latents.latents[:64]
    held = celeba_latents.latents[64:96]

    LS = SimpleNamespace(latents=train, relpaths=[f"{i}.jpg" for i in range(64)])
    fp = BankFingerprinter(BankFingerprintConfig()).fit(held, taef2)
    code = random_code(21)
    plain = Generator(GeneratorConfig(components=1), autoencoder=taef2).fit(LS, seed=0)
    fgen = Generator(GeneratorConfig(components=1), autoencoder=taef2).fit(fingerprint_latent_set(LS, fp, code), seed=0)
    return fp, plain, fgen, code


def acc(p, code):
    return float(((p > 0.5).float() == code).float().mean())


def test_generated_latents_carry_the_fingerprint_exactly(parts):
    fp, plain, fgen, code = parts
    b = fgen.sample_latents(6, seed=2)
    assert (b.provenance >= 0).all()  # every latent pixel is a copy of a (fingerprinted) bank pixel
    # every copied pixel keeps its quantised value: the bits read from the latents are the code
    assert acc(fp.bits_from_latents(b.latents), code) == 1.0


def test_generated_faces_decode_to_the_code_and_others_do_not(parts, taef2):
    fp, plain, fgen, code = parts
    x, _ = fgen.generate(8, seed=3)
    y, _ = plain.generate(8, seed=3)
    assert acc(fp.decode_bits(x, taef2), code) >= 0.85
    assert 0.3 <= acc(fp.decode_bits(y, taef2), code) <= 0.7
    assert 0.3 <= acc(fp.decode_bits(x, taef2), random_code(22)) <= 0.7


def test_save_load_and_validation(tmp_path, parts, taef2):
    fp, _, fgen, code = parts
    path = tmp_path / "bank.safetensors"
    fp.save(path)
    back = BankFingerprinter.load(path)
    z = fgen.sample_latents(2, seed=4).latents
    assert torch.equal(back.embed(z, code), fp.embed(z, code))
    x = taef2.decode(z)
    assert torch.equal(back.decode_bits(x, taef2), fp.decode_bits(x, taef2))
    with pytest.raises(NotFittedError):
        BankFingerprinter().embed(z, code)
    with pytest.raises(InputError):
        fp.embed(torch.zeros(2, 16, 16, 16), code)
    with pytest.raises(ConfigError):
        BankFingerprintConfig(step=0)


def test_bank_of_a_fitted_model_can_be_fingerprinted_per_instance(parts, taef2, tmp_path):
    from faceprint.fingerprint.datalevel import fingerprint_bank_instance

    fp, plain, _, _ = parts
    code = random_code(23)
    inst = fingerprint_bank_instance(plain, fp, code, {"user": "u1"})
    assert plain.fingerprint_ is None and not torch.equal(inst.bank_, plain.bank_)
    smp = inst.sample_latents(4, seed=6)
    assert acc(fp.bits_from_latents(smp.latents), code) == 1.0
    x = taef2.decode(smp.latents)
    assert acc(fp.decode_bits(x, taef2), code) >= 0.85
    path = tmp_path / "inst.safetensors"
    inst.save(path)
    back = Generator.load(path, autoencoder=taef2)
    assert back.fingerprint_["user"] == "u1" and torch.equal(back.bank_, inst.bank_)
