"""faceprint.mixing (papers/004 ch. 3, Texture Mixer on TAEF2) and `faceprint mix`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from faceprint.errors import InputError
from faceprint.mixing import MixerConfig, TextureMixer, TrainConfig, train_mixer
from faceprint.mixing import evaluation as ev
from faceprint.mixing import operations as ops
from faceprint.mixing.losses import gradient_penalty, gram, gram_loss, l1_per_item

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CELEBA_ID = SHARED / "datasets" / "celeba-id"
TINY = MixerConfig(global_dim=4, width=8, blocks=1, encoder_width=8, texture_size=32)
TINY_TRAIN = TrainConfig(steps=4, batch_size=2, gram_depth=1, checkpoint_every=2, gram_rec=10.0, gram_itp=10.0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ tiling / shuffling
def test_tile_repeats_exactly():
    z = torch.randn(2, 3, 4, 5)
    t = ops.tile(z, 3, 3)
    assert t.shape == (2, 3, 12, 15)
    for ty in range(3):
        for tx in range(3):
            assert torch.equal(t[..., 4 * ty:4 * ty + 4, 5 * tx:5 * tx + 5], z)
    assert torch.equal(ops.tile_to(z, 6, 7), t[..., :6, :7])


def test_shuffle_is_a_row_column_permutation_and_seeded():
    x = torch.arange(2 * 24 * 24, dtype=torch.float32).reshape(1, 2, 24, 24)
    y = ops.shuffle(x, local_size=8, generator=_gen(1))
    assert not torch.equal(x, y)
    # every output row is an input row with its columns permuted the same way: sorting recovers it
    assert torch.equal(torch.sort(y.flatten()).values, x.flatten())
    rows, cols = ops.shuffle_permutation(24, 24, [1, 2, 4], _gen(1))
    assert sorted(rows.tolist()) == list(range(24)) and sorted(cols.tolist()) == list(range(24))
    assert torch.equal(y[0], x[0][:, rows][:, :, cols])
    assert torch.equal(ops.shuffle(x, local_size=8, generator=_gen(1)), y)  # same seed, same draw
    assert not torch.equal(ops.shuffle(x, local_size=8, generator=_gen(2)), y)


def test_shuffle_moves_whole_cells_at_one_scale():
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16)
    for seed in range(5):
        y = ops.shuffle(x, local_size=8, generator=_gen(seed), scales=[4])
        for cy in range(4):
            for cx in range(4):
                cell = y[0, 0, 4 * cy:4 * cy + 4, 4 * cx:4 * cx + 4]
                # a 4 x 4 block of the input: consecutive values along rows, +16 down columns
                assert torch.equal(cell - cell[0, 0], x[0, 0, :4, :4])
                assert int(cell[0, 0]) % 4 == 0 and (int(cell[0, 0]) // 16) % 4 == 0


def test_swap_passes_match_the_chapters_rule():
    # two cells: swapped iff exactly one of the two coins (forward pass, backward pass) came up
    seen = [ops._swap_order(2, _gen(s)).tolist() for s in range(400)]
    share = sum(o == [1, 0] for o in seen) / len(seen)
    assert 0.4 < share < 0.6
    # against a plain list simulation of the two passes with the same coins
    for s in range(50):
        coins = (torch.rand(16, generator=_gen(s)) < 0.5).tolist()
        ref = list(range(9))
        for i in range(8):  # top-down: row i with row i + 1
            if coins[i]:
                ref[i], ref[i + 1] = ref[i + 1], ref[i]
        for k, i in enumerate(range(8, 0, -1)):  # bottom-up: row i with row i - 1
            if coins[8 + k]:
                ref[i], ref[i - 1] = ref[i - 1], ref[i]
        assert ops._swap_order(9, _gen(s)).tolist() == ref
    assert ops.coarsest_scale(8) == 2 and ops.coarsest_scale(16) == 3 and ops.coarsest_scale(1) == 0


def test_corner_override_keeps_the_source_in_the_corners():
    z = torch.randn(3, 4, 8, 8)
    t = ops.tile(z)
    keep = ops.corner_mask(8, 8)
    y = ops.shuffle(t, local_size=8, generator=_gen(0), keep=keep)
    for ty in (0, 2):
        for tx in (0, 2):
            assert torch.equal(y[..., 8 * ty:8 * ty + 8, 8 * tx:8 * tx + 8], z)
    assert not torch.equal(y[..., 8:16, 8:16], z)
    assert int(keep.sum()) == 4 * 64


def test_blend_and_canvas_weights():
    a, b = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    w = torch.full((1, 1, 3, 4), 0.25)
    assert torch.allclose(ops.blend([a, b], [w, 1 - w]), torch.full((1, 2, 3, 4), 0.25))
    for k, width, tile_w in ((2, 64, 8), (3, 40, 8), (4, 64, 8)):
        cw = ops.canvas_weights(k, width, tile_w)
        assert torch.allclose(cw.sum(0), torch.ones(width))
        for i, x0 in enumerate(ops.placements(k, width, tile_w)):
            assert torch.all(cw[i, x0:x0 + tile_w] == 1)
    assert torch.all(torch.diff(ops.canvas_weights(2, 64, 8)[0]) <= 0)  # monotone from left to right
    with pytest.raises(InputError):
        ops.canvas_weights(1, 64, 8)
    with pytest.raises(InputError):
        ops.canvas_weights(3, 16, 8)
    ba = ops.band_alpha(2, 16, 4)
    assert ba[0, 0, 0, :6].eq(1).all() and ba[0, 0, 0, 10:].eq(0).all() and torch.all(torch.diff(ba[0, 0, 0]) <= 0)


# ------------------------------------------------------------------------------------------ alpha validation
@pytest.mark.parametrize("bad,msg", [
    (float("nan"), "in [0, 1]"), (1.5, "in [0, 1]"), (-0.1, "in [0, 1]"), (True, "number in"),
    (torch.full((8, 8), float("nan")), "NaN"), (torch.full((8, 8), 2.0), "outside [0, 1]"),
    (torch.zeros(8, 9), "shape"), (torch.zeros(3, 8, 8), "shape"), ("0.5", "number or a torch.Tensor"),
])
def test_alpha_refusals(bad, msg):
    with pytest.raises(InputError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        ops.check_alpha(bad, "alpha", (8, 8))


def test_alpha_to_latent_is_the_cell_average():
    a = torch.zeros(1, 1, 16, 16)
    a[..., :8, :4] = 1
    la = ops.alpha_to_latent(a)
    assert la.shape == (1, 1, 2, 2) and torch.allclose(la, torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]]))
    with pytest.raises(InputError, match="8-px grid"):
        ops.alpha_to_latent(torch.zeros(1, 1, 12, 16))


def test_check_images_refusals():
    from faceprint.mixing.model import check_images

    for x, msg in ((torch.rand(1, 3, 36, 64), "8-px"), (torch.rand(1, 3, 24, 24), "at least 32"),
                   (torch.rand(1, 4, 32, 32), "RGB"), (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
                   (torch.full((1, 3, 32, 32), 2.0), "outside"), (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating"),
                   (torch.rand(1, 3, 32, 32), None)):
        if msg is None:
            assert check_images(x, "x").shape == (1, 3, 32, 32)
        else:
            with pytest.raises(InputError, match=msg):
                check_images(x, "x")
    with pytest.raises(InputError, match="above"):
        check_images(torch.zeros(1, 3, 64, 64), "x", max_pixels=4000)


# ------------------------------------------------------------------------------------------ losses and metrics
def test_gram_against_an_independent_computation():
    f = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    g = gram(f)
    for n in range(2):
        ref = np.zeros((5, 5))
        x = f[n].numpy()
        for i in range(5):
            for j in range(5):
                ref[i, j] = (x[i] * x[j]).sum() / (5 * 3 * 4)
        assert np.allclose(g[n].numpy(), ref)
    other = torch.randn(2, 5, 6, 2, dtype=torch.float64)
    expect = ((g - gram(other)) ** 2).sum((1, 2)) * 2  # two identical levels
    assert torch.allclose(gram_loss([f, f], [other, other]), expect)
    assert torch.allclose(l1_per_item(f, f + 0.5), torch.full((2,), 0.5, dtype=torch.float64))


def test_gradient_penalty_of_a_linear_critic():
    w = torch.tensor([3.0, 4.0])

    def critic(x):  # D(x) = w . x: the gradient is w everywhere, ||w|| = 5
        return x.flatten(1) @ w

    real, fake = torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1)
    gp = gradient_penalty(critic, real, fake, _gen(0))
    assert torch.allclose(gp, torch.full((4,), 16.0))


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    g = _gen(3)
    a = torch.rand(2, 3, 40, 48, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 40, 48, generator=g)).clamp(0, 1)
    ours = ev.ssim(a, b)
    for n in range(2):
        ref = skm.structural_similarity(a[n].permute(1, 2, 0).numpy(), b[n].permute(1, 2, 0).numpy(), channel_axis=2,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
        assert abs(float(ours[n]) - ref) < 2e-3
    assert torch.allclose(ev.ssim(a, a), torch.ones(2), atol=1e-5)


def test_sliced_wasserstein_orders_distances():
    g = _gen(4)
    a = torch.rand(16, 3, 32, 32, generator=g)
    same = torch.rand(16, 3, 32, 32, generator=g)
    shifted = (same * 0.5 + 0.5)
    d_same, d_shift = ev.sliced_wasserstein(a, same), ev.sliced_wasserstein(shifted, same)
    assert 3 * d_same < d_shift
    assert ev.sliced_wasserstein(a, same, seed=1) == ev.sliced_wasserstein(a, same, seed=1)  # seeded


def test_gram_distances_on_a_straight_path():
    gl, gr = torch.zeros(1, 4), torch.tensor([[2.0, 0, 0, 0]])
    mid = torch.tensor([[1.0, 0, 0, 0]])
    assert torch.allclose(ev.centre_gram_distance(mid, gl, gr), torch.tensor([0.5]))
    assert torch.allclose(ev.centre_cosine_distance(mid, gl, gr), torch.tensor([0.0]), atol=1e-6)
    off = torch.tensor([[1.0, 1.0, 0, 0]])
    assert float(ev.centre_cosine_distance(off, gl, gr)) > 0.5


def test_seam_and_repetition_examples():
    g = _gen(5)
    crops = torch.rand(10, 3, 32, 32, generator=g)
    x, y = ev.seam_examples(crops, 20, seed=0, min_col=8)
    assert x.shape == (20, 3, 32, 32) and int(y.sum()) == 10
    for k in range(10):  # negatives are real crops
        assert any(torch.equal(x[k], c) for c in crops)
    for k in range(10, 20):  # positives: left part of one crop, right part of another
        left = [c for c in crops if torch.equal(x[k, :, :, :8], c[:, :, :8])]
        right = [c for c in crops if torch.equal(x[k, :, :, -8:], c[:, :, -8:])]
        assert left and right and not any(torch.equal(a, b) for a in left for b in right)
    bands = torch.rand(6, 3, 16, 32, generator=g)
    xr, yr = ev.repetition_examples(bands, 8, seed=0)
    for k in range(4, 8):
        assert torch.equal(xr[k, :, :, :16], xr[k, :, :, 16:])
    assert not any(torch.equal(xr[k, :, :, :16], xr[k, :, :, 16:]) for k in range(4))


# ------------------------------------------------------------------------------------------ model, training
@pytest.fixture(scope="module")
def tiny_latents():
    return torch.randn(12, 32, 4, 4, generator=_gen(7))


@pytest.fixture(scope="module")
def tiny_mixer(taef2, tiny_latents):
    return train_mixer(tiny_latents, autoencoder=taef2, config=TINY, train=TINY_TRAIN, seed=3)


def test_untrained_mixer_is_the_latent_blend(taef2):
    m = TextureMixer.initial(autoencoder=taef2)
    z = torch.randn(2, 32, 4, 4, generator=_gen(0))
    w = torch.full((2, 1, 4, 4), 0.5)
    assert torch.allclose(m.mix_latents(z, w), m.mix_latents(z, w, harmonise=False))


def test_save_load_round_trip(tiny_mixer, tmp_path, taef2):
    p = tmp_path / "mixer.safetensors"
    tiny_mixer.save(p)
    back = TextureMixer.load(p, autoencoder=taef2)
    z = torch.randn(2, 32, 4, 4, generator=_gen(1))
    w = ops.canvas_weights(2, 12, 4).view(2, 1, 1, 12).expand(2, 1, 4, 12).contiguous()
    a = tiny_mixer.mix_latents(z, w, size=(4, 12), anchors=[0, 8], seed=5)
    b = back.mix_latents(z, w, size=(4, 12), anchors=[0, 8], seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, tiny_mixer.mix_latents(z, w, size=(4, 12), anchors=[0, 8], harmonise=False, seed=5))
    assert back.weights_digest() == tiny_mixer.weights_digest()
    assert back.provenance_["trained_steps"] == 4 and back.provenance_["complete"]
    assert b"pickle" not in p.read_bytes()[:4096]


def test_resume_equals_uninterrupted(taef2, tiny_latents, tmp_path):
    full = train_mixer(tiny_latents, autoencoder=taef2, config=TINY, train=TINY_TRAIN, seed=3)
    ck = tmp_path / "ck.safetensors"
    half = train_mixer(tiny_latents, autoencoder=taef2, config=TINY, train=TrainConfig(**{**TINY_TRAIN.to_dict(), "steps": 2}),
                       seed=3, checkpoint=ck)
    assert half.provenance_["trained_steps"] == 2
    resumed = train_mixer(tiny_latents, autoencoder=taef2, config=TINY, train=TINY_TRAIN, seed=3, checkpoint=ck)
    assert resumed.provenance_["trained_steps"] == 4
    a, b = full.state_tensors(), resumed.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], half.state_tensors()[k]) for k in a)
    # another seed or other data cannot resume this checkpoint
    with pytest.raises(InputError, match="another run"):
        train_mixer(tiny_latents, autoencoder=taef2, config=TINY, train=TINY_TRAIN, seed=4, checkpoint=ck)
    with pytest.raises(InputError, match="other settings"):
        train_mixer(tiny_latents, autoencoder=taef2, config=TINY,
                    train=TrainConfig(**{**TINY_TRAIN.to_dict(), "shuffle": False}), seed=3, checkpoint=ck)


def test_training_is_seeded(taef2, tiny_latents, tiny_mixer):
    again = train_mixer(tiny_latents, autoencoder=taef2, config=TINY, train=TINY_TRAIN, seed=3)
    other = train_mixer(tiny_latents, autoencoder=taef2, config=TINY, train=TINY_TRAIN, seed=4)
    a, b, c = tiny_mixer.state_tensors(), again.state_tensors(), other.state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_image_level_uses(tiny_mixer):
    g = _gen(2)
    tex = torch.rand(3, 3, 32, 32, generator=g)
    c = tiny_mixer.canvas(tex, 128)
    assert c.shape == (1, 3, 32, 128) and 0 <= float(c.min()) and float(c.max()) <= 1
    faces = torch.rand(2, 3, 64, 64, generator=g)
    for out in (tiny_mixer.hybrid(faces[:1], faces[1:], band=16), tiny_mixer.dissolve(faces[:1], faces[1:], 0.3),
                tiny_mixer.brush(faces[:1], faces[1:], torch.ones(64, 64) * 0.5)):
        assert out.shape == (1, 3, 64, 64)
    # alpha 0 reproduces A's reconstruction, alpha 1 B's (weights pick one source)
    d0 = tiny_mixer.dissolve(faces[:1], faces[1:], 0.0)
    d1 = tiny_mixer.dissolve(faces[1:], faces[:1], 1.0)
    assert torch.allclose(d0, d1, atol=1e-5)
    with pytest.raises(InputError, match="two sources"):
        tiny_mixer.canvas(tex[:1], 128)
    with pytest.raises(InputError, match="same size"):
        tiny_mixer.dissolve(faces[:1], torch.rand(1, 3, 32, 32), 0.5)
    with pytest.raises(InputError, match="band"):
        tiny_mixer.hybrid(faces[:1], faces[1:], band=12)


# ------------------------------------------------------------------------------------------ post-processing
def test_vertical_seam_follows_the_cheapest_path():
    from faceprint.mixing.postprocess import vertical_seam

    cost = np.ones((6, 5))
    path = [1, 2, 3, 3, 2, 1]  # moves at most one column per row
    for y, x in enumerate(path):
        cost[y, x] = 0.0
    assert vertical_seam(cost).tolist() == path
    # a path that would jump two columns is not allowed: the seam pays for a detour instead
    cost = np.ones((2, 5))
    cost[0, 0] = cost[1, 4] = 0.0
    cols = vertical_seam(cost)
    assert abs(int(cols[1]) - int(cols[0])) <= 1
    with pytest.raises(InputError, match="seam cost"):
        vertical_seam(np.ones(4))


def test_poisson_blend_solves_the_discrete_equation():
    from faceprint.mixing.postprocess import poisson_blend

    g = np.random.default_rng(0)
    guide = g.random((2, 8, 10))
    region = np.zeros((8, 10), dtype=bool)
    region[2:6, 3:8] = True
    # boundary values equal to the guide: the guide itself is the solution
    assert np.allclose(poisson_blend(guide, guide, region), guide)
    # a constant offset of the boundary on one side: inside, the result is the guide plus a harmonic
    # correction whose discrete Laplacian is zero, and outside nothing moves
    comp = guide.copy()
    comp[:, :, :3] += 0.5
    out = poisson_blend(comp, guide, region)
    assert np.array_equal(out[:, ~region], comp[:, ~region])
    corr = out - guide
    ys, xs = np.nonzero(region)
    for y, x in zip(ys, xs):
        nb = [(y + dy, x + dx) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
        lap = sum(corr[:, a, b] - corr[:, y, x] for a, b in nb)
        assert np.allclose(lap, 0, atol=1e-9)
    assert 0 < corr[:, 3, 3].mean() < 0.5 and corr[:, 3, 3].mean() > corr[:, 3, 7].mean() > 0


def test_paste_sources_keeps_the_sources_and_the_far_canvas():
    from faceprint.mixing.postprocess import paste_sources

    g = _gen(4)
    canvas = torch.rand(1, 3, 32, 160, generator=g)
    src = torch.rand(2, 3, 32, 32, generator=g)
    out, info = paste_sources(canvas, src, [0, 128], overlap=8, blend=8)
    assert out.shape == canvas.shape
    # the part of each source away from its seam strip is the source, exactly (float32 round trip)
    assert torch.allclose(out[0, :, :, :24], src[0, :, :, :24], atol=1e-6)
    assert torch.allclose(out[0, :, :, 136:], src[1, :, :, 8:], atol=1e-6)
    # generated canvas beyond the Poisson band is untouched
    assert torch.equal(out[0, :, :, 48:112], canvas[0, :, :, 48:112])
    lo, hi, _ = info["sources"][0]["seams"]["right"]
    assert 24 <= lo <= hi < 32 and "left" not in info["sources"][0]["seams"]
    assert info["blend_pixels"] > 0
    with pytest.raises(InputError, match="does not fit"):
        paste_sources(canvas, src, [0, 140])
    with pytest.raises(InputError, match="one placement per source"):
        paste_sources(canvas, src, [0])


def test_canvas_post_processing_restores_the_sides(taef2):
    m = TextureMixer.initial(autoencoder=taef2)
    g = _gen(5)
    base = torch.rand(2, 3, 8, 8, generator=g)
    tex = torch.nn.functional.interpolate(base, size=64, mode="bilinear", align_corners=False)
    raw = m.canvas(tex, 256, postprocess=False)
    done = m.canvas(tex, 256)
    err = lambda c: float((c[..., :32] - tex[:1, ..., :32]).abs().max())  # noqa: E731
    assert err(done) < 1e-5 < err(raw)
    assert float(ev.ssim(done[..., -64:], tex[1:])) > float(ev.ssim(raw[..., -64:], tex[1:]))
    assert torch.equal(done[..., 100:156], raw[..., 100:156])  # the middle is the decoded mix


# ------------------------------------------------------------------------------------------ CLI
def _png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    skd = pytest.importorskip("skimage.data")
    d = tmp_path_factory.mktemp("tex")
    out = []
    for name in ("brick", "grass", "gravel"):
        a = getattr(skd, name)()[100:164, 100:164]
        out.append(_png(d / f"{name}.png", np.stack([a] * 3, -1)))
    return out


def _provenance(path):
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["faceprint-provenance"]), im.size


def test_cli_canvas_on_textures(textures, tmp_path, tiny_mixer, capsys):
    from faceprint.cli.main import main
    from faceprint.io import sha256_file

    mix_file = tmp_path / "m.safetensors"
    tiny_mixer.save(mix_file)
    out = tmp_path / "canvas.png"
    code = main(["mix", *map(str, textures), "--mode", "interpolate", "--width", "256", "--mixer", str(mix_file),
                 "-o", str(out), "--provenance", str(tmp_path / "p.json"), "-q"])
    assert code == 0, capsys.readouterr().err
    rec, size = _provenance(out)
    assert size == (256, 64)
    assert [s["sha256"] for s in rec["sources"]] == [sha256_file(t) for t in textures]
    assert rec["operation"] == "edit" and all(s["real_photo"] for s in rec["sources"])
    assert rec["mixer"]["weights_sha256_16"] == tiny_mixer.weights_digest()
    assert json.loads((tmp_path / "p.json").read_text()) == rec
    for method in ("latent", "pixel"):
        assert main(["mix", *map(str, textures[:2]), "--mode", "interpolate", "--method", method, "-o",
                     str(tmp_path / f"{method}.png"), "-q"]) == 0
    # the pixel canvas keeps each source exactly at its end
    from PIL import Image

    px = np.asarray(Image.open(tmp_path / "pixel.png"))
    assert np.array_equal(px[:, :64], np.asarray(Image.open(textures[0]).convert("RGB")))
    # ours puts the sources back (post-processing) left of the seam strip; --no-postprocess does not
    src0 = np.asarray(Image.open(textures[0]).convert("RGB")).astype(int)
    ours = np.asarray(Image.open(out)).astype(int)
    assert rec["postprocess"] is True and np.abs(ours[:, :40] - src0[:, :40]).max() <= 1
    raw = tmp_path / "raw.png"
    assert main(["mix", *map(str, textures), "--mode", "interpolate", "--width", "256", "--mixer", str(mix_file),
                 "--no-postprocess", "-o", str(raw), "-q"]) == 0
    assert _provenance(raw)[0]["postprocess"] is False
    assert np.abs(np.asarray(Image.open(raw)).astype(int)[:, :40] - src0[:, :40]).max() > 1


def test_cli_refusals(textures, tmp_path, capsys):
    from faceprint.cli.main import main

    a, b = map(str, textures[:2])
    big = _png(tmp_path / "big.png", np.zeros((2056, 2056, 3), np.uint8))
    odd = _png(tmp_path / "odd.png", np.zeros((60, 64, 3), np.uint8))
    wrong_mask = _png(tmp_path / "mask.png", np.zeros((32, 32), np.uint8))
    cases = [
        ([a, "--mode", "interpolate"], "at least two sources"),
        ([a, b, "--mode", "brush"], "needs --mask"),
        ([a, b, "--mode", "brush", "--mask", str(wrong_mask)], "32x32 px but the sources are 64x64"),
        ([a, b, str(textures[2]), "--mode", "dissolve"], "exactly two"),
        ([a, str(odd), "--mode", "dissolve"], "not on the 8-px latent grid"),
        ([a, str(big), "--mode", "dissolve"], "above"),
        ([a, b, "--mode", "hybrid", "--band", "12"], "multiple of 8"),
        ([a, b, "--mode", "dissolve", "--alpha", "1.5"], "in [0, 1]"),
        ([a, b, "--mode", "dissolve", "--alpha", "nan"], "in [0, 1]"),
        ([a, b, "--mode", "dissolve", "--method", "ours", "--mixer", str(tmp_path / "none.safetensors")], "no mixer"),
        ([a, "m.safetensors:seed=x", "--mode", "dissolve"], "MODEL.safetensors:seed=N"),
    ]
    out = tmp_path / "o.png"
    for argv, msg in cases:
        method = [] if "--method" in argv else ["--method", "latent"]
        try:
            code = main(["mix", *argv, *method, "-o", str(out), "-q"])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and msg in err, (argv, err)
        assert not out.exists()
    # an output never replaces a source
    code = main(["mix", a, b, "--mode", "dissolve", "--method", "latent", "-o", a])
    assert code == 2 and "choose a new file name" in capsys.readouterr().err


def test_cli_snap_reports_the_crop(textures, tmp_path, capsys):
    from faceprint.cli.main import main

    odd = np.zeros((70, 66, 3), np.uint8)
    a = _png(tmp_path / "a.png", odd)
    b = _png(tmp_path / "b.png", odd + 90)
    out = tmp_path / "o.png"
    assert main(["mix", str(a), str(b), "--mode", "dissolve", "--method", "latent", "--snap", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "cropped to the 8-px grid" in err and "[70, 66] -> [64, 64]" in err
    rec, size = _provenance(out)
    assert size == (64, 64) and rec["sources"][0]["adjusted"]["cropped_from"] == [70, 66]


@pytest.fixture(scope="module")
def forgetful_model(tmp_path_factory):
    """A model fitted on 8 photos of each of 3 celeba-id people, then made to forget person P."""
    if not CELEBA_ID.is_dir():
        pytest.skip(f"celeba-id not found at {CELEBA_ID}")
    pytest.importorskip("dlib")
    from faceprint.cli.main import main

    people = sorted(p for p in (CELEBA_ID / "images").iterdir())[:3]
    d = tmp_path_factory.mktemp("photos")
    for p in people:
        for f in sorted(p.iterdir())[:8]:
            (d / f"{p.name}_{f.name}").symlink_to(f)
    m = d.parent / "m.safetensors"
    assert main(["fit", str(d), "-o", str(m), "--components", "1", "-q", "--no-cache"]) == 0
    forget_dir = d.parent / "forget"
    forget_dir.mkdir()
    for f in sorted(people[0].iterdir())[:8]:
        (forget_dir / f.name).symlink_to(f)
    out = d.parent / "forgot.safetensors"
    assert main(["tame", "forget", str(m), "--photos", str(forget_dir), "-o", str(out), "--name", "person P", "-q"]) == 0
    return out, people


def _face_png(src: Path, dst: Path) -> Path:
    from faceprint.data import load_image

    x = load_image(src, 128)
    return _png(dst, (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_cli_refuses_a_forgotten_person(forgetful_model, tmp_path, capsys):
    from faceprint.cli.main import main

    model, people = forgetful_model
    p_files = sorted(people[0].iterdir())
    other = sorted(people[1].iterdir())
    unseen_p = _face_png(p_files[20], tmp_path / "p_unseen.png")      # never a training photo: gallery check
    stranger = _face_png(other[20], tmp_path / "q.png")
    stranger2 = _face_png(sorted(people[2].iterdir())[20], tmp_path / "r.png")
    out = tmp_path / "o.png"
    base = ["--mode", "hybrid", "--method", "latent", "--forgotten", str(model), "-o", str(out), "-q"]
    # the very file the model forgot: refused by its sha256 (jpg read at its own size, snapped)
    code = main(["mix", str(p_files[0]), str(other[0]), "--snap", *base])
    assert code == 2 and "a model forgot (same sha256)" in capsys.readouterr().err
    code = main(["mix", str(unseen_p), str(stranger), *base])
    err = capsys.readouterr().err
    assert code == 2 and "shows a person the model forgot" in err and "person P" in err
    assert not out.exists()
    # two people the model did not forget: mixed, and the check is recorded
    assert main(["mix", str(stranger), str(stranger2), *base]) == 0
    rec, _ = _provenance(out)
    chk = rec["identity_check"]
    assert chk["galleries"] == 1 and chk["forgotten_photos_known"] == 8
    assert {c["input"] for c in chk["checked"]} >= {"the mixed output"}
    assert all(c["distance"] > c["threshold"] for c in chk["checked"])


def test_cli_generated_sources_and_real_photos(forgetful_model, tmp_path, capsys):
    from faceprint.cli.main import main
    from faceprint.io import sha256_file

    model, people = forgetful_model
    photo = _face_png(sorted(people[1].iterdir())[25], tmp_path / "photo.png")
    out = tmp_path / "g.png"
    assert main(["mix", f"{model}:seed=3", f"{model}:seed=4:index=2", "--mode", "dissolve", "--alpha", "0.25",
                 "--method", "latent", "-o", str(out), "-q"]) == 0
    rec, size = _provenance(out)
    assert size == (128, 128) and rec["operation"] == "generated" and rec["alpha"] == 0.25
    assert rec["sources"][0] == {**rec["sources"][0], "kind": "generated", "seed": 3, "index": 0,
                                 "model_sha256": sha256_file(model), "real_photo": False}
    assert rec["sources"][1]["seed"] == 4 and rec["sources"][1]["index"] == 2
    out2 = tmp_path / "h.png"
    assert main(["mix", str(photo), f"{model}:seed=3", "--mode", "hybrid", "--method", "latent", "-o", str(out2),
                 "-q"]) == 0
    rec2, _ = _provenance(out2)
    assert rec2["operation"] == "edit" and rec2["sources"][0]["real_photo"] is True
    assert not math.isnan(rec2["identity_check"]["checked"][0]["distance"])
