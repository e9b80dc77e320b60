"""faceprint.rewrite (papers/001): decoder and memory rewrites on a small real model.

A 96-photo celeba model with one component; edits are real pastes (a celeba photo's eye band
onto generated faces); few fine-tuning steps. Every test runs the real TAEF2 and the real
generator."""

import json

import pytest
import torch

from faceprint.errors import ConfigError, InputError, TrainingDivergedError

pytestmark = pytest.mark.usefixtures("one_thread")

RECT = (24, 48, 80, 24)  # the eye band of a 128 px celeba face


@pytest.fixture(scope="module")
def gen(celeba_dir, taef2):
    from faceprint.data import FaceFolder, LatentCache, encode_folder
    from faceprint.latent.generator import Generator, GeneratorConfig

    # the user's latent cache (keyed by file content): the photos are encoded once per machine
    latents = encode_folder(FaceFolder(celeba_dir, size=128, limit=64), taef2, cache=LatentCache())
    return Generator(GeneratorConfig(components=1), autoencoder=taef2).fit(latents, seed=0)


@pytest.fixture(scope="module")
def source(celeba_dir):
    from faceprint.data import load_image

    return load_image(celeba_dir / "000053.jpg", 128)  # a photo with eyeglasses (attribute file)


@pytest.fixture(scope="module")
def edits(gen, source):
    from faceprint.rewrite import paste_edit

    return [paste_edit(gen, source, RECT, 0, i) for i in (0, 1)]


@pytest.fixture(scope="module")
def rewritten(gen, edits):
    from faceprint.rewrite import RewriteConfig, rewrite

    return rewrite(gen, edits, RewriteConfig(steps=40, ordinary=16, paste_samples=6, batch=6, projector="free"))


def _diff(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_decoder_rewrite_learns_the_new_rule_and_touches_only_the_memory(gen, rewritten, taef2):
    out, rep = rewritten
    assert not rep.noop and rep.memory == "decoder"
    assert rep.loss_after["new_rule"] < 0.6 * rep.loss_before["new_rule"]
    assert rep.loss_before["old_rules"] == 0.0 and rep.loss_after["old_rules"] < rep.loss_before["new_rule"]
    changed = _diff(taef2.decoder.state_dict(), out.decoder_state_)
    assert changed == {"5.conv.2.weight", "5.conv.2.bias", "5.conv.4.weight", "5.conv.4.bias"}
    op = out.provenance_["operations"][-1]
    assert op["operation"] == "rewrite" and op["layer"] == "16x16" and op["conv_layers"] == 2
    assert len(op["exemplars"]) == 2 and len(op["exemplars"][0]["edited_sha256"]) == 64
    assert op["exemplars"][0]["mask_bbox_xywh"] == list(RECT)
    assert gen.decoder_state_ is None and gen.provenance_.get("operations") == []  # the input is untouched


def test_rewritten_faces_change_in_the_region_and_travel_with_the_file(gen, rewritten, tmp_path):
    from faceprint.latent.generator import Generator
    from faceprint.rewrite import dilate

    out, _ = rewritten
    before, _ = gen.generate(4, seed=5)
    after, _ = out.generate(4, seed=5)
    inside = torch.zeros(128, 128, dtype=torch.bool)
    x, y, w, h = RECT
    inside[y:y + h, x:x + w] = True
    outside = dilate(inside.float(), 1) == 0
    d = (after - before).abs().mean(1)  # (4, 128, 128)
    assert d[:, inside].mean() > 3 * d[:, outside].mean()
    path = tmp_path / "r.safetensors"
    out.save(path)
    back = Generator.load(path)
    again, _ = back.generate(4, seed=5)
    assert torch.equal(again, after)
    assert back.provenance_["operations"][-1]["operation"] == "rewrite"


def test_layer_and_depth_choose_the_memory(gen, edits, taef2):
    from faceprint.rewrite import RewriteConfig, rewrite

    out, _ = rewrite(gen, edits[:1], RewriteConfig(layer="32x32", conv_layers=1, steps=3, ordinary=4, paste_samples=2,
                                                   projector="free"))
    assert _diff(taef2.decoder.state_dict(), out.decoder_state_) == {"10.conv.4.weight", "10.conv.4.bias"}
    with pytest.raises(ConfigError):
        RewriteConfig(layer="64x64")
    with pytest.raises(ConfigError):
        RewriteConfig(conv_layers=4)


def test_unweighted_gives_the_new_rule_less_say(gen, edits):
    from faceprint.rewrite import RewriteConfig, rewrite

    kw = dict(steps=25, ordinary=8, paste_samples=4, batch=4, projector="free")
    _, w = rewrite(gen, edits, RewriteConfig(**kw))
    _, u = rewrite(gen, edits, RewriteConfig(weighting="unweighted", **kw))
    assert w.loss_after["new_rule"] < u.loss_after["new_rule"]


def test_noop_edits_return_the_model_unchanged(gen, edits):
    from faceprint.rewrite import Edit, RewriteConfig, rewrite

    e = edits[0]
    same = Edit(e.original, e.original.clone(), e.mask, e.latent)
    out, rep = rewrite(gen, [same])
    assert rep.noop and out is gen
    out, rep = rewrite(gen, edits, RewriteConfig(p=0.0))
    assert rep.noop and out is gen


def test_bad_edits_are_refused(gen, edits):
    from faceprint.rewrite import Edit, rewrite

    e = edits[0]
    with pytest.raises(InputError, match="mask is empty"):
        rewrite(gen, [Edit(e.original, e.edited, torch.zeros(128, 128))])
    with pytest.raises(InputError, match="covers 100%"):
        rewrite(gen, [Edit(e.original, e.edited, torch.ones(128, 128))])
    with pytest.raises(InputError, match="64x64 px but the model makes 128x128"):
        rewrite(gen, [Edit(e.original[:, :64, :64], e.edited[:, :64, :64], e.mask[:64, :64])])
    bad = e.edited.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        rewrite(gen, [Edit(e.original, bad, e.mask)])
    with pytest.raises(InputError, match="1-3"):
        rewrite(gen, [e] * 11)


def test_nan_during_fine_tuning_rolls_back_and_raises(gen, edits, taef2):
    from faceprint.rewrite.decoder import rewrite_decoder

    lat = edits[0].latent[None]
    vals = torch.full((1, 64, 16, 16), float("nan"))
    before = {k: v.clone() for k, v in taef2.decoder.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="nothing was written"):
        rewrite_decoder(taef2.decoder, 5, 2, edit_latents=lat, edit_values=vals, edit_masks=edits[0].mask[None],
                        ordinary_latents=lat, steps=3)
    assert not _diff(before, taef2.decoder.state_dict())


def test_a_fingerprinted_instance_is_refused_but_an_instance_of_a_rewritten_base_verifies(gen, rewritten, taef2):
    from faceprint.fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter, fingerprint_bank_instance
    from faceprint.fingerprint.modulated import bit_accuracy, random_code
    from faceprint.rewrite import FingerprintedInstanceError, rewrite

    out, _ = rewritten
    fp = BankFingerprinter(BankFingerprintConfig(probe=8)).fit(gen.bank_[:8].float(), taef2)
    code = random_code(3)
    inst = fingerprint_bank_instance(out, fp, code, {"instance": "alice"})
    with pytest.raises(FingerprintedInstanceError, match="rewrite the base model, then issue instances"):
        rewrite(inst, [])
    faces, _ = inst.generate(6, seed=9)
    acc = float(bit_accuracy(fp.decode_bits(faces, taef2), code).mean())
    assert acc >= 0.85
    assert inst.decoder_state_ is out.decoder_state_ or not _diff(inst.decoder_state_, out.decoder_state_)


def test_a_keyed_instance_of_a_rewritten_base_is_read_with_the_rewritten_decoder(gen, rewritten, taef2):
    """The keyed read-out renders its reference with the base's own decoder: the faces of an
    instance of a rewritten base name their recipient, and score higher than against references
    from the pretrained decoder, which lack the rewritten pattern."""
    from faceprint.fingerprint.keyed import BaseIndex, OwnerSecret, fingerprint_keyed_instance, threshold_for

    out, _ = rewritten
    assert out.autoencoder.id != taef2.id  # the rewritten base decodes with its own decoder
    secret = OwnerSecret().fit(gen.bank_.float(), taef2, seed=0, master=b"\x05" * 32)
    codes = [f"{i:032x}" for i in range(1, 9)]
    inst = fingerprint_keyed_instance(out, secret, codes[0], {"instance": "alice"})
    faces, _ = inst.generate(6, seed=9)
    own = BaseIndex(out.bank_, out.autoencoder, secret).residuals(faces).scores(secret, codes)
    plain = BaseIndex(out.bank_, taef2, secret).residuals(faces).scores(secret, codes)
    thr = threshold_for(1e-5, len(codes))
    assert bool((own.argmax(1) == 0).all()) and float(own[:, 0].min()) >= thr, own
    assert float(own[:, 0].median()) > float(plain[:, 0].median()), (own[:, 0], plain[:, 0])


def test_bank_value_edit_puts_the_pattern_in_every_face(gen, edits):
    from faceprint.rewrite import RewriteConfig, rewrite
    from faceprint.rewrite.bank import region_cells

    out, rep = rewrite(gen, edits[:1], RewriteConfig(memory="bank"))
    R = region_cells(edits[0].mask, 16)
    assert rep.record["region_cells"] == int(R.sum()) == 30
    s0 = gen.sample_latents(6, seed=2)
    s1 = out.sample_latents(6, seed=2)
    want = out.bank_[0][:, R].float()
    assert torch.equal(s1.latents[:, :, R], want[None].expand(6, -1, -1))
    assert not torch.equal(s0.latents[:, :, R], s1.latents[:, :, R])
    assert torch.equal(out.bank_[:, :, ~R], gen.bank_[:, :, ~R])
    assert torch.equal(s0.provenance, s1.provenance)  # the kept keys: every face picks the same photos


def test_bank_key_value_insertion_is_retrieved_and_saved(gen, edits, tmp_path):
    from faceprint.latent.generator import Generator
    from faceprint.rewrite import RewriteConfig, rewrite
    from faceprint.rewrite.bank import region_cells

    N = gen.n_photos
    R = region_cells(edits[0].mask, 16)
    share = {}
    for alpha in (0.0, 1.0):
        out, rep = rewrite(gen, edits, RewriteConfig(memory="bank", bank_mode="insert", key_shift=alpha))
        assert rep.record["rows_inserted"] == 2 and out.n_photos == N + 2
        s = out.sample_latents(16, seed=4)
        share[alpha] = float((s.provenance[:, R] >= N).float().mean())
    assert share[1.0] > share[0.0] and share[1.0] > 0.3
    path = tmp_path / "kv.safetensors"
    out.save(path)
    back = Generator.load(path, autoencoder=None)
    assert torch.equal(back.bank_keys_, out.bank_keys_)
    assert torch.equal(back.sample_latents(4, seed=4).latents, out.sample_latents(4, seed=4).latents)


def test_free_projector_restores_faces_and_trained_projector_resumes_exactly(gen, taef2, tmp_path):
    from faceprint.rewrite.projector import (BackwardProjector, ProjectorConfig, restoration_table,
                                             sliced_wasserstein_features, train_projector)

    x, s = gen.generate(4, seed=11)
    b0 = BackwardProjector.free(taef2)
    t = restoration_table(b0, x)
    assert t["psnr"] > 26 and t["ssim"] > 0.8 and t["tfd"] >= 0
    cfg = ProjectorConfig(blocks=1, steps=4, batch=2, scc_batch=1, crop=4, margin=1, checkpoint_every=2)
    full = train_projector(taef2, s.latents, x, config=cfg, seed=1)
    ck = tmp_path / "ck.safetensors"
    half = train_projector(taef2, s.latents, x, config=ProjectorConfig(**{**cfg.to_dict(), "losses": cfg.losses,
                                                                          "steps": 2}), seed=1, checkpoint=ck)
    assert half.provenance_["trained_steps"] == 2
    resumed = train_projector(taef2, s.latents, x, config=cfg, seed=1, checkpoint=ck)
    for a, b in zip(full.alignment.state_dict().values(), resumed.alignment.state_dict().values()):
        assert torch.equal(a, b)
    path = tmp_path / "p.safetensors"
    resumed.save(path)
    back = BackwardProjector.load(path, taef2)
    assert torch.equal(back.features(x[:2]), resumed.features(x[:2]))
    v = b0.base_features(x)
    assert sliced_wasserstein_features(v, v) == 0.0 and sliced_wasserstein_features(v, v + 1) > 0.5


# ------------------------------------------------------------------------------------ CLI
def _run(argv, capsys):
    from faceprint.cli.main import main

    code = main(argv)
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def model_file(gen, tmp_path_factory):
    p = tmp_path_factory.mktemp("m") / "model.safetensors"
    gen.save(p)
    return p


def test_cli_paste_rewrite_and_inspect(model_file, celeba_dir, tmp_path, capsys):
    out = tmp_path / "glasses.safetensors"
    code, cap = _run(["rewrite", str(model_file), "--paste", f"{celeba_dir / '000053.jpg'}:17,43,56,17",
                      "--at", "24,48,80,24", "--onto", "0:1", "--steps", "5", "--ordinary", "8", "--paste-samples", "4", "--projector", "free",
                      "-o", str(out)],
                     capsys)
    assert code == 0, cap.err
    assert "rewrote the decoder at 16x16" in cap.err
    code, cap = _run(["inspect", str(out), "--json"], capsys)
    info = json.loads(cap.out)
    op = info["provenance"]["operations"][-1]
    assert op["operation"] == "rewrite" and op["exemplars"][0]["onto"] == {"seed": 0, "index": 1}
    assert "loss_before" in op and "loss_after" in op and any(k.startswith("decoder.5.") for k in info["tensors"])
    code, cap = _run(["inspect", str(out)], capsys)
    assert '"operation": "rewrite"' in cap.out


def test_cli_noop_copies_the_model_bit_for_bit(model_file, gen, tmp_path, capsys):
    from faceprint import render

    face, _ = gen.generate(1, seed=0)
    f = tmp_path / "face.png"
    render.save_png(render.to_uint8(face)[0], f)
    out = tmp_path / "same.safetensors"
    code, cap = _run(["rewrite", str(model_file), "--edit", str(f), "--original", str(f), "--mask", str(_mask(tmp_path)),
                      "-o", str(out)], capsys)
    assert code == 0 and "no-op" in cap.err
    assert out.read_bytes() == model_file.read_bytes()


def _mask(tmp_path, fill=None):
    from faceprint import render

    m = torch.zeros(1, 3, 128, 128)
    x, y, w, h = RECT if fill is None else fill
    m[:, :, y:y + h, x:x + w] = 1
    p = tmp_path / f"mask{x}{y}{w}{h}.png"
    render.save_png(render.to_uint8(m)[0], p)
    return p


@pytest.mark.parametrize("case", ["not-image", "wrong-size", "empty-mask", "huge-mask", "no-original"])
def test_cli_bad_input_one_line_no_output(case, model_file, gen, tmp_path, capsys):
    from faceprint import render

    face, _ = gen.generate(1, seed=0)
    f = tmp_path / "face.png"
    render.save_png(render.to_uint8(face)[0], f)
    e = tmp_path / "edited.png"
    g = face.clone()
    g[:, :, 50:70, 30:90] = 0.2
    render.save_png(render.to_uint8(g)[0], e)
    out = tmp_path / "new.safetensors"
    args = ["rewrite", str(model_file), "--edit", str(e), "--original", str(f), "-o", str(out), "--steps", "2"]
    if case == "not-image":
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        args[3] = str(bad)
        want = "--edit"
    elif case == "wrong-size":
        small = tmp_path / "small.png"
        render.save_png(render.to_uint8(face[:, :, :96, :96])[0], small)
        args[3] = str(small)
        want = "96x96 px but the model makes 128x128"
    elif case == "empty-mask":
        args += ["--mask", str(_mask(tmp_path, (0, 0, 0, 0)))]
        want = "mask is empty"
    elif case == "huge-mask":
        args += ["--mask", str(_mask(tmp_path, (0, 0, 128, 128)))]
        want = "covers 100%"
    else:
        args = args[:4] + args[6:]
        want = "1 --edit but 0 --original"
    code, cap = _run(args, capsys)
    assert code == 2
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and want in lines[0], cap.err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_cli_refuses_a_fingerprinted_instance(gen, taef2, tmp_path, capsys):
    from faceprint.fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter, fingerprint_bank_instance
    from faceprint.fingerprint.modulated import random_code

    fp = BankFingerprinter(BankFingerprintConfig(probe=4)).fit(gen.bank_[:4].float(), taef2)
    inst = fingerprint_bank_instance(gen, fp, random_code(1), {"instance": "bob"})
    p = tmp_path / "bob.safetensors"
    inst.save(p)
    out = tmp_path / "x.safetensors"
    code, cap = _run(["rewrite", str(p), "--paste", f"{p}:0,0,8,8", "--onto", "0:0", "-o", str(out)], capsys)
    assert code == 2 and "fingerprinted instance" in cap.err and "'bob'" in cap.err
    assert not out.exists()


def test_forgetting_after_a_bank_rewrite_keeps_keys_and_values_aligned(gen, edits):
    """Taming after a memory rewrite: the rows stay paired, and forgetting the inserted rows
    takes the rewritten pattern out of the faces."""
    from faceprint.rewrite import RewriteConfig, rewrite
    from faceprint.rewrite.bank import region_cells
    from faceprint.taming.forget import forget

    N = gen.n_photos
    R = region_cells(edits[0].mask, 16)
    out, _ = rewrite(gen, edits, RewriteConfig(memory="bank", bank_mode="insert", key_shift=1.0))
    assert float((out.sample_latents(16, seed=4).provenance[:, R] >= N).float().mean()) > 0.3
    # forget one ordinary photo: keys follow values, the inserted rows are still retrieved
    one = forget(out, [3])
    one = one[0]
    assert one.bank_keys_.shape == one.bank_.shape == (N + 1, *gen.latent_shape)
    assert torch.equal(one.bank_keys_[3], out.bank_keys_[4]) and torch.equal(one.bank_[3], out.bank_[4])
    s = one.sample_latents(16, seed=4)
    assert float((s.provenance[:, R] >= N - 1).float().mean()) > 0.3
    # forget the two inserted rows: the memory is the original bank again
    back = forget(out, [N, N + 1])
    back = back[0]
    assert back.bank_.shape[0] == N and torch.equal(back.bank_, gen.bank_)
    assert int((back.sample_latents(16, seed=4).provenance >= N).sum()) == 0
