"""The end of `vitray dedup run`: per-shard results -> exclusion list, audit tables, summary, report.

Everything here is a pure function of the per-shard results (``scan``), the
index and the corpus manifest, so re-running it gives byte-identical files
(``summary.json`` aside, which records the run time).
"""

from __future__ import annotations

import datetime
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vitray import storage
from vitray.config import to_dict
from vitray.dedup import report, scan
from vitray.dedup.index import EvalIndex, load_previews
from vitray.pipeline import schema


EXCLUDE_FILE = "exclude.txt"
REMOVED_FILE = "removed.parquet"
EXACT_FILE = "exact_duplicates.parquet"
FAILURES_FILE = "failures.parquet"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
_COUNTS = ("rows", "kept", "removed", "failed", "candidate_rows", "candidate_pairs", "verified_pairs",
           "degenerate_pairs", "matched_pairs", "truncated_pairs")


class IncompleteRun(RuntimeError):
    """Some shard has no result for this run (the scan was interrupted): re-run to finish."""


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _read(fs, path: str, **kw) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.read_table(f, **kw)


def _hash_kind(p: np.ndarray, d: np.ndarray) -> list[str]:
    """The hash that is closer (pHash on ties): the one ``distance`` reports."""
    return ["phash" if a <= b else "dhash" for a, b in zip(p, d)]


def _with_eval(tbl: pa.Table, index: EvalIndex) -> pa.Table:
    """Add eval-set columns to pairs (looked up by eval_row) and the triggering hash kind."""
    er = tbl.column("eval_row").to_numpy().astype(np.int64)
    p, d = tbl.column("phash_distance").to_numpy(), tbl.column("dhash_distance").to_numpy()
    return tbl.append_column("eval_set", pa.array([index.sets[c] for c in index.set_code[er]], pa.string())) \
        .append_column("eval_id", pa.array(index.eval_id[er].tolist(), pa.string())) \
        .append_column("eval_source", pa.array(index.source[er].tolist(), pa.string())) \
        .append_column("eval_label", pa.array(index.label[er], pa.int64())) \
        .append_column("hash_kind", pa.array(_hash_kind(p, d), pa.string())) \
        .append_column("distance", pa.array(np.minimum(p, d), pa.uint8()))


def _exact_duplicates(fs, parts: list[dict]) -> pa.Table:
    """Corpus rows whose bytes repeat (same SHA-256); the first in corpus order is kept.

    The driver holds 8 bytes per corpus row (the SHA-256 prefix) to find repeats,
    then re-reads full hashes for the repeats only.
    """
    sha64 = [_read(fs, p["rows"], columns=["sha64"]).column("sha64").to_numpy() for p in parts]
    allv = np.concatenate(sha64) if sha64 else np.zeros(0, np.uint64)
    values, counts = np.unique(allv, return_counts=True)
    dup = values[counts > 1]
    empty = pa.table({"sha256": pa.array([], pa.string()), "sample_id": pa.array([], pa.string()),
                      "source": pa.array([], pa.string()), "group_size": pa.array([], pa.int64()),
                      "keep": pa.array([], pa.bool_())})
    if len(dup) == 0:
        return empty
    pieces = []
    for order, (p, s) in enumerate(zip(parts, sha64)):
        pos = np.flatnonzero(np.isin(s, dup))
        if len(pos):
            t = _read(fs, p["rows"], columns=["sample_id", "source", "sha256"]).take(pa.array(pos))
            pieces.append(t.append_column("_order", pa.array(np.full(len(pos), order) * (1 << 32) + pos)))
    t = pa.concat_tables(pieces).sort_by([("sha256", "ascending"), ("_order", "ascending")])
    sha = np.asarray(t.column("sha256").to_pylist(), dtype=object)
    first = np.r_[True, sha[1:] != sha[:-1]]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.r_[starts, len(sha)])
    group_size = np.repeat(sizes, sizes)
    t = t.drop_columns(["_order"]).append_column("group_size", pa.array(group_size, pa.int64())) \
        .append_column("keep", pa.array(first))
    return t.filter(pa.array(group_size > 1))


def _select_report_pairs(fs, parts: list[dict], cfg) -> dict[str, pa.Table]:
    """Strongest matches and the pairs just above / below the threshold, with their previews."""
    cols = ["sample_id", "source", "eval_row", "phash_distance", "dhash_distance", "joint_distance", "coarse", "score",
            "match",
            "eval_window", "corpus_window"]
    thr, band, k = cfg.verify.threshold, cfg.borderline, cfg.report_pairs
    pieces = []
    for i, p in enumerate(parts):
        t = _read(fs, p["pairs"], columns=cols)
        near = pc.or_(t.column("match"), pc.less_equal(pc.abs(pc.subtract(pc.fill_null(t.column("score"), -9.0),
                                                                          thr)), band))
        t = t.filter(near)
        pieces.append(t.append_column("_part", pa.array(np.full(t.num_rows, i, np.int32)))
                      .append_column("_pos", pa.array(np.flatnonzero(np.asarray(near)), pa.int64())))
    if not pieces:
        return {}
    t = pa.concat_tables(pieces)
    score = np.nan_to_num(t.column("score").to_numpy(zero_copy_only=False), nan=-9.0)
    match = np.asarray(t.column("match"))
    sid = np.asarray(t.column("sample_id").to_pylist(), dtype=object)
    er = t.column("eval_row").to_numpy()
    def pick(mask, key):  # ties broken by ids so the report is deterministic
        idx = np.flatnonzero(mask)
        return idx[np.lexsort((er[idx], sid[idx], key[idx]))][:k]
    sections = {"strongest": pick(match, -score), "above": pick(match & (score < thr + band), score),
                "below": pick(~match & (score >= thr - band), -score)}
    chosen = np.unique(np.concatenate(list(sections.values())))
    part_of, pos_of = t.column("_part").to_numpy(), t.column("_pos").to_numpy()
    preview = {}
    for part in np.unique(part_of[chosen]):  # one read of the preview column per part involved
        col = _read(fs, parts[part]["pairs"], columns=["preview"]).column("preview")
        for i in chosen[part_of[chosen] == part]:
            preview[int(i)] = col[int(pos_of[i])].as_py()
    return {name: t.take(pa.array(idx, pa.int64())).append_column(
        "preview", pa.array([preview[int(i)] for i in idx], pa.binary())) for name, idx in sections.items()}


def finish(cfg, index: EvalIndex, manifest: dict, fingerprint: str, seconds: float) -> dict:
    """Write every run output from the per-shard results; returns the summary dict."""
    ofs, oroot = storage.resolve(cfg.out, cfg.storage)
    shards = manifest.get("shards", [])
    parts, dones = [], []
    for s in shards:
        paths = scan.part_paths(oroot, s["name"])
        done = scan.read_done(ofs, paths["done"])
        if not done or done.get("fingerprint") != fingerprint:
            raise IncompleteRun(f"shard {s['name']} has no result for this run; re-run to finish")
        if done["kept"] + done["removed"] + done["failed"] != done["rows"]:
            raise RuntimeError(f"{s['name']}: {done['rows']} rows != kept + removed + failed ({done})")
        parts.append(paths)
        dones.append(done)
    totals = {k: int(sum(d[k] for d in dones)) for k in _COUNTS}
    expected = int(sum(int(s.get("rows", 0)) for s in shards))
    if totals["rows"] != expected:
        raise RuntimeError(f"corpus manifest lists {expected} rows but the shards held {totals['rows']}")

    # removed pairs (only matches are read)
    matched = [_read(ofs, p["pairs"], columns=[c for c in scan.PAIRS_SCHEMA.names if c != "preview"],
                     filters=[("match", "=", True)]) for p in parts]
    pairs = pa.concat_tables(matched) if matched else scan.PAIRS_SCHEMA.empty_table().drop_columns(["preview"])
    removed = _with_eval(pairs, index).sort_by([("sample_id", "ascending"), ("eval_set", "ascending"),
                                                ("eval_id", "ascending")])
    removed = removed.select(["sample_id", "source", "eval_set", "eval_id", "eval_source", "eval_label", "hash_kind",
                              "distance", "phash_distance", "dhash_distance", "joint_distance", "score", "coarse", "view",
                              "eval_window", "corpus_window"])
    exact = _exact_duplicates(ofs, parts)
    exclude = set(removed.column("sample_id").to_pylist())
    if cfg.exclude_exact_duplicates:
        exclude |= set(exact.filter(pc.invert(exact.column("keep"))).column("sample_id").to_pylist())

    fail_tbls = [_read(ofs, p["rows"], columns=["sample_id", "source", "reason"], filters=[("status", "=", "failed")])
                 for p in parts]
    failures = pa.concat_tables(fail_tbls) if fail_tbls else pa.table({"sample_id": [], "source": [], "reason": []})
    bad_shards = [(d["shard"], d["error"]) for d in dones if d.get("error")]
    if bad_shards:
        failures = pa.concat_tables([failures, pa.table({
            "sample_id": pa.array([None] * len(bad_shards), pa.string()),
            "source": pa.array([f"{cfg.corpus}/{n}" for n, _ in bad_shards], pa.string()),
            "reason": pa.array([e for _, e in bad_shards], pa.string())})])

    summary = _summary(cfg, index, manifest, totals, removed, exact, len(exclude), fingerprint, seconds)
    outs = {EXCLUDE_FILE: "".join(f"{s}\n" for s in sorted(exclude)).encode(),
            REMOVED_FILE: _parquet(removed), EXACT_FILE: _parquet(exact), FAILURES_FILE: _parquet(failures)}
    sections = _select_report_pairs(ofs, parts, cfg)
    eval_rows = np.concatenate([t.column("eval_row").to_numpy() for t in sections.values()]) if sections else []
    previews = load_previews(cfg.index, cfg.storage, np.asarray(eval_rows, np.int64))
    sections = {k: _with_eval(v, index) for k, v in sections.items()}
    outs[REPORT_FILE] = report.render(summary, sections, previews, manifest.get("classes"),
                                      index.manifest).encode("utf-8")
    for name, data in outs.items():
        storage.write_bytes_atomic(ofs, f"{oroot}/{name}", data)
    if cfg.write_clean:
        _clean_manifest(cfg, ofs, oroot, manifest, dones, totals)
    storage.write_bytes_atomic(ofs, f"{oroot}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    return summary


def _summary(cfg, index: EvalIndex, manifest: dict, totals: dict, removed: pa.Table, exact: pa.Table,
             excluded: int, fingerprint: str, seconds: float) -> dict:
    sets = {}
    rem_set = np.asarray(removed.column("eval_set").to_pylist(), dtype=object)
    rem_eval = np.asarray(removed.column("eval_id").to_pylist(), dtype=object)
    rem_sid = np.asarray(removed.column("sample_id").to_pylist(), dtype=object)
    for code, name in enumerate(index.sets):
        mine = index.set_code == code
        degenerate = int((index.detail[mine] < cfg.verify.min_detail).sum())
        hit = rem_set == name
        contaminated = len(set(rem_eval[hit]))
        n = int(mine.sum())
        sets[name] = {
            "eval_images": n, "degenerate_skipped": degenerate,
            "index_failures": int(index.manifest["sets"].get(name, {}).get("failed", 0)),
            "contaminated": contaminated, "contamination_rate": contaminated / n if n else 0.0,
            "corpus_rows_matched": len(set(rem_sid[hit])), "pairs": int(hit.sum()),
        }
    groups = int(np.sum(np.asarray(exact.column("keep")))) if exact.num_rows else 0
    rows = totals["rows"]
    return {
        "kind": "vitray-dedup-summary", "corpus": cfg.corpus, "index": cfg.index, "index_digest": index.digest,
        "fingerprint": fingerprint, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "counts": {**totals, "excluded": excluded, "removed_fraction": totals["removed"] / rows if rows else 0.0,
                   "exact_duplicate_groups": groups, "exact_duplicate_rows": int(exact.num_rows) - groups},
        "sets": sets,
        "settings": {"phash_radius": cfg.phash_radius, "dhash_radius": cfg.dhash_radius,
                     "joint_radius": cfg.joint_radius, "strong_radius": cfg.strong_radius,
                     "threshold": cfg.verify.threshold, "coarse_gate": cfg.verify.coarse_gate,
                     "min_detail": cfg.verify.min_detail, "views": len(index.view_names)},
        "seconds": round(seconds, 2), "config": to_dict(cfg),
    }


def summary_table(summary: dict) -> str:
    """The per-eval-set contamination table printed at the end of a run."""
    head = f"{'eval set':<24} {'images':>8} {'degenerate':>10} {'contaminated':>12} {'rate':>8} {'corpus rows':>11}"
    lines = [head, "-" * len(head)]
    for name, s in summary["sets"].items():
        lines.append(f"{name[:24]:<24} {s['eval_images']:>8} {s['degenerate_skipped']:>10} {s['contaminated']:>12} "
                     f"{100 * s['contamination_rate']:>7.2f}% {s['corpus_rows_matched']:>11}")
    c = summary["counts"]
    lines.append(f"corpus: {c['rows']} rows = {c['kept']} kept + {c['removed']} removed + {c['failed']} failed "
                 f"({100 * c['removed_fraction']:.3f}% removed); {c['candidate_rows']} candidate rows, "
                 f"{c['verified_pairs']} pairs verified")
    lines.append(f"exact duplicates within the corpus (SHA-256): {c['exact_duplicate_groups']} groups, "
                 f"{c['exact_duplicate_rows']} redundant rows; exclude list: {c['excluded']} sample ids")
    return "\n".join(lines)


def _clean_manifest(cfg, fs, root: str, manifest: dict, dones: list[dict], totals: dict) -> None:
    cleaned = [d["clean"] for d in dones if d.get("clean") and d["clean"]["rows"]]
    storage.write_bytes_atomic(fs, f"{root}/{scan.CLEAN_DIR}/{schema.FAILURES_NAME}",
                               _parquet(schema.FAILURE_SCHEMA.empty_table()))
    clean = {"kind": "vitray-shards", "schema_version": schema.SCHEMA_VERSION,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "source": cfg.corpus, "config": {"dedup": to_dict(cfg), "corpus_config": manifest.get("config")},
             "counts": {"read": totals["rows"], "written": totals["rows"] - totals["removed"], "failed": 0,
                        "removed": totals["removed"]},
             "classes": manifest.get("classes"), "shards": cleaned, "failures": schema.FAILURES_NAME}
    storage.write_bytes_atomic(fs, f"{root}/{scan.CLEAN_DIR}/{schema.MANIFEST_NAME}", schema.dumps_manifest(clean))
