"""Which test-time views pay for their cost? Accuracy of ensembles × views against network forwards per face.

    python benchmarks/tta_views.py M1 M2 ... [--data ../shared/data/fer2013] [--split validation] [--json out.json]

Each model (bundled name, run directory or model file, same classes) is run once on every view of every face: the
face itself, its mirror, and the ten crops of a 12.5% upscale that ``evaluate --tta tencrop`` averages (five crops
and their mirrors). The softmax outputs are kept, so any scheme (which members see which views) is scored without
running a network again. A scheme's cost is its number of forwards per face: the accurate tier's speed goal
(300 faces/s at batch 256 on 2 cores) allows about 7 fastcnn_xl forwards per face.

With ``--classes happy,sad,neutral`` the 7-class members are scored as 3-class models, the way ``ferkit export
--classes`` cuts them: only faces of those classes count, and each member's output on each view is renormalised over
those classes before the average.

Choosing a scheme on the split it is scored on makes the winner's number slightly optimistic; the schemes below are
a fixed list (``orig + mirrored centre zoom``, the pair the bundled large models carry, was added after scoring
two 7-class members, before the next two were trained), and a paired difference (``benchmarks/paired.py``)
against the plain ensemble says how much of a gain is noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CROPS = ("c", "tl", "tr", "bl", "br")  # the 12.5% upscale's crops, as evaluate.tta_views orders them
VIEWS = ("orig", "flip") + tuple(f"zoom_{c}" for c in CROPS) + tuple(f"zoom_{c}_flip" for c in CROPS)


def view_probs(model: str, data: str, split: str, cache: str = "") -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                           list[str]]:
    """{view: N×C softmax of the model's calibrated output}, the labels and the model's classes.

    With ``cache``, the outputs are kept in ``cache/<digest of the model file>-<split>.npz`` and read from there when
    the same file is scored again.
    """
    import torch

    from ferkit.data import find_dataset, load_split
    from ferkit.evaluate import tta_views
    from ferkit.modelfile import calibrated_probs, file_digest, load_model, resolve_model_path
    from ferkit.preprocess import Preprocess

    path = resolve_model_path(model)
    kept = Path(cache) / f"{file_digest(path)[:32]}-{split}.npz" if cache else None
    if kept is not None and kept.is_file():
        z = np.load(kept)
        return {v: z[v] for v in VIEWS}, z["labels"], [str(c) for c in z["classes"]]
    net, meta = load_model(path)
    pre = Preprocess.of(meta)
    ds = find_dataset(data, list(meta.classes))
    loaded = load_split(ds.split(split), meta.input_size)
    out: dict[str, list[torch.Tensor]] = {v: [] for v in VIEWS}
    with torch.inference_mode():
        for i in range(0, len(loaded.images), 512):
            x = pre.torch(torch.as_tensor(loaded.images[i:i + 512]))
            crops = tta_views(x, "tencrop")  # 5 crops, then their 5 mirrors
            for name, v in zip(VIEWS, [x, x.flip(-1), *crops]):
                out[name].append(calibrated_probs(net(v), meta))
    probs = {k: torch.cat(v).numpy() for k, v in out.items()}
    labels, classes = np.asarray(loaded.labels), list(meta.classes)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        np.savez(kept, labels=labels, classes=np.array(classes), **probs)
    return probs, labels, classes


def schemes(n: int) -> list[tuple[str, list[tuple[int, str]]]]:
    """The fixed list of schemes for n members: (name, [(member, view), ...])."""
    every = list(range(n))
    zoomflip = ("orig", "flip", "zoom_c", "zoom_c_flip")
    out = [
        ("plain", [(m, "orig") for m in every]),
        ("flip", [(m, v) for m in every for v in ("orig", "flip")]),
        ("orig+flip+centre zoom (×2)", [(m, v) for m in every for v in zoomflip]),
        ("centre zoom (×2)", [(m, v) for m in every for v in ("zoom_c", "zoom_c_flip")]),
        ("orig + centre zoom", [(m, v) for m in every for v in ("orig", "zoom_c")]),
        ("orig + mirrored centre zoom", [(m, v) for m in every for v in ("orig", "zoom_c_flip")]),
        ("orig + flip + centre zoom", [(m, v) for m in every for v in ("orig", "flip", "zoom_c")]),
        ("members alternate orig+flip / centre zoom (×2)",
         [(m, v) for m in every for v in (("orig", "flip"), ("zoom_c", "zoom_c_flip"))[m % 2]]),
        ("tencrop", [(m, v) for m in every for v in VIEWS[2:]]),
        ("tencrop + orig + flip", [(m, v) for m in every for v in VIEWS]),
        ("members alternate orig / flip", [(m, ("orig", "flip")[m % 2]) for m in every]),
        ("members cycle orig / flip / zoom / zoom flip", [(m, zoomflip[m % 4]) for m in every]),
    ]
    for k in range(2, n):
        for sub in itertools.combinations(every, k):
            name = ",".join(map(str, sub))
            out.append((f"members {name}, flip", [(m, v) for m in sub for v in ("orig", "flip")]))
            out.append((f"members {name}, centre zoom (×2)", [(m, v) for m in sub for v in ("zoom_c", "zoom_c_flip")]))
            out.append((f"members {name}, orig+flip+centre zoom (×2)", [(m, v) for m in sub for v in zoomflip]))
            out.append((f"members {name}, orig + mirrored centre zoom",
                        [(m, v) for m in sub for v in ("orig", "zoom_c_flip")]))
    return out


def score(probs: list[dict[str, np.ndarray]], y: np.ndarray, scheme: list[tuple[int, str]]) -> float:
    p = sum(probs[m][v] for m, v in scheme) / len(scheme)
    return float((p.argmax(1) == y).mean())


def restrict(probs: list[dict[str, np.ndarray]], y: np.ndarray, classes: list[str], keep: list[str]
             ) -> tuple[list[dict[str, np.ndarray]], np.ndarray, list[str]]:
    """The outputs of members cut to the classes ``keep``: faces of other classes dropped, each output renormalised."""
    missing = [c for c in keep if c not in classes]
    if missing:
        raise SystemExit(f"tta_views.py: --classes {','.join(missing)}: not among the models' classes {classes}")
    idx = [classes.index(c) for c in keep]
    rows = np.isin(y, idx)
    relabel = {old: new for new, old in enumerate(idx)}
    def renormalised(q: np.ndarray) -> np.ndarray:
        q = q[rows][:, idx]
        return q / q.sum(1, keepdims=True)

    cut = [{v: renormalised(q) for v, q in p.items()} for p in probs]
    return cut, np.array([relabel[int(t)] for t in y[rows]]), list(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    ap.add_argument("--split", default="validation")
    ap.add_argument("--json", default="", help="also write the table here")
    ap.add_argument("--cache", default="", help="keep each model's outputs here (keyed by the model file's digest)")
    ap.add_argument("--classes", default="", help="score as models cut to these classes (comma-separated)")
    args = ap.parse_args()
    probs, y, classes = [], None, None
    for m in args.models:
        p, labels, cls = view_probs(m, args.data, args.split, args.cache)
        if classes is not None and (cls != classes or not np.array_equal(labels, y)):
            raise SystemExit(f"tta_views.py: {m} does not have the classes of {args.models[0]}")
        probs.append(p)
        y, classes = labels, cls
    if args.classes:
        probs, y, classes = restrict(probs, y, classes, args.classes.split(","))
    n = len(y)
    rows = []
    for i, m in enumerate(args.models):
        rows.append({"scheme": f"member {i} ({m}), orig", "forwards": 1, "accuracy": score(probs, y, [(i, "orig")])})
        rows.append({"scheme": f"member {i} ({m}), flip", "forwards": 2,
                     "accuracy": score(probs, y, [(i, "orig"), (i, "flip")])})
    for name, sch in schemes(len(args.models)):
        rows.append({"scheme": name, "forwards": len(sch), "accuracy": score(probs, y, sch)})
    se = float(np.sqrt(0.7 * 0.3 / n))
    print(f"{args.split}, n = {n} (one accuracy's s.e. ≈ {se * 100:.1f} points)")
    print(f"{'scheme':<52}{'forwards':>9}{'accuracy':>10}")
    for r in rows:
        print(f"{r['scheme'][:51]:<52}{r['forwards']:>9}{r['accuracy'] * 100:>9.2f}%")
    if args.json:
        table = {"models": args.models, "split": args.split, "classes": classes, "n": n, "rows": rows}
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
