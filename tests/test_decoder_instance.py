"""A model copy with its own decoder weights (the hook fingerprinted instances use)."""

import torch

from faceprint.latent.generator import Generator


def test_with_decoder_roundtrip_changes_images_and_survives_save(tmp_path, taef2, celeba_latents):
    from faceprint.latent.generator import GeneratorConfig

    class LS:
        latents = celeba_latents.latents[:64]
        relpaths = [f"{i}.jpg" for i in range(64)]

    gen = Generator(GeneratorConfig(components=1), autoencoder=taef2).fit(LS, seed=0)
    state = {k: v.clone() for k, v in taef2.decoder.state_dict().items()}
    last = [k for k in state if k.endswith("bias")][-1]
    state[last] += 0.1  # brighten every output pixel before the clamp
    inst = gen.with_decoder(state, {"code": "ab" * 16, "instance": "alice"})
    assert inst.autoencoder.base_id == taef2.id and inst.autoencoder.id != taef2.id
    a, _ = gen.generate(4, seed=3)
    b, _ = inst.generate(4, seed=3)
    assert (b.mean() - a.mean()) > 0.02
    path = tmp_path / "inst.safetensors"
    inst.save(path)
    back = Generator.load(path, autoencoder=taef2)
    assert back.fingerprint_["instance"] == "alice"
    assert back.autoencoder.id == inst.autoencoder.id
    c, _ = back.generate(4, seed=3)
    assert torch.equal(b, c)
    # the original model is untouched
    assert gen.decoder_state_ is None and gen.autoencoder is taef2
