"""Paired comparison of two models on the same FER2013 faces: is B really more accurate than A?

    python benchmarks/paired.py A B [--data ../shared/data/fer2013] [--split validation] [--json out.json]
    python benchmarks/paired.py A B --labels ../shared/data/fer2013/ferplus    # against people: the FER+ majority

A and B are anything ``--model`` takes (bundled name, run directory, model file) with the same classes. Prints both
accuracies (plain argmax of the raw model, no TTA beyond what a model carries), the difference with its paired
standard error, the faces only one of them gets right and McNemar's exact p-value (scipy). On FER2013 validation
(n = 3,589) one model's accuracy has a standard error of about 0.8 points, but two models err on mostly the same
faces, so a paired difference is measured about twice as precisely.

With ``--labels`` (crowd votes, e.g. FER+) the truth is each face's FER+ majority label
(``data.labels.majority_labels``: single votes dropped, top label above half of the rest and one of the models'
classes) instead of its folder, on every face of the split's expression folders that has one; the folder-label
comparison is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _paired(a: str, b: str, split: str, ra: np.ndarray, rb: np.ndarray) -> dict:
    """The paired statistics of two right/wrong vectors over the same faces."""
    from scipy.stats import binomtest

    only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
    d = rb.astype(float) - ra.astype(float)
    return {
        "a": a, "b": b, "split": split, "n": int(len(ra)),
        "acc_a": float(ra.mean()), "acc_b": float(rb.mean()),
        "diff": float(d.mean()), "diff_se": float(d.std(ddof=1) / np.sqrt(len(d))),
        "only_a_right": only_a, "only_b_right": only_b,
        "mcnemar_p": float(binomtest(only_b, only_a + only_b).pvalue) if only_a + only_b else 1.0,
    }


def compare(a: str, b: str, data: str, split: str, labels: str = "") -> dict:
    """Paired comparison against the folder labels, or with ``labels`` against the FER+ majority label (the
    folder-label comparison on the same faces under ``"folder"``)."""
    if labels:
        from ferkit.data.labels import majority_labels
        from ferkit.evaluate import vote_logits

        za, votes, folder, ma = vote_logits(a, data=data, labels=labels, split=split)
        zb, _, _, mb = vote_logits(b, data=data, labels=labels, split=split)
        if tuple(ma.classes) != tuple(mb.classes):
            raise SystemExit(f"paired.py: {a} and {b} do not have the same classes ({ma.classes} vs {mb.classes})")
        y = majority_labels(votes, list(ma.classes))
        k, f = y >= 0, folder >= 0
        r = _paired(a, b, split, za.argmax(1)[k] == y[k], zb.argmax(1)[k] == y[k])
        r["truth"] = f"FER+ majority ({labels})"
        r["folder"] = _paired(a, b, split, za.argmax(1)[f] == folder[f], zb.argmax(1)[f] == folder[f])
        return r
    from ferkit.evaluate import model_logits

    za, y, ma = model_logits(a, data=data, split=split)
    zb, yb, mb = model_logits(b, data=data, split=split)
    if tuple(ma.classes) != tuple(mb.classes) or not np.array_equal(y, yb):
        raise SystemExit(f"paired.py: {a} and {b} do not have the same classes ({ma.classes} vs {mb.classes})")
    r = _paired(a, b, split, za.argmax(1) == y, zb.argmax(1) == y)
    r["truth"] = "folder labels"
    return r


def _say(r: dict, truth: str) -> None:
    print(f"{r['a']}: {r['acc_a'] * 100:.2f}%   {r['b']}: {r['acc_b'] * 100:.2f}%   (n = {r['n']}, {r['split']}, "
          f"{truth})")
    print(f"B - A: {r['diff'] * 100:+.2f} ± {r['diff_se'] * 100:.2f} points (paired s.e.); only A right on "
          f"{r['only_a_right']}, only B right on {r['only_b_right']}; McNemar exact p = {r['mcnemar_p']:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    ap.add_argument("--split", default="validation")
    ap.add_argument("--json", default="", help="also write the result here")
    ap.add_argument("--labels", default="", help="crowd votes (e.g. ../shared/data/fer2013/ferplus): compare against "
                    "the FER+ majority label, the folder labels beside")
    args = ap.parse_args()
    r = compare(args.a, args.b, args.data, args.split, args.labels)
    _say(r, r["truth"])
    if "folder" in r:
        _say(r["folder"], "folder labels")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
