"""Exact Hamming range search over 64-bit hashes: multi-index hashing.

Finds *every* pair (query, target) with ``popcount(query ^ target) <= radius``,
the same set a brute-force scan (or ``faiss.IndexBinaryFlat.range_search``)
returns, while touching only a tiny fraction of the pairs.

How (Norouzi et al., "Fast Exact Search in Hamming Space with Multi-Index
Hashing", 2014, with the generalised pigeonhole bound of Qin et al., 2018):

- Split the 64 bits into ``m`` chunks (4 x 16 bits, or 3 x ~21 bits for large
  tables). If two codes are within ``radius``, then for chunk thresholds ``t_i``
  with ``sum(t_i + 1) > radius`` at least one chunk ``i`` differs in at most
  ``t_i`` bits.
- Per chunk, the targets are sorted by that chunk's value with CSR offsets over
  all its values (``starts``), so "all targets whose chunk equals v" is the
  contiguous slice ``starts[v]:starts[v+1]`` of a sorted copy of the codes.
- A query probes, per chunk, every value within ``t_i`` bits of its own chunk
  (1 + 16 + 120 values for 16 bits and t = 2), checks the full 64-bit distance of
  the targets found (XOR + popcount, vectorised), and keeps a pair only in the
  first chunk whose bound it meets, so each pair is reported exactly once.
- Fewer, wider chunks mean more probes per query but fewer candidates per probe.
  Measured on 1M x 100k realistic hashes at radius 10, 4 x 16 bits is about twice
  as fast as 3 x ~21 (whose 16 MB offset tables miss the cache on every probe),
  so 4 is the default.
- Perceptual-hash bits are far from uniform (pHash's DC bit is almost always 1;
  low-frequency bits are biased and correlated), which would crowd some buckets.
  A bit permutation, chosen once from the indexed codes, deals bits to chunks
  round-robin by bias so each chunk carries a similar amount of information.
  Hamming distance is invariant under it.

Memory for N targets: permuted codes (8N) + per chunk a sorted copy (8N), the
permutation back to target ids (4N) and the offsets (4 bytes per chunk value):
~56 MB for 1M hashes with 4 chunks, ~78 MB with 3.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

_MAX_PROBE_T = 4
"""Largest per-chunk threshold probed (2,517 values for 16 bits, 9,109 for 22)."""
MAX_RADIUS = 4 * (_MAX_PROBE_T + 1) - 1
"""Largest radius a 4-chunk table serves (19); a 3-chunk table serves up to 14."""


def chunk_widths(chunks: int) -> list[int]:
    """Bits per chunk, widest first: 4 -> [16, 16, 16, 16], 3 -> [22, 21, 21]."""
    base, rem = divmod(64, chunks)
    return [base + (1 if i < rem else 0) for i in range(chunks)]


@functools.lru_cache(maxsize=None)
def probe_masks(bits: int, t: int) -> np.ndarray:
    """Every ``bits``-bit XOR mask with popcount <= t (int32), fewest bits first."""
    masks = [sum(1 << i for i in combo) for k in range(t + 1) for combo in itertools.combinations(range(bits), k)]
    return np.array(masks, dtype=np.int32)


def chunk_thresholds(radius: int, chunks: int = 4) -> list[int]:
    """Per-chunk thresholds ``t_i`` with ``sum(t_i + 1) == radius + 1``, as even as possible
    (the widest chunks get the larger ones).

    A chunk with ``t_i = -1`` is not probed at all (small radii need fewer chunks).
    """
    total = radius - chunks + 1
    base, rem = divmod(total, chunks)
    return [base + (1 if i < rem else 0) for i in range(chunks)]


def balanced_permutation(codes: np.ndarray, chunks: int = 4) -> np.ndarray:
    """Bit order (64,) that deals bits to the chunks round-robin, least biased first.

    ``perm[k]`` is the source bit placed at position ``k`` of the permuted code.
    Deterministic: a function of the codes' per-bit frequencies only.
    """
    codes = np.asarray(codes, dtype=np.uint64)
    widths = chunk_widths(chunks)
    offsets = np.cumsum([0] + widths[:-1])
    if len(codes):
        sample = codes[:: max(1, len(codes) // 200_000)]  # bit frequencies need no more
        bits = (sample[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
        ranked = np.argsort(np.abs(bits.mean(axis=0) - 0.5), kind="stable")  # most informative bits first
    else:
        ranked = np.arange(64)
    slots = [offsets[c] + k for k in range(max(widths)) for c in range(chunks) if k < widths[c]]
    perm = np.empty(64, dtype=np.int64)
    perm[slots] = ranked
    return perm


def _byte_tables(perm: np.ndarray) -> np.ndarray:
    """(8, 256) uint64: table[j][v] = byte j of a code having value v, with its bits moved to their new places."""
    dest = np.empty(64, dtype=np.int64)
    dest[perm] = np.arange(64)  # source bit -> new position
    tables = np.zeros((8, 256), dtype=np.uint64)
    v = np.arange(256, dtype=np.uint64)
    for j in range(8):
        for b in range(8):
            bit = (v >> np.uint64(b)) & np.uint64(1)
            tables[j] |= bit << np.uint64(dest[8 * j + b])
    return tables


def _permute(codes: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Apply a bit permutation to (N,) uint64 codes with 8 byte-table lookups."""
    by = np.ascontiguousarray(codes, dtype="<u8").view(np.uint8).reshape(-1, 8)  # byte j = bits 8j..8j+7
    out = tables[0][by[:, 0]].copy()
    for j in range(1, 8):
        out |= tables[j][by[:, j]]
    return out


class HammingIndex:
    """Targets (N,) uint64, searchable for all codes within a Hamming radius of each query.

    chunks: 4 (16-bit chunks, radius <= 19) or 3 (~21-bit chunks, radius <= 14).
    """

    def __init__(self, codes: np.ndarray, chunks: int = 4):
        codes = np.ascontiguousarray(codes, dtype=np.uint64).reshape(-1)
        if len(codes) >= 2**31:
            raise ValueError("HammingIndex holds at most 2**31 - 1 codes (int32 ids)")
        self.size = len(codes)
        self.chunks = chunks
        if self.chunks not in (3, 4):
            raise ValueError(f"chunks must be 3 or 4, got {self.chunks}")
        self.widths = chunk_widths(self.chunks)
        self.offsets = [int(x) for x in np.cumsum([0] + self.widths[:-1])]
        self.perm = balanced_permutation(codes, self.chunks)
        self._tables = _byte_tables(self.perm)
        self.codes = _permute(codes, self._tables)  # (N,) permuted
        self.order, self.sorted_codes, self.starts = [], [], []
        for off, bits in zip(self.offsets, self.widths):
            key = self._key(self.codes, off, bits)
            order = np.argsort(key, kind="stable").astype(np.int32)
            starts = np.zeros((1 << bits) + 1, np.int32)
            np.cumsum(np.bincount(key, minlength=1 << bits), out=starts[1:])  # bucket v = starts[v]:starts[v+1]
            self.order.append(order)
            self.sorted_codes.append(self.codes[order])
            self.starts.append(starts)

    @staticmethod
    def _key(codes: np.ndarray, off: int, bits: int) -> np.ndarray:
        return ((codes >> np.uint64(off)) & np.uint64((1 << bits) - 1)).astype(np.int32)

    @property
    def max_radius(self) -> int:
        return self.chunks * (_MAX_PROBE_T + 1) - 1

    @property
    def nbytes(self) -> int:
        """Memory held by the index, in bytes."""
        arrays = [self.codes, self._tables, *self.order, *self.sorted_codes, *self.starts]
        return int(sum(a.nbytes for a in arrays))

    def search(self, queries: np.ndarray, radius: int, block_candidates: int = 1 << 17
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs within ``radius``.

        queries: (Q,) uint64. Returns ``(query_idx (P,) int64, target_idx (P,) int64,
        distance (P,) uint8)``, each pair exactly once, sorted by (query, target).
        block_candidates: about how many candidates one vectorised step checks
            (bounds temporary memory; ~8 bytes x 5 arrays each).
        """
        if not 0 <= radius <= self.max_radius:
            raise ValueError(f"radius must be in 0..{self.max_radius} for a {self.chunks}-chunk index, got {radius}")
        q = _permute(np.ascontiguousarray(queries, dtype=np.uint64).reshape(-1), self._tables)
        ts = chunk_thresholds(radius, self.chunks)
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if self.size and len(q):
            for i, t in enumerate(ts):
                if t >= 0:
                    self._search_chunk(q, i, ts, radius, block_candidates, found)
        if not found:
            e = np.zeros(0, np.int64)
            return e, e.copy(), np.zeros(0, np.uint8)
        qi, ti, d = (np.concatenate(parts) for parts in zip(*found))
        order = np.lexsort((ti, qi))
        return qi[order], ti[order], d[order]

    def _search_chunk(self, q, i, ts, radius, budget, found):
        """Pairs whose chunk ``i`` differs in <= ts[i] bits (and no earlier chunk qualifies).

        Queries are visited sorted by their chunk value and one group of probe masks
        at a time, so the buckets a step reads lie in (XOR-permuted) ascending order:
        the target codes stream through the cache instead of being fetched at random.
        """
        off, bits = self.offsets[i], self.widths[i]
        key = self._key(q, off, bits)
        qord = np.argsort(key, kind="stable")
        key, qcode = key[qord], q[qord]
        masks = probe_masks(bits, ts[i])
        starts, codes, order = self.starts[i], self.sorted_codes[i], self.order[i]
        mean_bucket = max(self.size / (1 << bits), 1e-3)
        block = int(min(len(q), max(1024, budget / mean_bucket)))  # queries per step
        group = int(max(1, min(len(masks), budget / (mean_bucket * block))))  # masks per step
        dense = mean_bucket >= 1  # most probed buckets are non-empty: compacting them costs more than it saves
        ramp = np.arange(2 * budget + 4096, dtype=np.int32)  # reused slot offsets within a step
        for lo in range(0, len(q), block):
            k, qc = key[lo:lo + block], qcode[lo:lo + block]
            for g in range(0, len(masks), group):
                km = (k[None, :] ^ masks[g:g + group, None]).reshape(-1)  # (G*B,) buckets to read
                first = starts[km]
                cnt = starts[km + 1] - first
                if dense:
                    cell, c, qcell = None, cnt, np.tile(qc, len(km) // len(k))
                else:
                    cell = np.flatnonzero(cnt)
                    if len(cell) == 0:
                        continue
                    c, first, qcell = cnt[cell], first[cell], qc[cell % len(k)]
                ends = np.cumsum(c, dtype=np.int64)
                total = int(ends[-1]) if len(ends) else 0
                if total == 0:
                    continue
                if total > len(ramp):
                    ramp = np.arange(total, dtype=np.int32)
                # slot of each candidate: its bucket's first slot + its rank within the bucket
                pos = np.repeat(first - (ends - c).astype(np.int32), c)
                pos += ramp[:total]
                x = np.repeat(qcell, c)
                x ^= codes[pos]
                keep = np.flatnonzero(np.bitwise_count(x) <= radius)  # few survivors from here on
                if len(keep) == 0:
                    continue
                x, pos = x[keep], pos[keep]
                owner = np.searchsorted(ends, keep, side="right")  # the (mask, query) cell of each survivor
                row = (owner if cell is None else cell[owner]) % len(k)
                # Report a pair only from the first chunk whose threshold it meets.
                fresh = np.ones(len(keep), dtype=bool)
                for j in range(i):
                    if ts[j] >= 0:
                        dj = np.bitwise_count((x >> np.uint64(self.offsets[j])) & np.uint64((1 << self.widths[j]) - 1))
                        fresh &= dj > ts[j]
                found.append((qord[lo + row[fresh]].astype(np.int64), order[pos[fresh]].astype(np.int64),
                              np.bitwise_count(x[fresh]).astype(np.uint8)))


def brute_force(queries: np.ndarray, targets: np.ndarray, radius: int, block: int = 2048
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: the same pairs by a full XOR + popcount scan (for tests; O(Q*N))."""
    queries = np.asarray(queries, np.uint64)
    targets = np.asarray(targets, np.uint64)
    qs, ts, ds = [], [], []
    for lo in range(0, len(queries), block):
        d = np.bitwise_count(queries[lo:lo + block, None] ^ targets[None, :])  # (B, N)
        qi, ti = np.nonzero(d <= radius)
        qs.append(qi + lo)
        ts.append(ti)
        ds.append(d[qi, ti].astype(np.uint8))
    if not qs:
        e = np.zeros(0, np.int64)
        return e, e.copy(), np.zeros(0, np.uint8)
    return (np.concatenate(qs).astype(np.int64), np.concatenate(ts).astype(np.int64), np.concatenate(ds))
