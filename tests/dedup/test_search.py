"""Exactness of the multi-index Hamming search against a brute-force XOR + popcount scan."""

import numpy as np
import pytest

from vitray.dedup.search import MAX_RADIUS, HammingIndex, brute_force, chunk_thresholds


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8), axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


def realistic(n: int, rng: np.random.Generator) -> np.ndarray:
    """Biased, correlated bits like perceptual hashes: cluster centres + a few flipped bits, one near-constant bit."""
    p = rng.uniform(0.25, 0.75, 64)
    p[0] = 0.995  # pHash's DC bit
    centres = rng.random((max(1, n // 8), 64)) < p
    bits = centres[rng.integers(0, len(centres), n)] ^ (rng.random((n, 64)) < 0.06)
    return _pack(bits)


def _sorted(pairs):
    q, t, d = pairs
    o = np.lexsort((t, q))
    return q[o], t[o], d[o]


@pytest.mark.parametrize("chunks,radius", [(4, 0), (4, 1), (4, 3), (4, 6), (4, 10), (4, 13), (4, 19),
                                           (3, 0), (3, 2), (3, 10), (3, 12), (3, 14)])
def test_search_equals_brute_force(chunks, radius):
    rng = np.random.default_rng(radius)
    targets = realistic(3000, rng)
    queries = np.concatenate([realistic(1500, rng), targets[:200] ^ np.uint64(0b1011)])  # planted near pairs
    index = HammingIndex(targets, chunks=chunks)
    assert index.chunks == chunks
    got = index.search(queries, radius)
    want = _sorted(brute_force(queries, targets, radius))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert len(got[0]) > 0 if radius >= 3 else True
    assert got[2].max(initial=0) <= radius


def test_search_small_and_large_tables_and_duplicates():
    rng = np.random.default_rng(7)
    small = realistic(40, rng)
    small = np.concatenate([small, small[:5]])  # repeated targets are all reported
    big = realistic(20000, rng)
    for targets, queries in ((small, big), (big, small)):
        got = HammingIndex(targets).search(queries, 10)
        want = _sorted(brute_force(queries, targets, 10))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_uniform_random_and_empty_inputs():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False)
    queries = np.concatenate([rng.integers(0, 2**64, 2000, dtype=np.uint64), targets[::50] ^ np.uint64(1 << 63)])
    got = HammingIndex(targets).search(queries, 12)
    want = _sorted(brute_force(queries, targets, 12))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    empty = np.zeros(0, np.uint64)
    assert len(HammingIndex(targets).search(empty, 10)[0]) == 0
    assert len(HammingIndex(empty).search(queries, 10)[0]) == 0


def test_chunk_thresholds_pigeonhole():
    for chunks in (3, 4):
        for r in range(MAX_RADIUS + 1):
            ts = chunk_thresholds(r, chunks)
            assert sum(t + 1 for t in ts) == r + 1  # some chunk must then differ in <= t bits
            assert max(ts) - min(ts) <= 1
    with pytest.raises(ValueError):
        HammingIndex(np.zeros(3, np.uint64), chunks=4).search(np.zeros(1, np.uint64), MAX_RADIUS + 1)
    with pytest.raises(ValueError):
        HammingIndex(np.zeros(3, np.uint64), chunks=3).search(np.zeros(1, np.uint64), 15)



def test_dense_table_path():
    """>= 1 target per 16-bit bucket on average takes the no-compaction path; still exact."""
    rng = np.random.default_rng(11)
    targets = realistic(100_000, rng)
    queries = np.concatenate([realistic(300, rng), targets[::500] ^ np.uint64(0b111)])
    index = HammingIndex(targets)
    assert index.size / 2**16 >= 1
    got = index.search(queries, 10)
    want = _sorted(brute_force(queries, targets, 10))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
