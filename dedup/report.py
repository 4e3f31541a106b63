"""report.html: side-by-side thumbnails of matched pairs and of pairs near the threshold.

A person judges the threshold by eye from three sections: the strongest
matches, the matches just above the threshold and the rejected pairs just
below it. Every string that comes from the data (file names, sample ids, set
names, labels, sources) is HTML-escaped, images are embedded as ``data:``
URIs of PNGs we encoded ourselves, and the page carries a Content-Security-Policy
that forbids scripts, so a hostile corpus cannot inject anything that runs.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import string

import numpy as np
import pyarrow as pa

SECTIONS = (
    ("strongest", "Strongest matches"),
    ("above", "Matches just above the threshold (removed)"),
    ("below", "Rejected pairs just below the threshold (kept)"),
)


def esc(value) -> str:
    """Escape any value for HTML text and attribute context."""
    return html.escape("" if value is None else str(value), quote=True)


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return f'<div class="noimg">{esc(alt)}: no preview</div>'
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _label_name(index_manifest: dict, eval_set: str, label) -> str:
    classes = (index_manifest.get("sets", {}).get(eval_set) or {}).get("classes") or []
    if label is None or label < 0:
        return ""
    return classes[label] if label < len(classes) else str(label)


def _card(row: dict, eval_preview: bytes | None, threshold: float, index_manifest: dict) -> str:
    kind = "match" if row["match"] else "reject"
    score = row["score"]
    score_txt = "n/a" if score is None or np.isnan(score) else f"{score:.3f}"
    coarse = row["coarse"]
    coarse_txt = "n/a" if coarse is None or np.isnan(coarse) else f"{coarse:.3f}"
    label = _label_name(index_manifest, row["eval_set"], row["eval_label"])
    dist = f"pHash {row['phash_distance']}, dHash {row['dhash_distance']}, same view {row['joint_distance']}"
    return (
        f'<div class="card {kind}"><div class="pair">'
        f'<figure>{_img(eval_preview, "eval")}<figcaption>eval <b>{esc(row["eval_set"])}</b> '
        f'{esc(row["eval_id"])}{" (" + esc(label) + ")" if label else ""}</figcaption></figure>'
        f'<figure>{_img(row["preview"], "corpus")}<figcaption>corpus {esc(row["source"])}</figcaption></figure>'
        f'</div><div class="meta"><span class="score">score {esc(score_txt)}</span> '
        f'({"&ge;" if row["match"] else "&lt;"} {threshold:.2f}), coarse {esc(coarse_txt)}; '
        f'{esc(dist)}<br>windows: eval {esc(row["eval_window"])}, '
        f'corpus {esc(row["corpus_window"])}<br>sample_id {esc(row["sample_id"])}</div></div>'
    )


def render(summary: dict, sections: dict[str, pa.Table], eval_previews: dict[int, bytes],
           corpus_classes: list | None, index_manifest: dict) -> str:
    """The whole report page as a string."""
    s = summary["settings"]
    rows = "\n".join(
        f"<tr><td>{esc(name)}</td><td>{v['eval_images']}</td><td>{v['degenerate_skipped']}</td>"
        f"<td>{v['contaminated']}</td><td>{100 * v['contamination_rate']:.2f}%</td><td>{v['corpus_rows_matched']}</td></tr>"
        for name, v in summary["sets"].items())
    c = summary["counts"]
    counts = (f"Corpus: {c['rows']} rows = {c['kept']} kept + {c['removed']} removed + {c['failed']} failed; "
              f"{c['candidate_rows']} rows had hash candidates, {c['verified_pairs']} pairs verified, "
              f"{c['degenerate_pairs']} skipped as degenerate. Exact duplicates within the corpus: "
              f"{c['exact_duplicate_groups']} groups ({c['exact_duplicate_rows']} redundant rows).")
    parts = []
    for key, title in SECTIONS:
        table = sections.get(key)
        if table is None or table.num_rows == 0:
            parts.append(f"<h2>{esc(title)}</h2><p>none</p>")
            continue
        cards = [_card(r, eval_previews.get(int(r["eval_row"])), s["threshold"], index_manifest)
                 for r in table.to_pylist()]
        parts.append(f'<h2>{esc(title)} ({len(cards)})</h2><div class="cards">{"".join(cards)}</div>')
    template = importlib.resources.files("vitray.dedup").joinpath("report_template.html").read_text("utf-8")
    return string.Template(template).substitute(
        corpus=esc(summary["corpus"]), index=esc(summary["index"]), digest=esc(summary["index_digest"][:19]),
        threshold=esc(s["threshold"]), phash_radius=esc(s["phash_radius"]), dhash_radius=esc(s["dhash_radius"]),
        joint_radius=esc(s["joint_radius"]), strong_radius=esc(s["strong_radius"]),
        views=esc(s["views"]), summary_rows=rows, counts=esc(counts),
        sections="\n".join(parts))
