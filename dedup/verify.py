"""Verification of hash candidates on small greyscale thumbnails.

Hash distance alone cannot tell a re-cropped copy of a photo from a different
photo with the same layout (a ship on a horizon, a car on white). A candidate
pair (eval image, corpus image) is therefore re-checked on their (S, S) grey
thumbnails (S = 32; the index stores the eval side, the run decodes only the
candidate corpus images), in two steps:

1. **Alignment (coarse)**: both thumbnails are resampled through a bank of crop
   windows (scales 1, 0.9, 0.8, 0.7 on a 3x3 grid of positions; mirrored too on
   the eval side) to 16x16, mean/std-normalised, and compared by normalised
   cross-correlation (NCC) for every allowed window pair: one side whole and the
   other cropped (a zoom and shift), or both cropped at the same scale (a pure
   shift). The best pair is the alignment; its NCC is the coarse score. NCC is
   invariant to brightness and contrast, so colour jitter, grey conversion and
   gamma barely move it.
2. **Detail (fine)**: at that alignment both windows are resampled to 32x32 and
   band-pass filtered (difference of Gaussians, sigma 0.7 and 2.5 px), and the
   NCC of the band-passed images, best over +-1 px shifts, is the verification
   score. Low frequencies (layout, sky, background) are what distinct images
   share; the mid-frequency detail is what only copies of the same shot share.

A pair is a near-duplicate when ``coarse >= coarse_gate`` and
``score >= threshold``. Thumbnails with almost no detail (flat or smooth
gradients: the residual of a quadratic surface fit below ``min_detail`` grey
levels) are never matched: their hashes collide with each other and NCC of
noise is meaningless. They are reported with the reason instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import gaussian_filter, rotate

from vitray.config import check

DEGENERATE = "degenerate: near-flat or smooth-gradient thumbnail (too little detail to verify)"


@dataclasses.dataclass
class VerifyConfig:
    """Candidate verification settings (thresholds are on NCC values in [-1, 1])."""

    thumb_size: int = 32
    """Side of the greyscale thumbnails compared (stored in the index for eval images)."""
    coarse_size: int = 16
    """Side the alignment bank resamples windows to."""
    fine_size: int = 32
    """Side the detail comparison resamples the aligned windows to."""
    scales: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7)
    """Crop-window scales of the alignment bank (1.0 = whole image)."""
    grid: int = 3
    """Window positions per axis for scales < 1."""
    alignments: int = 3
    """How many of the best coarse alignments the detail step tries (the best detail score counts)."""
    fine_shift: int = 1
    """The detail NCC is the best over shifts of up to this many pixels (at fine_size)."""
    rotations: tuple[float, ...] = (-5.0, 0.0, 5.0)
    """... and over these rotations (degrees) of the corpus window."""
    coarse_gate: float = 0.85
    """Pairs whose best aligned 16x16 NCC is below this are rejected without the detail step."""
    threshold: float = 0.80
    """Band-pass NCC at or above which an aligned pair is a near-duplicate."""
    min_detail: float = 4.0
    """Thumbnails whose quadratic-fit residual std (grey levels, 0..255) is below this are degenerate."""

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        self.rotations = tuple(float(a) for a in self.rotations)
        check(8 <= self.thumb_size <= 128, "thumb_size", "must be in 8..128")
        check(4 <= self.coarse_size <= self.thumb_size, "coarse_size", "must be in 4..thumb_size")
        check(8 <= self.fine_size <= 64, "fine_size", "must be in 8..64")
        check(1.0 in self.scales and all(0.3 <= s <= 1.0 for s in self.scales), "scales",
              "must include 1.0 and lie in [0.3, 1]")
        check(1 <= self.grid <= 7, "grid", "must be in 1..7")
        check(1 <= self.alignments <= 16, "alignments", "must be in 1..16")
        check(0 <= self.fine_shift <= 4, "fine_shift", "must be in 0..4")
        check(0.0 in self.rotations and all(abs(a) <= 30 for a in self.rotations), "rotations",
              "must include 0 and lie in [-30, 30] degrees")
        check(-1.0 <= self.coarse_gate <= 1.0, "coarse_gate", "must be in [-1, 1]")
        check(-1.0 <= self.threshold <= 1.0, "threshold", "must be in [-1, 1]")
        check(self.min_detail >= 0, "min_detail", "must be >= 0")


# ---------------------------------------------------------------- degenerate images

def detail(thumbs: np.ndarray) -> np.ndarray:
    """How much structure a thumbnail has beyond a smooth surface, in grey levels: (B, S, S) uint8 -> (B,).

    The smaller of (a) the residual std after fitting a quadratic surface (flat
    images, linear and quadratic gradients, vignettes: ~0) and (b) 1.6 x the std of
    the band-pass image the detail score compares (away from the borders): what
    verification has to go on. Real photos score well above 4 (CIFAR-10 test
    images: >= 6.7; the 462 shared photos: >= 5.3 except a 10x15-pixel TIFF).
    """
    b, s = thumbs.shape[0], thumbs.shape[1]
    if b == 0:
        return np.zeros(0, np.float32)
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1) - 0.5
    basis = np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], -1).reshape(-1, 6)  # (S*S, 6)
    g = thumbs.reshape(b, -1).astype(np.float32)  # (B, S*S)
    fit = (g @ np.linalg.pinv(basis).T.astype(np.float32)) @ basis.T.astype(np.float32)  # least squares
    residual = (g - fit).std(axis=1)
    k = s / 32.0
    x = thumbs.astype(np.float32)
    band = gaussian_filter(x, (0, 0.7 * k, 0.7 * k), mode="nearest") - gaussian_filter(x, (0, 2.5 * k, 2.5 * k),
                                                                                         mode="nearest")
    m = max(1, round(3 * k))
    return np.minimum(residual, 1.6 * band[:, m:s - m, m:s - m].std(axis=(1, 2)))


# ---------------------------------------------------------------- resampling bank

def _area_matrix(n_in: int, lo: float, hi: float, n_out: int) -> np.ndarray:
    """(n_out, n_in) box-filter resampling of the input interval [lo, hi) (pixels) to n_out pixels."""
    edges = np.linspace(lo, hi, n_out + 1)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        a, b = edges[i], edges[i + 1]
        for k in range(int(np.floor(a)), int(np.ceil(b))):
            m[i, min(max(k, 0), n_in - 1)] += max(0.0, min(b, k + 1) - max(a, k))
        m[i] /= m[i].sum()
    return m


@dataclasses.dataclass(frozen=True)
class Window:
    scale: float
    u: float
    v: float
    flip: bool

    @property
    def name(self) -> str:
        base = "whole" if self.scale == 1.0 else f"crop{self.scale:g}@{self.u:g},{self.v:g}"
        return base + ("+flip" if self.flip else "")


def windows(cfg: VerifyConfig, flip: bool) -> list[Window]:
    grid = [0.5] if cfg.grid == 1 else [round(x, 3) for x in np.linspace(0.0, 1.0, cfg.grid)]
    out = []
    for s in cfg.scales:
        for v in ([0.5] if s == 1.0 else grid):
            for u in ([0.5] if s == 1.0 else grid):
                out += [Window(s, u, v, f) for f in ((False, True) if flip else (False,))]
    return out


@dataclasses.dataclass
class Bank:
    """Resampling matrices of a window list: window t is ``rows[iy[t]] @ X @ cols[ix[t]].T``.

    Windows share row (same scale and v) and column (same scale, u, flip)
    matrices, so only the distinct ones are stored and applied.
    """

    rows: np.ndarray  # (Ry, M, S)
    cols: np.ndarray  # (Rx, M, S)
    iy: np.ndarray  # (T,) int
    ix: np.ndarray  # (T,) int


def make_bank(ws: list[Window], s: int, m: int) -> Bank:
    rows: dict[tuple, int] = {}
    cols: dict[tuple, int] = {}
    iy, ix, row_m, col_m = [], [], [], []
    for w in ws:
        side = s * w.scale
        y0, x0 = (s - side) * w.v, (s - side) * w.u
        rkey, ckey = (w.scale, w.v), (w.scale, w.u, w.flip)
        if rkey not in rows:
            rows[rkey] = len(row_m)
            row_m.append(_area_matrix(s, y0, y0 + side, m))
        if ckey not in cols:
            cols[ckey] = len(col_m)
            c = _area_matrix(s, x0, x0 + side, m)
            col_m.append(c[::-1] if w.flip else c)
        iy.append(rows[rkey])
        ix.append(cols[ckey])
    return Bank(np.stack(row_m).astype(np.float32), np.stack(col_m).astype(np.float32),
                np.array(iy), np.array(ix))


def resample(x: np.ndarray, bank: Bank) -> np.ndarray:
    """Every window of every image: x (B, S, S) -> (B, T, M, M) float32."""
    b, s, _ = x.shape
    r, m, _ = bank.rows.shape
    t = len(bank.iy)
    xt = x.astype(np.float32).transpose(1, 0, 2).reshape(s, b * s)  # (S, B*S)
    w = (bank.rows.reshape(r * m, s) @ xt).reshape(r, m, b, s)  # rows resampled: (R, M, B, S)
    out = np.empty((b, t, m, m), np.float32)
    for y in range(r):
        ts = np.flatnonzero(bank.iy == y)
        cols = bank.cols[bank.ix[ts]]  # (n, M, S)
        wy = w[y].transpose(1, 0, 2).reshape(b * m, s)  # (B*M, S)
        z = wy @ cols.transpose(2, 0, 1).reshape(s, len(ts) * m)  # (B*M, n*M)
        out[:, ts] = z.reshape(b, m, len(ts), m).transpose(0, 2, 1, 3)
    return out


def _normalise(v: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm along the last axis (so a dot product is an NCC)."""
    v = v - v.mean(axis=-1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


@dataclasses.dataclass
class PairScores:
    """Verification of P candidate pairs."""

    score: np.ndarray
    """(P,) float32 band-pass NCC at the best alignment; NaN when not computed (gate, degenerate)."""
    coarse: np.ndarray
    """(P,) float32 best aligned 16x16 NCC; NaN for degenerate pairs."""
    eval_window: list[str]
    corpus_window: list[str]
    degenerate: np.ndarray
    """(P,) bool: either thumbnail has too little detail; never a match."""
    match: np.ndarray
    """(P,) bool."""


class Verifier:
    """Scores (eval thumbnail, corpus thumbnail) pairs; holds the precomputed window banks."""

    def __init__(self, cfg: VerifyConfig):
        self.cfg = cfg
        s = cfg.thumb_size
        self.ewin, self.cwin = windows(cfg, flip=True), windows(cfg, flip=False)
        self.e_coarse = make_bank(self.ewin, s, cfg.coarse_size)
        self.c_coarse = make_bank(self.cwin, s, cfg.coarse_size)
        self.e_fine = make_bank(self.ewin, s, cfg.fine_size)
        self.c_fine = make_bank(self.cwin, s, cfg.fine_size)
        # Allowed (eval window, corpus window) pairs: a zoom+shift (one side whole) or a pure shift.
        es = np.array([w.scale for w in self.ewin])
        cs = np.array([w.scale for w in self.cwin])
        self.allowed = (es[:, None] == 1.0) | (cs[None, :] == 1.0) | (es[:, None] == cs[None, :])  # (TE, TC)
        k = cfg.fine_size / 32.0
        self.sigmas = (0.7 * k, 2.5 * k)

    def coarse_bank(self, thumbs: np.ndarray, side: str) -> np.ndarray:
        """(B, S, S) uint8 -> (B, T, coarse_size**2) normalised windows (side: "eval" | "corpus")."""
        y = resample(np.asarray(thumbs), self.e_coarse if side == "eval" else self.c_coarse)
        return _normalise(y.reshape(y.shape[0], y.shape[1], -1))

    def score_pairs(self, eval_thumbs: np.ndarray, corpus_thumbs: np.ndarray, eval_idx: np.ndarray,
                    corpus_idx: np.ndarray, chunk: int = 512) -> PairScores:
        """Verify pairs (eval_thumbs[eval_idx[p]], corpus_thumbs[corpus_idx[p]]).

        eval_thumbs: (E, S, S) uint8, corpus_thumbs: (C, S, S) uint8; each image's
        window bank is computed once however many pairs it is in.
        """
        cfg = self.cfg
        eval_idx, corpus_idx = np.asarray(eval_idx, np.int64), np.asarray(corpus_idx, np.int64)
        p = len(eval_idx)
        score = np.full(p, np.nan, np.float32)
        coarse = np.full(p, np.nan, np.float32)
        ew, cw = np.zeros(p, np.int64), np.zeros(p, np.int64)
        degenerate = np.zeros(p, bool)
        for idx, thumbs in ((eval_idx, eval_thumbs), (corpus_idx, corpus_thumbs)):
            used, inv = np.unique(idx, return_inverse=True)  # score each image once, and only those in pairs
            degenerate |= (detail(thumbs[used]) < cfg.min_detail)[inv] if p else degenerate
        live = np.flatnonzero(~degenerate)
        if len(live):
            ue, e_inv = np.unique(eval_idx[live], return_inverse=True)
            uc, c_inv = np.unique(corpus_idx[live], return_inverse=True)
            eb = self.coarse_bank(eval_thumbs[ue], "eval")  # (Ue, TE, D)
            cb = self.coarse_bank(corpus_thumbs[uc], "corpus")  # (Uc, TC, D)
            penalty = np.where(self.allowed, 0.0, -4.0).astype(np.float32)
            k = cfg.alignments
            top = np.zeros((p, k), np.int64)  # best window pairs, as flat (eval window, corpus window) ids
            for lo in range(0, len(live), chunk):
                sl = slice(lo, lo + chunk)
                ncc = np.matmul(eb[e_inv[sl]], cb[c_inv[sl]].transpose(0, 2, 1)) + penalty  # (P, TE, TC)
                flat = ncc.reshape(len(ncc), -1)
                best = np.argsort(-flat, axis=1, kind="stable")[:, :k] if k > 1 else flat.argmax(axis=1)[:, None]
                rows = live[sl]
                top[rows] = best
                coarse[rows] = flat[np.arange(len(flat)), best[:, 0]]
            ew, cw = np.divmod(top[:, 0], len(self.cwin))
            gated = live[coarse[live] >= cfg.coarse_gate]
            for lo in range(0, len(gated), chunk):
                rows = gated[lo:lo + chunk]
                e, c = eval_thumbs[eval_idx[rows]], corpus_thumbs[corpus_idx[rows]]
                for j in range(k):
                    ej, cj = np.divmod(top[rows, j], len(self.cwin))
                    sj = self._fine(e, c, ej, cj)
                    better = ~(sj <= score[rows])  # NaN (not yet scored) counts as worse
                    score[rows] = np.where(better, sj, score[rows])
                    ew[rows] = np.where(better, ej, ew[rows])
                    cw[rows] = np.where(better, cj, cw[rows])
        match = np.nan_to_num(score, nan=-2.0) >= cfg.threshold
        return PairScores(score=score, coarse=coarse,
                          eval_window=[self.ewin[i].name for i in ew], corpus_window=[self.cwin[i].name for i in cw],
                          degenerate=degenerate, match=match)

    def _fine(self, e: np.ndarray, c: np.ndarray, ew: np.ndarray, cw: np.ndarray) -> np.ndarray:
        """Band-pass NCC of the aligned windows, best over +-fine_shift px shifts: (P, S, S) x2 -> (P,)."""
        eb, cb = self.e_fine, self.c_fine
        ef = eb.rows[eb.iy[ew]] @ e.astype(np.float32) @ eb.cols[eb.ix[ew]].transpose(0, 2, 1)  # (P, M, M)
        cf = cb.rows[cb.iy[cw]] @ c.astype(np.float32) @ cb.cols[cb.ix[cw]].transpose(0, 2, 1)
        s1, s2 = self.sigmas
        ef = gaussian_filter(ef, (0, s1, s1), mode="nearest") - gaussian_filter(ef, (0, s2, s2), mode="nearest")
        cf = gaussian_filter(cf, (0, s1, s1), mode="nearest") - gaussian_filter(cf, (0, s2, s2), mode="nearest")
        m, r = ef.shape[1], self.cfg.fine_shift
        best = np.full(len(e), -1.0, np.float32)
        shifted = [_normalise(ef[:, r + dy:m - r + dy, r + dx:m - r + dx].reshape(len(ef), -1))
                   for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        for angle in self.cfg.rotations:
            c_rot = cf if angle == 0 else rotate(cf, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
            b = _normalise(c_rot[:, r:m - r, r:m - r].reshape(len(cf), -1))
            for a in shifted:
                best = np.maximum(best, (a * b).sum(axis=1))
        return best
