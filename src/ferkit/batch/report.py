"""``ferkit batch --report``: what the results say, for people — into ``DIR/_report/``.

* ``labels.png``: faces per label (and inputs without a face, and failed ones);
* ``video-N.png``: per video, the share of each label among the faces of each time slice (the smoothed labels
  when the run tracked);
* ``report.md`` and ``report.html``: the counts, a table per video and the plots.

Written atomically; a rerun that adds inputs rewrites the report from all the rows in the folder.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

__all__ = ["write_report"]

#: Time slices per video plot.
SLICES = 60


def _colour(label: str) -> tuple[float, float, float]:
    from ferkit.infer.results import label_colour

    r, g, b = label_colour(label)
    return (r / 255, g / 255, b / 255)


def write_report(out: str | os.PathLike) -> Path:
    """Write the report of the results in ``out``; returns ``out/_report``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.figure import Figure

    from ferkit.batch.store import read_results
    from ferkit.fsutil import atomic_path, atomic_write_text
    from ferkit.infer.sources import is_video

    d = Path(out) / "_report"
    d.mkdir(exist_ok=True)
    df = read_results(out)
    faces = df[df.status == "face"]
    counts = faces.label.value_counts()
    inputs = df.file.nunique()
    no_face = int((df.status == "no_face").sum())
    failed = int((df.status == "error").sum())

    fig = Figure(figsize=(7, 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    names = list(counts.index) + ["no face", "failed"]
    values = [int(v) for v in counts.values] + [no_face, failed]
    ax.barh(names[::-1], values[::-1], color=[_colour(n) if n in counts.index else (0.6, 0.6, 0.6)
                                              for n in names][::-1])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:,}", va="center", fontsize=9)
    ax.set_xlabel("rows")
    ax.set_title(f"{len(faces):,} faces in {inputs:,} inputs", loc="left", fontsize=11)
    with atomic_path(d / "labels.png") as tmp:
        fig.savefig(tmp, format="png")

    video_rows = faces[faces.file.map(lambda f: is_video(Path(f))) & faces.time.notna()]
    sections = []
    for k, (file, v) in enumerate(sorted(video_rows.groupby("file"), key=lambda kv: kv[0]), 1):
        labels = v.smoothed_label.where(v.smoothed_label.notna(), v.label) if "smoothed_label" in v else v.label
        end = float(v.time.max()) or 1.0
        edges = np.linspace(0.0, end, SLICES + 1)
        slot = np.clip(np.searchsorted(edges, v.time.to_numpy(), side="right") - 1, 0, SLICES - 1)
        order = list(labels.value_counts().index)
        share = np.zeros((len(order), SLICES))
        for i, lab in enumerate(order):
            share[i] = np.bincount(slot[(labels == lab).to_numpy()], minlength=SLICES)
        total = share.sum(axis=0)
        share = np.divide(share, total, out=np.zeros_like(share), where=total > 0)
        fig = Figure(figsize=(9, 3), dpi=100, layout="constrained")
        ax = fig.subplots()
        mid = (edges[:-1] + edges[1:]) / 2
        ax.stackplot(mid, share, labels=order, colors=[_colour(lab) for lab in order], alpha=0.9)
        ax.set_xlim(0, end)
        ax.set_ylim(0, 1)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("share of faces")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(order), fontsize=8, frameon=False)
        ax.set_title(os.path.basename(file), loc="left", fontsize=10)
        png = f"video-{k}.png"
        with atomic_path(d / png) as tmp:
            fig.savefig(tmp, format="png")
        per = labels.value_counts()
        tracks = int(v.track.nunique()) if "track" in v and v.track.notna().any() else None
        sections.append({"file": file, "png": png, "frames": int(v.frame.nunique()), "faces": len(v),
                         "seconds": end, "tracks": tracks, "labels": {str(a): int(b) for a, b in per.items()}})

    md = [f"# ferkit batch report: {out}", "",
          f"{inputs:,} inputs, {len(faces):,} faces, {no_face:,} without a face, {failed:,} failed.", "",
          "| label | faces | share |", "| --- | ---: | ---: |"]
    md += [f"| {lab} | {int(n):,} | {n / max(len(faces), 1):.1%} |" for lab, n in counts.items()]
    md += ["", "![faces per label](labels.png)", ""]
    for s in sections:
        tr = f", {s['tracks']} tracks" if s["tracks"] is not None else ""
        md += [f"## {s['file']}", "", f"{s['frames']:,} frames with faces over {s['seconds']:.1f} s, "
               f"{s['faces']:,} faces{tr}: " + ", ".join(f"{a} {b:,}" for a, b in s["labels"].items()), "",
               f"![{os.path.basename(s['file'])}]({s['png']})", ""]
    atomic_write_text(d / "report.md", "\n".join(md) + "\n")

    e = html.escape
    rows = "".join(f"<tr><td>{e(str(lab))}</td><td>{int(n):,}</td><td>{n / max(len(faces), 1):.1%}</td></tr>"
                   for lab, n in counts.items())
    vids = "".join(f"<h2>{e(s['file'])}</h2><p>{s['frames']:,} frames with faces over {s['seconds']:.1f} s, "
                   f"{s['faces']:,} faces</p><img src=\"{s['png']}\" alt=\"{e(os.path.basename(s['file']))}\">"
                   for s in sections)
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>ferkit batch report</title><style>"
            f"body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 12px}}"
            f"img{{max-width:100%}}</style></head><body><h1>ferkit batch report: {e(str(out))}</h1>"
            f"<p>{inputs:,} inputs, {len(faces):,} faces, {no_face:,} without a face, {failed:,} failed.</p>"
            f"<table><tr><th>label</th><th>faces</th><th>share</th></tr>{rows}</table>"
            f"<img src=\"labels.png\" alt=\"faces per label\">{vids}</body></html>\n")
    atomic_write_text(d / "report.html", page)
    return d

