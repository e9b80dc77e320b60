"""Registry of issued fingerprints on SQLite and (when configured) PostgreSQL.

PostgreSQL runs when FACEPRINT_TEST_POSTGRES_URL is set (e.g.
postgresql+psycopg://faceprint@127.0.0.1:5432/faceprint_test); with FACEPRINT_REQUIRE_POSTGRES=1
a missing URL or an unreachable server fails the tests instead of skipping them. Every
PostgreSQL test works in a fresh schema, dropped afterwards.
"""

import os
import threading
import uuid

import pytest
import torch

from faceprint.errors import ConfigError, InputError
from faceprint.fingerprint.registry import (
    DEFAULT_MIN_DISTANCE,
    Registry,
    RegistryConfig,
    code_to_hex,
    code_to_int,
    hamming_distances,
    hex_to_code,
    hex_to_codes,
    int_to_code,
    random_code,
)


HASH = "ab" * 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _postgres_url() -> str:
    url = os.environ.get("FACEPRINT_TEST_POSTGRES_URL")
    required = os.environ.get("FACEPRINT_REQUIRE_POSTGRES") == "1"
    if not url:
        msg = "FACEPRINT_TEST_POSTGRES_URL is not set"
        if required:
            pytest.fail(f"{msg} but FACEPRINT_REQUIRE_POSTGRES=1")
        pytest.skip(msg)
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 10})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - any failure means "unreachable"
        msg = f"PostgreSQL at FACEPRINT_TEST_POSTGRES_URL is unreachable ({e.__class__.__name__}: {e})"
        if required:
            pytest.fail(msg)
        pytest.skip(msg)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def open_registry(request, tmp_path):
    """A factory: open_registry(config=None) -> a new Registry object on one shared database."""
    if request.param == "sqlite":
        path = tmp_path / "registry.db"
        yield lambda config=None: Registry(path, config)
        return
    import sqlalchemy as sa

    url = _postgres_url()
    schema = f"fp_test_{uuid.uuid4().hex[:12]}"
    opened = []

    def factory(config=None):
        reg = Registry(url, config, schema=schema)
        opened.append(reg)
        return reg

    yield factory
    for reg in opened:
        reg.close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def _issue(reg, i, seed, **kw):
    return reg.issue(f"recipient-{i}", f"instance-{i}", HASH, "test-mechanism", seed=seed, **kw)


def _pairwise_min(entries) -> int:
    codes = hex_to_codes(e.code for e in entries)
    d = hamming_distances(codes, codes)
    d.fill_diagonal_(10**6)
    return int(d.min())


# -- pure helpers -------------------------------------------------------------------------------


def test_hex_bits_int_roundtrip_and_bit_order():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        bits = random_code(generator=g)
        h = code_to_hex(bits)
        assert len(h) == 32 and h == h.lower()
        assert torch.equal(hex_to_code(h), bits)
        assert torch.equal(int_to_code(code_to_int(bits)), bits)
    first = hex_to_code("8" + "0" * 31)
    assert bool(first[0]) and int(first.sum()) == 1  # bit 0 = most significant bit of the first byte
    last = hex_to_code("0" * 31 + "1")
    assert bool(last[127]) and int(last.sum()) == 1
    assert code_to_int(last) == 1
    assert torch.equal(hex_to_code("AB" * 16), hex_to_code("ab" * 16))
    assert hex_to_codes([]).shape == (0, 128)


def test_helpers_reject_bad_input():
    with pytest.raises(InputError, match="32 hex"):
        hex_to_code("abc")
    with pytest.raises(InputError, match="32 hex"):
        hex_to_code("g" * 32)
    with pytest.raises(InputError, match=r"\(128,\)"):
        code_to_hex(torch.zeros(64, dtype=torch.bool))
    with pytest.raises(InputError, match="torch.bool"):
        code_to_hex(torch.zeros(128))
    with pytest.raises(InputError):
        int_to_code(2**128)


def test_hamming_distances_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (7, 128), generator=g).bool()
    b = torch.randint(0, 2, (5, 128), generator=g).bool()
    d = hamming_distances(a, b, chunk=3)
    ref = torch.tensor([[int((x != y).sum()) for y in b] for x in a])
    assert torch.equal(d, ref)
    assert int(hamming_distances(a[0], b[1])) == int(ref[0, 1])
    assert hamming_distances(a[0], b).shape == (5,)


def test_default_min_distance_is_cheap_for_random_codes():
    from scipy.stats import binom

    assert DEFAULT_MIN_DISTANCE == 32
    assert binom.cdf(DEFAULT_MIN_DISTANCE - 1, 128, 0.5) < 3e-9


def test_config_validation():
    with pytest.raises(ConfigError, match="min_distance"):
        RegistryConfig(min_distance=0)
    with pytest.raises(ConfigError, match="min_distance"):
        RegistryConfig(min_distance=129)
    with pytest.raises(ConfigError, match="max_draws"):
        RegistryConfig(max_draws=0)


def test_bad_locations(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Registry(tmp_path / "missing" / "r.db")
    with pytest.raises(InputError, match="folder"):
        Registry(tmp_path)
    with pytest.raises(InputError, match="schema"):
        Registry(tmp_path / "r.db", schema="x")
    with pytest.raises(InputError, match="cannot reach"):
        Registry("postgresql+psycopg://nobody@127.0.0.1:1/none")


# -- both backends --------------------------------------------------------------------------------


def test_issue_never_reuses_a_code(open_registry):
    reg = open_registry()
    # the same seed every time: each issue first redraws every code already issued
    entries = [_issue(reg, i, seed=0) for i in range(25)]
    codes = [e.code for e in entries]
    assert len(set(codes)) == 25
    assert _pairwise_min(entries) >= DEFAULT_MIN_DISTANCE
    first = torch.Generator().manual_seed(0)
    assert codes[0] == code_to_hex(random_code(generator=first))  # the draw is the generator's
    assert [e.instance for e in reg.all()] == [f"instance-{i}" for i in range(25)]
    assert len(reg) == 25


def test_issue_validates_and_refuses_duplicate_instance(open_registry):
    reg = open_registry()
    e = _issue(reg, 0, seed=1, note="first")
    assert e.note == "first" and e.model_hash == HASH and e.mechanism == "test-mechanism"
    assert e.issued_at.endswith("+00:00")
    with pytest.raises(InputError, match="already has a code"):
        _issue(reg, 0, seed=2)
    with pytest.raises(InputError, match="exactly one of generator"):
        reg.issue("r", "i", HASH, "m")
    with pytest.raises(InputError, match="sha256"):
        reg.issue("r", "i", "not-a-hash", "m", seed=0)
    with pytest.raises(InputError, match="recipient"):
        reg.issue("", "i", HASH, "m", seed=0)
    g = torch.Generator().manual_seed(5)
    e2 = reg.issue("r", "with-generator", HASH, "m", generator=g)
    assert e2.code == code_to_hex(random_code(generator=torch.Generator().manual_seed(5)))
    assert len(reg) == 2


def test_register_rejects_too_close_codes(open_registry):
    reg = open_registry()
    base = _issue(reg, 0, seed=7)
    bits = base.bits
    close = bits.clone()
    close[:31] = ~close[:31]  # distance 31 < 32
    with pytest.raises(InputError, match=r"distance 31 .*'instance-0'"):
        reg.register(close, "r", "close", HASH, "m")
    with pytest.raises(InputError, match="distance 0"):
        reg.register(base.code, "r", "same", HASH, "m")
    ok = bits.clone()
    ok[:32] = ~ok[:32]  # exactly min_distance: allowed
    e = reg.register(ok, "r", "far-enough", HASH, "m")
    assert e.code == code_to_hex(ok)
    assert int(hamming_distances(reg.get("far-enough").bits, bits)) == 32
    # a custom, larger minimum applies to that call
    farther = bits.clone()
    farther[64:104] = ~farther[64:104]  # 40 from base, 72 from ok
    with pytest.raises(InputError, match="distance 40"):
        reg.register(farther, "r", "needs-48", HASH, "m", min_distance=48)
    assert len(reg) == 2


def test_issue_gives_up_when_min_distance_cannot_be_met(open_registry):
    reg = open_registry(RegistryConfig(max_draws=50))
    _issue(reg, 0, seed=0)
    with pytest.raises(ConfigError, match="lower min_distance"):
        _issue(reg, 1, seed=1, min_distance=110)
    assert len(reg) == 1


def test_nearest_finds_the_issuing_entry(open_registry):
    reg = open_registry()
    entries = [_issue(reg, i, seed=100 + i) for i in range(20)]
    g = torch.Generator().manual_seed(9)
    target = entries[7]
    noisy = target.bits.clone()
    flip = torch.randperm(128, generator=g)[:15]
    noisy[flip] = ~noisy[flip]
    entry, d = reg.nearest(noisy)
    assert entry == target and d == 15
    many = reg.nearest_many(torch.stack([noisy, entries[3].bits]))
    assert [(e.instance, d) for e, d in many] == [("instance-7", 15), ("instance-3", 0)]


def test_nearest_on_empty_registry_and_unknown_instance(open_registry):
    reg = open_registry()
    with pytest.raises(InputError, match="no codes"):
        reg.nearest(torch.zeros(128, dtype=torch.bool))
    with pytest.raises(InputError, match="has no code"):
        reg.get("nobody")


def test_registry_persists_across_reopen(open_registry):
    reg = open_registry()
    issued = [_issue(reg, i, seed=i) for i in range(5)]
    reg.close()
    again = open_registry()
    assert again.all() == issued
    assert again.get("instance-3") == issued[3]
    new = _issue(again, 5, seed=0)  # seed 0 again: redrawn away from the stored code
    assert new.code not in {e.code for e in issued}
    assert len(open_registry()) == 6


def test_concurrent_issuers_do_not_collide(open_registry):
    open_registry()  # create the tables first, as a deployment would
    n_each, md = 15, 56  # P(d < 56) = 8 % per pair: draws often conflict
    errors, results = [], []
    barrier = threading.Barrier(2)

    def worker(tag):
        try:
            reg = open_registry(RegistryConfig(min_distance=md))
            barrier.wait()
            for i in range(n_each):
                # both workers use the same seeds: they draw identical codes at the same time
                results.append(reg.issue("r", f"{tag}-{i}", HASH, "m", seed=1000 + i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    entries = open_registry().all()
    assert len(entries) == 2 * n_each == len(results)
    assert len({e.code for e in entries}) == 2 * n_each
    assert _pairwise_min(entries) >= md
