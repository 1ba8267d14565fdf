"""Bundle a trained model into the package: calibrate it, measure it, write its model card and its ONNX sibling.

Usage:
    python scripts/bundle_model.py SRC NAME [--data ../shared/data/fer2013] [--command TEXT] [--note TEXT]

SRC is a run directory, a model file or a bundled model's name; NAME is the bundled name (``fer3``, ``fer7-large``).
``python scripts/bundle_model.py fer3 fer3`` recalibrates and re-measures a bundled model in place: the weights are
copied tensor by tensor from the file's own bytes (bit-identical; checked), only the metadata changes.

Steps: copy weights → fit the calibration on FER2013 ``validation`` (``ferkit.train.calibrate``: temperature or
score-dependent temperature, ECE by 2-fold cross-fitting) → measure on ``validation`` (per-class metrics, confusion
matrix, calibration, min_score table, flip TTA), speed (onnxruntime, batch 256) and limitations (wild-dev photos end
to end, rotated and small faces) → write ``weights/NAME.md``, plots under ``benchmarks/cards/`` and
``benchmarks/cards/NAME.json`` → write the ONNX sibling last (it records the model file's digest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ferkit.modelfile import (
    FORMAT,
    META_KEY,
    WEIGHTS_DIR,
    ModelMeta,
    read_meta,
    resolve_model_path,
    stored_state,
    stores_half,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CARDS = REPO / "benchmarks" / "cards"
MIN_SCORES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def copy_weights(src: Path, dst: Path, meta: ModelMeta, *, half: bool = False) -> None:
    """Write ``src``'s tensors, byte for byte, with ``meta`` as the metadata, to ``dst`` (atomically); with ``half``
    its weight tensors as float16 (``ferkit.modelfile.stored_state``)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    if half:
        tensors = stored_state(tensors, half=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: meta.to_json(), "format": FORMAT})
    again = load_file(str(tmp))
    if set(again) != set(tensors) or any(not again[k].equal(tensors[k]) or again[k].dtype != tensors[k].dtype
                                         for k in tensors):
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"{dst}: copied weights differ from {src}; nothing written")
    os.chmod(tmp, 0o644)  # package data: readable by everyone who installs it, whatever the source file's mode
    os.replace(tmp, dst)


def validation_faces(meta: ModelMeta, data: Path, labels: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×S×S FER2013 validation faces at the model's input size, and their labels: those of the model's
    class folders with their folder labels, or with ``labels`` (crowd votes) every face that has a FER+ majority
    among the model's classes, with that label."""
    from ferkit.data import find_dataset, load_split

    if labels:
        from ferkit.data.labels import majority_labels
        from ferkit.evaluate import split_with_votes

        _, src, votes, _ = split_with_votes(str(data), labels, "validation", list(meta.classes))
        loaded = load_split(src, meta.input_size)
        y = majority_labels(loaded.take(votes), list(meta.classes))
        return loaded.images[y >= 0], y[y >= 0]
    ds = find_dataset(data, list(meta.classes))
    loaded = load_split(ds.split("validation"), meta.input_size)
    return loaded.images, np.asarray(loaded.labels)


def share_calibration(probs: np.ndarray, votes: np.ndarray, classes: list[str], bins: int = 15) -> dict[str, Any]:
    """Do the scores read as "the share of people who would say so"? Per bin of the top score: its mean against the
    mean share of the votes (on the model's classes) that went to the predicted label; ``ece`` weights the gaps by
    the bins' sizes, ``mean_abs_error`` is face by face."""
    from ferkit.data.labels import class_columns

    v = np.nan_to_num(np.asarray(votes, np.float64))[:, class_columns(classes)]
    on = v.sum(1) > 0
    p, v = probs[on], v[on]
    pred, top = p.argmax(1), p.max(1)
    share = v[np.arange(len(p)), pred] / v.sum(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(top, edges[1:-1]), 0, bins - 1)
    rows, gap = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            rows.append({"bin": [round(edges[b], 3), round(edges[b + 1], 3)], "n": int(m.sum()),
                         "mean_score": float(top[m].mean()), "mean_share": float(share[m].mean())})
            gap += m.sum() / len(p) * abs(top[m].mean() - share[m].mean())
    return {"n": int(len(p)), "ece": float(gap), "mean_abs_error": float(np.abs(top - share).mean()),
            "mean_score": float(top.mean()), "mean_share": float(share.mean()), "bins": rows}


def rotate(faces: np.ndarray, degrees: float) -> np.ndarray:
    import cv2

    s = faces.shape[-1]
    m = cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), degrees, 1.0)
    return np.stack([cv2.warpAffine(f, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                     for f in faces])


def shrink(faces: np.ndarray, side: int) -> np.ndarray:
    """Faces as a camera would see them at ``side`` pixels: down to side×side, back up to the model's size."""
    import cv2

    s = faces.shape[-1]
    return np.stack([cv2.resize(cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA), (s, s),
                                interpolation=cv2.INTER_LINEAR) for f in faces])


def wild_dev(rec: Any, data: Path, degrees: float = 0.0) -> dict[str, Any]:
    """End to end on the wild-dev photos (YuNet, largest face), over the folders' classes; optionally rotated."""
    import cv2

    from ferkit.images import is_image_path, load_image

    classes = [c for c in rec.classes if (data / c).is_dir()]
    ok = n = no_face = 0
    for c in classes:
        for f in sorted(p for p in (data / c).iterdir() if is_image_path(p)):
            img = load_image(f)
            if degrees:
                h, w = img.shape[:2]
                m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
                img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
            faces = rec.predict_arrays([img], keep_images=False)[0].faces
            n += 1
            if not faces:
                no_face += 1
                continue
            s = faces[0].scores
            ok += max(classes, key=lambda k: s[k]) == c
    return {"photos": n, "no_face": no_face, "accuracy": ok / max(n, 1), "classes": classes, "rotation": degrees}


def faces_per_second(rec: Any, faces: np.ndarray, rounds: int = 15) -> float:
    """Best of ``rounds`` timed calls of classify on 256 real faces (best-of: other processes only slow it down)."""
    batch = np.resize(faces, (256, *faces.shape[1:]))
    rec.classify(batch)
    best = min(_timed(lambda: rec.classify(batch)) for _ in range(rounds))
    return 256 / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(path: Path, meta: ModelMeta, data: Path, labels: str | None = None) -> dict[str, Any]:
    """Everything the card states, measured on this machine with the calibrated model file at ``path``; with
    ``labels`` (crowd votes), accuracy is against the FER+ majority label (``ferplus``: all the vote metrics) and
    the folder-label figures are kept beside it (``folder``)."""
    from ferkit import Recognizer
    from ferkit.evaluate import evaluate_models
    from ferkit.metrics import coverage_curve, evaluate_probs, selective

    kw = {"labels": labels} if labels else {}
    m, probs, labels_ = evaluate_models([str(path)], data=str(data), split="validation", return_probs=True, **kw)
    flip = evaluate_models([str(path)], data=str(data), split="validation", tta="flip", **kw)
    tencrop = evaluate_models([str(path)], data=str(data), split="validation", tta="tencrop", **kw)
    rec = Recognizer(model=str(path), backend="onnx" if _has_onnxruntime() else "torch")
    faces, y = validation_faces(meta, data, labels)
    folder = None
    if labels:  # the headline figures are against people: the majority-kept faces and their labels
        folder = {"accuracy": m["accuracy"], "n": m["n"], "macro_f1": m.get("macro_f1"),
                  "accuracy_tta_flip": flip["accuracy"], "accuracy_tta_tencrop": tencrop["accuracy"]}
        probs, labels_ = np.asarray(rec.classify(faces), np.float64), y  # calibrated, as the Recognizer gives them
        m = {**evaluate_probs(probs, y, list(meta.classes)), "ferplus": m["ferplus"], "split": m["split"],
             "data": m["data"]}
        for res in (flip, tencrop):
            res["accuracy"] = res["ferplus"]["accuracy"]
    robust = {}
    for name, fn in (("rotated 15°", lambda f: rotate(f, 15)), ("rotated 30°", lambda f: rotate(f, 30)),
                     ("seen at 24×24 pixels", lambda f: shrink(f, 24)),
                     ("seen at 16×16 pixels", lambda f: shrink(f, 16))):
        robust[name] = float((rec.classify(fn(faces)).argmax(1) == y).mean())
    wild = {}
    if (data.parent / "wild-dev").is_dir():
        wild = {"upright": wild_dev(rec, data.parent / "wild-dev"),
                "rotated 30°": wild_dev(rec, data.parent / "wild-dev", 30.0)}
    curve = coverage_curve(probs, labels_)
    return {
        "validation": m,
        **({"folder": folder, "ferplus": m["ferplus"]} if folder else {}),
        "accuracy_tta_flip": flip["accuracy"],
        "accuracy_tta_tencrop": tencrop["accuracy"],
        "selective": [selective(probs, labels_, p) for p in MIN_SCORES],
        "coverage_curve": {"coverage": curve["coverage"][::10], "accuracy": curve["accuracy"][::10]},
        "robustness_validation": robust,
        "wild_dev": wild,
        "faces_per_second": faces_per_second(rec, faces),
        "backend": rec.backend,
        "load_average": os.getloadavg()[0],
        "check": evaluate_probs(probs, labels_, list(meta.classes))["accuracy"],
    }


def cross_fitted_probs(z: np.ndarray, y: np.ndarray, cal: dict[str, Any]) -> np.ndarray:
    """Out-of-fold probabilities with the calibration method ``cal`` chose (each half scaled by the fit on the
    other): what a claim about the calibrated scores is checked on."""
    from ferkit.train.calibrate import CANDIDATES, cross_fit_probs, scaled_probs

    chosen = next(c for c, name in CANDIDATES.items() if cal["candidates"].get(name) == cal["after_cross_fit"])
    if chosen[0] < 0:
        return scaled_probs(z, 1.0)
    return cross_fit_probs(z, y, degree=chosen[0], objective=chosen[1])[0]


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def suggest(selective_rows: list[dict[str, float]]) -> float:
    """The default min_score: 0.5, where a calibrated label becomes more likely wrong than right."""
    return 0.5


def old_card_parts(card: Path) -> tuple[str, str]:
    """The reproduce command and the free-text recipe note of an existing card (kept when re-bundling)."""
    if not card.is_file():
        return "", ""
    text = card.read_text(encoding="utf-8")
    cmd = re.search(r"^Reproduce: `(.+?)`", text, re.M)
    note = ""
    after = text.split("\n\n")
    for i, part in enumerate(after):
        if part.startswith("Reproduce:") and i + 1 < len(after) and not after[i + 1].startswith("#"):
            note = after[i + 1].strip()
    return (cmd.group(1) if cmd else ""), note


def pct(v: float) -> str:
    return f"{v * 100:.2f}%"


def tta_text(meta: ModelMeta, r: dict[str, Any]) -> str:
    """What the card says about test-time augmentation: built into a flip(...)/views[...] model, else an evaluate
    option."""
    from ferkit.models.ensemble import tta_wrapped

    wrapped = tta_wrapped(meta.arch)
    if wrapped:
        return (f"TTA over the views {' + '.join(wrapped[0])} is built into the model (architecture "
                f"`{meta.arch.split('(')[0]}(...)`): the Recognizer, the server and the ONNX graph apply it, and the "
                f"speed below counts it; with ten-crop TTA on top {pct(r['accuracy_tta_tencrop'])}")
    return (f"with flip TTA {pct(r['accuracy_tta_flip'])}, ten-crop TTA {pct(r['accuracy_tta_tencrop'])} "
            "(`evaluate --tta`; the Recognizer does not apply them)")


def card_text(name: str, meta: ModelMeta, params: int, size_mb: float, r: dict[str, Any], cal: dict[str, Any],
              min_score: float, command: str, note: str, plots: dict[str, str], *, half: bool = False) -> str:
    """The model card (Markdown); ``half``: the file stores its weights as float16."""
    v = r["validation"]
    t = meta.training
    classes = list(meta.classes)
    teacher = f", distilled from {t['teacher']}" if t.get("teacher") else ""
    if t.get("ensemble_of"):
        recipe = f"an ensemble (averaged probabilities) of {', '.join(map(str, t['ensemble_of']))}"
    else:
        recipe = f"`{t.get('recipe')}`, {t.get('epochs')} epochs (best epoch {t.get('best_epoch')}){teacher}"
    lines = [
        f"# {name}: {meta.arch}, {len(classes)} classes ({', '.join(classes)})",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{meta.arch}` ({params:,} parameters), input {meta.input_size}×{meta.input_size} grayscale, "
        f"mean {meta.mean}, std {meta.std} |",
        f"| classes | {', '.join(classes)} |",
        f"| training data | FER2013 `train/` (Kaggle split folders, {t.get('train_images') or 0:,} images of these "
        "classes) |",
        f"| recipe | {recipe} |",
        f"| validation (FER2013 PublicTest{', FER+ majority labels' if 'ferplus' in r else ''}, n={v['n']}) | accuracy **{pct(v['accuracy'])}** (macro-F1 "
        f"{pct(v['macro_f1'])}); " + tta_text(meta, r) + " |",
        *labels_rows(meta, r),
        f"| tier | {meta.metrics.get('tier', 'fast')} |",
        f"| calibration | {cal['method']}, fitted on `validation`: ECE **{cal['after_cross_fit']['ece']:.4f}** "
        f"(cross-fitted; {cal['before']['ece']:.4f} before), 15 equal-width bins |",
        f"| suggested `min_score` | **{min_score:g}** (keeps "
        f"{pct(next(s['coverage'] for s in r['selective'] if s['min_score'] == min_score))} of validation faces) |",
        f"| speed | {speed_text(name, r, meta.arch)} |",
        f"| file | `{name}.safetensors` ({size_mb:.2f} MB{', float16 weights' if half else ''}): "
        "safetensors weights + ferkit metadata JSON, loads without pickle; `{name}.onnx` beside it |"
        .replace("{name}", name),
        "",
        f"Reproduce: `{command or 'see benchmarks/README.md'}`",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        "## Data and its terms",
        "FER2013 (Goodfellow et al. 2013, ICML Challenges in Representation Learning) is 35,887 48×48 grayscale faces "
        "found by web image search, distributed by Kaggle for that research challenge. Its images are not licensed "
        "by their subjects or photographers for other uses, and the dataset carries no licence that grants "
        "commercial rights. The weights are released with ferkit (Apache-2.0), but whether a model learnt from "
        "FER2013 may be used commercially is a legal question about the dataset, not about this code: for a product, "
        "get advice, or retrain on data you hold the rights to (`ferkit train --data YOUR_DATA`; the recipe is above).",
        "",
        "## Validation (FER2013 `validation` = PublicTest)",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for c in classes:
        pc = v["per_class"][c]
        lines.append(f"| {c} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | {pc['support']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for c, row in zip(classes, v["confusion_matrix"]):
        lines.append(f"| **{c}** | " + " | ".join(str(x) for x in row) + " |")
    b, a, ins = cal["before"], cal["after_cross_fit"], cal["after_in_sample"]
    terms = "".join(f" {'+' if c >= 0 else '−'} {abs(c):.4g}·s{'²³'[k - 1] if k else ''}"
                    for k, c in enumerate(cal["temperature_poly"]))
    poly = (f", log T = log {cal['temperature']:.4g}{terms} (s: the raw top score)" if cal["temperature_poly"]
            else f", T = {cal['temperature']:.4f}")
    lines += [
        "",
        "## Calibration",
        f"Scores are calibrated: {cal['method']}{poly}. Every face is divided by one positive temperature, so the "
        "predicted label and the accuracy are exactly those of the raw model. The Recognizer, the server and the "
        "exported ONNX graph apply it.",
        "",
        "The fit saw `validation` (which also chose the best epoch; there is no other held-out FER2013 split here). "
        f"The numbers after calibration are therefore {cal['cross_fit']}: fitted on one half of `validation`, "
        "measured on the other half. In-sample numbers are shown for comparison only.",
        "",
        "| | ECE (15 bins) | NLL | Brier | mean top score |",
        "|---|---|---|---|---|",
        f"| raw softmax, same halves | {b['ece']:.4f} | {b['nll']:.4f} | {b['brier']:.4f} | {b['mean_confidence']:.3f} |",
        f"| calibrated, cross-fitted | **{a['ece']:.4f}** | {a['nll']:.4f} | {a['brier']:.4f} | "
        f"{a['mean_confidence']:.3f} |",
        f"| calibrated, in-sample | {ins['ece']:.4f} | {ins['nll']:.4f} | {ins['brier']:.4f} | "
        f"{ins['mean_confidence']:.3f} |",
        "",
        f"For scale: a perfectly calibrated model measured on one half ({cal['n_fold']} faces) still shows an ECE of "
        f"about {cal['ece_noise_floor_fold']:.3f}, and on all {v['n']} faces about {cal['ece_noise_floor']:.3f} (mean "
        "over labels drawn from its own calibrated scores), so differences below that are noise. Candidates tried "
        "(cross-fitted ECE): "
        + ", ".join(f"{k} {c['ece']:.4f}" for k, c in cal["candidates"].items()) + ".",
        "",
        f"Plots: [{plots['reliability']}]({plots['reliability']}), [{plots['coverage']}]({plots['coverage']}).",
        "",
        "## Abstaining: `min_score`",
        "With `min_score=P` (`Recognizer(min_score=P)`, `ferkit predict --min-score P`, `?min_score=P` on the server) "
        "a face whose top calibrated score is below P is labelled `uncertain`; its `scores` are kept. On validation:",
        "",
        "| P | faces kept | accuracy on kept faces |",
        "|---|---|---|",
    ]
    lines += [f"| {s['min_score']:g} | {pct(s['coverage'])} | {pct(s['accuracy_kept'])} |" for s in r["selective"]]
    lines += [
        "",
        f"Suggested default: **{min_score:g}**: below it a calibrated label is more likely wrong than right. Raise it "
        "where a wrong label costs more than no label (read the table for the trade-off).",
        "",
        "## Known limitations (measured)",
        "",
        "| condition | accuracy |",
        "|---|---|",
        f"| FER2013 validation, upright 48×48 faces (reference) | {pct(v['accuracy'])} |",
    ]
    lines += [f"| validation faces {k} | {pct(x)} |" for k, x in r["robustness_validation"].items()]
    for k, w in r["wild_dev"].items():
        lines.append(f"| wild-dev colour web photos, {k}, end to end (YuNet, largest face; {w['photos']} photos, "
                     f"no face found in {w['no_face']}; scored over {', '.join(w['classes'])}) | {pct(w['accuracy'])} |")
    lines += [
        "",
        "Rotations are in-plane (edges replicated); a small face is a validation face shrunk to that size and "
        "enlarged again, as a distant face reaches the model. Expect lower accuracy on faces unlike FER2013's: "
        "strong poses, occlusion (masks, hands, glasses), children, poor light, and on the classes with few training "
        "images (disgust). The labels are noisy (human agreement on FER2013 is about 65%).",
        "",
        "## Intended use",
        "Facial expression is not emotion, and FER2013's labels are what annotators read from a face, not what the "
        "person felt. Do not use these predictions alone for decisions about people (hiring, screening, policing, "
        "grading). Report aggregate trends, keep a human in the loop, and abstain (`min_score`) when unsure.",
        "",
        f"Generated by `scripts/bundle_model.py` (measurements in `benchmarks/cards/{name}.json`).",
        "",
    ]
    return "\n".join(lines)


def labels_rows(meta: ModelMeta, r: dict[str, Any]) -> list[str]:
    """The card's rows on which labels the model learnt and is measured against (crowd votes or folder names)."""
    t = meta.training.get("labels") or {"source": "folder names", "mode": "hard"}
    if "ferplus" not in r:
        return ["| labels | trained and measured on FER2013's folder labels (one web search each; ten FER+ "
                "annotators disagree with about a third of them) |"]
    fp, fo, sh = r["ferplus"], r["folder"], r["share_calibration"]
    left = ", ".join(f"{n} {why}" for why, n in (t.get("left_out") or {}).items() if n)
    trained = (f"trained on FER+ crowd votes (`{t.get('source')}`, label_mode `{t.get('mode')}`: cross-entropy "
               f"against the ten annotators' vote shares after dropping single votes; {t.get('train_kept', 0):,} of "
               f"{t.get('train_faces', 0):,} training faces kept" + (f"; left out: {left}" if left else "") + ")"
               if t.get("mode") not in (None, "hard") else "trained on FER2013's folder labels")
    return [
        f"| labels | {trained}; **accuracy is against people**: the FER+ majority label (single votes dropped; a face "
        f"counts when its top label holds more than half the remaining votes and is one of the model's classes) |",
        f"| against people (FER+, validation) | majority accuracy **{pct(fp['accuracy'])}** (n={fp['n']}; "
        f"{pct(fp['accuracy_in_folders'])} on the n={fp['n_in_folders']} of them in these classes' own folders); "
        f"soft agreement {pct(fp['soft_agreement'])} (mean share of the ten votes the predicted label got); "
        f"cross-entropy against the votes {fp['cross_entropy']:.4f}; ECE against the majority label "
        f"{fp['ece']:.4f} in-sample (cross-fitted below) |",
        f"| against FER2013's folder labels | {pct(fo['accuracy'])} (n={fo['n']}, the faces in these classes' "
        f"folders; flip TTA {pct(fo['accuracy_tta_flip'])}) |",
        f"| scores as \"the share of people who would say so\" | top score vs the share of the votes on these classes "
        f"that the predicted label got, cross-fitted calibration, n={sh['n']}: binned gap (ECE-style) "
        f"**{sh['ece']:.4f}**, face by face {sh['mean_abs_error']:.3f}; mean score {sh['mean_score']:.3f} vs "
        f"mean share {sh['mean_share']:.3f} |",
    ]


def speed_text(name: str, r: dict[str, Any], arch: str) -> str:
    """The card's speed: ``benchmarks/infer_speed.py``'s number when it was measured on an idle machine for a model of
    this architecture (speed does not depend on the weights), and the one measured while bundling (with the load
    average then: other processes only slow it down)."""
    here = (f"{r['faces_per_second']:,.0f} faces/s measured {r.get('speed_when', 'while bundling')} ({r['backend']}, "
            f"batch 256, load average "
            f"{r['load_average']:.1f})")
    try:
        bench = json.loads((REPO / "benchmarks" / "infer_speed.json").read_text())
        fps = bench["models"][name]["onnx"]["faces_per_s"]
        load = bench["machine"]["load_average_at_start"][0]
        measured_arch = bench["models"][name]["onnx"]["arch"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return here
    if load > 2.0 or measured_arch != arch:
        return here
    return f"**{fps:,.0f} faces/s** (onnxruntime, batch 256, 2 cores, `benchmarks/infer_speed.py` on an idle machine); {here}"


def write_int8(dst: Path, data: Path, cards: Path) -> dict[str, Any] | None:
    """The model's int8 sibling (``NAME.int8.onnx``, :func:`ferkit.export.export_int8`), written only when it loses at
    most ``INT8_AUTO_MAX_LOSS_POINTS`` against the float graph (else an old one is removed); its check and both
    graphs' faces/s go into the card JSON and a line of the card. Write it after the ONNX sibling: it records the
    model file's digest, so any later rewrite of the model file must write it again."""
    from ferkit.errors import ExportError
    from ferkit.export import export_int8
    from ferkit.fsutil import atomic_write_text
    from ferkit.infer.runtime import INT8_AUTO_MAX_LOSS_POINTS

    out = dst.with_suffix(".int8.onnx")
    card_json, card = cards / f"{dst.stem}.json", dst.with_suffix(".md")
    try:
        r = export_int8(str(dst), str(out), data=str(data), max_loss_points=INT8_AUTO_MAX_LOSS_POINTS)
    except ExportError as e:
        out.unlink(missing_ok=True)
        print(f"  no int8 sibling: {e}")
        r = None
    info = None if r is None else {k: r[k] for k in ("labels", "n_validation", "float_accuracy", "int8_accuracy",
                                                     "loss_points", "float_faces_per_s", "int8_faces_per_s",
                                                     "int8_bytes", "threads")}
    if card_json.is_file():
        j = json.loads(card_json.read_text())
        j["int8"] = info
        atomic_write_text(card_json, json.dumps(j, indent=2) + "\n")
    if card.is_file():
        what = "none (it lost more than the limit)" if info is None else (
            f"`{out.name}` ({info['int8_bytes'] / 1e6:.2f} MB): {pct(info['int8_accuracy'])} vs "
            f"{pct(info['float_accuracy'])} float on the {info['labels']} (n={info['n_validation']:,}, "
            f"{info['loss_points']:+.2f} points lost), {info['int8_faces_per_s']:,.0f} vs "
            f"{info['float_faces_per_s']:,.0f} faces/s here (batch 256); backend auto runs it where it is faster")
        row = f"| int8 sibling | {what} |"
        text = card.read_text()
        if re.search(r"^\| int8 sibling \|.*\|$", text, flags=re.M):
            text = re.sub(r"^\| int8 sibling \|.*\|$", lambda _: row, text, count=1, flags=re.M)
        else:
            text = re.sub(r"^(\| speed \|.*\|)$", lambda m: m.group(1) + "\n" + row, text, count=1, flags=re.M)
        atomic_write_text(card, text)
    if info:
        print(f"  and {out} (int8: {pct(info['int8_accuracy'])}, {info['loss_points']:+.2f} points; "
              f"{info['int8_faces_per_s']:,.0f} vs {info['float_faces_per_s']:,.0f} faces/s)")
    return info


def refresh_speed(name: str, to: Path, cards: Path, data: Path) -> None:
    """Measure a bundled model's speed again (on an idle machine) and rewrite every place that states it: the model
    file's ``faces_per_second`` (weights copied bit for bit), its card JSON, its card's speed row (with
    infer_speed.json's number when that is for this architecture) and its ONNX sibling, which records the file's
    digest. The accuracy, the calibration and everything else measured while bundling are kept as they are."""
    from ferkit import Recognizer
    from ferkit.export import write_sibling
    from ferkit.fsutil import atomic_write_text

    dst, card, card_json = to / f"{name}.safetensors", to / f"{name}.md", cards / f"{name}.json"
    meta = read_meta(dst)
    rec = Recognizer(model=str(dst), backend="onnx" if _has_onnxruntime() else "torch")
    faces, _ = validation_faces(meta, data)
    r = json.loads(card_json.read_text())
    old = r.get("faces_per_second")
    r.update({"faces_per_second": faces_per_second(rec, faces), "backend": rec.backend,
              "load_average": os.getloadavg()[0], "speed_when": "again after bundling (--refresh-speed)"})
    del rec
    meta = dataclasses.replace(meta, metrics={**meta.metrics, "faces_per_second": round(r["faces_per_second"])})
    copy_weights(dst, dst, meta)
    atomic_write_text(card_json, json.dumps(r, indent=2) + "\n")
    row = f"| speed | {speed_text(name, r, meta.arch)} |"
    text = re.sub(r"^\| speed \|.*\|$", lambda _: row, card.read_text(), count=1, flags=re.M)
    atomic_write_text(card, text)
    sib = write_sibling(dst)
    print(f"{dst}: {old:,.0f} -> {r['faces_per_second']:,.0f} faces/s (load average {r['load_average']:.1f}); "
          f"{card}: {row}; {sib['path']} rewritten")
    if dst.with_suffix(".int8.onnx").is_file():  # it records the model file's digest, which just changed
        write_int8(dst, data, cards)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="run directory, model file or bundled model name")
    ap.add_argument("name", help="the bundled name, e.g. fer3 or fer7-large")
    ap.add_argument("--data", default=str(DATA / "fer2013"), help="FER2013 root with validation/ (default %(default)s)")
    ap.add_argument("--command", default="", help="the command that trained it (default: kept from the old card)")
    ap.add_argument("--note", default="", help="a paragraph on how it was trained (default: kept from the old card)")
    ap.add_argument("--tier", default=None, choices=["fast", "large"],
                    help="fast (>= 3,000 faces/s) or large (the accurate tier); default: large for NAME-large")
    ap.add_argument("--no-onnx", action="store_true", help="do not write the ONNX sibling")
    ap.add_argument("--int8", action="store_true",
                    help="also write the int8 sibling NAME.int8.onnx (kept only if it loses <= 0.3 points; backend "
                         "auto runs it where it is faster)")
    ap.add_argument("--half", action="store_true",
                    help="store the weights as float16 (half the file and its ONNX sibling; everything is measured "
                         "with the float16 file)")
    ap.add_argument("--keep-speed", action="store_true",
                    help="keep the speed of the bundled model being replaced (its card JSON) instead of this "
                         "machine's: for a re-bundle that does not change what is computed (--half, recalibration) "
                         "on a machine other than the one the speeds were measured on")
    ap.add_argument("--refresh-speed", action="store_true",
                    help="only measure the speed again and rewrite it in the model file, its card and its ONNX "
                         "sibling (on an idle machine; SRC is ignored)")
    ap.add_argument("--labels", default=None,
                    help="crowd votes (e.g. ../shared/data/fer2013/ferplus): calibrate against the FER+ majority "
                         "label and measure against people, folder-label figures beside")
    ap.add_argument("--to", default=str(WEIGHTS_DIR), help="where bundled models live (default: the package's)")
    ap.add_argument("--cards", default=str(CARDS), help="where the card's plots and JSON go (default %(default)s)")
    a = ap.parse_args(argv)
    a.tier = a.tier or ("large" if a.name.endswith("-large") else "fast")
    cards = Path(a.cards)
    if a.refresh_speed:
        refresh_speed(a.name, Path(a.to), cards, Path(a.data))
        return

    from ferkit.evaluate import model_logits
    from ferkit.fsutil import atomic_write_text
    from ferkit.metrics import coverage_curve, plot_coverage, plot_reliability, reliability, selective
    from ferkit.train.calibrate import Calibration, calibrate

    data = Path(a.data)
    src = resolve_model_path(a.src)
    dst = Path(a.to) / f"{a.name}.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    card_path = dst.with_suffix(".md")
    old_cmd, old_note = old_card_parts(card_path)
    meta = read_meta(src)
    training = dict(meta.training)
    command = a.command or training.get("command") or old_cmd
    note = a.note or training.get("note") or old_note
    training.update({"command": command, "note": note})
    if src.parent != dst.parent:  # where it came from (a run directory, usually)
        training.setdefault("source", str(a.src))

    kept_speed = {}
    if a.keep_speed:
        try:
            old_card = json.loads((cards / f"{a.name}.json").read_text())
            kept_speed = {k: old_card[k] for k in ("faces_per_second", "backend", "load_average")}
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--keep-speed: no speed to keep in {cards / f'{a.name}.json'} ({e})") from None
        kept_speed["speed_when"] = f"{old_card.get('speed_when', 'while bundling')}, kept by a re-bundle (--keep-speed)"

    # 1. weights, as they are (or as float16); 2. the calibration, fitted on validation from the raw logits
    copy_weights(src, dst, dataclasses.replace(meta, name=a.name, training=training, temperature=1.0,
                                               temperature_poly=()), half=a.half)
    share = None
    if a.labels:  # against people: fitted on the faces with a FER+ majority among the classes, with that label
        from ferkit.data.labels import majority_labels
        from ferkit.evaluate import vote_logits

        z, votes, _, _ = vote_logits(str(dst), data=str(data), labels=a.labels)
        y = majority_labels(votes, list(meta.classes))
        z, votes, y = z[y >= 0], votes[y >= 0], y[y >= 0]
        cal = calibrate(z, y, split="validation (FER+ majority)")
        share = share_calibration(cross_fitted_probs(z, y, cal), votes, list(meta.classes))
    else:
        z, y, _ = model_logits(str(dst), data=str(data), split="validation")
        cal = calibrate(z, y, split="validation")
    metrics = dict(meta.metrics)
    metrics["calibration"] = cal
    meta = dataclasses.replace(meta, name=a.name, training=training, temperature=cal["temperature"],
                               temperature_poly=tuple(cal["temperature_poly"]), metrics=metrics)
    copy_weights(dst, dst, meta)  # the tensors step 1 wrote (float16 with --half), the calibrated metadata

    # 3. measurements with the calibrated file
    r = measure(dst, meta, data, a.labels)
    r.update(kept_speed)
    if share is not None:
        r["share_calibration"] = share
    v = r["validation"]
    min_score = suggest(r["selective"])
    metrics.update({"val_split": "validation", "accuracy": v["accuracy"], "macro_f1": v["macro_f1"], "n": v["n"],
                    "accuracy_tta_flip": r["accuracy_tta_flip"], "accuracy_tta_tencrop": r["accuracy_tta_tencrop"],
                    "tier": a.tier, "ece": cal["after_cross_fit"]["ece"],
                    "suggested_min_score": min_score,
                    "faces_per_second": round(r["faces_per_second"])})
    if a.labels:  # which truth the numbers are against, and the other one beside it
        fp = r["ferplus"]
        metrics.update({"labels": "ferplus-majority", "accuracy_folder": r["folder"]["accuracy"],
                        "n_folder": r["folder"]["n"],
                        "ferplus": {**{k: fp[k] for k in ("accuracy", "n", "soft_agreement", "cross_entropy",
                                                          "n_votes", "accuracy_in_folders", "n_in_folders")},
                                    "share_ece": share["ece"], "share_mean_abs_error": share["mean_abs_error"]}})
    else:
        metrics["labels"] = "folder"
    meta = dataclasses.replace(meta, metrics=metrics)
    copy_weights(dst, dst, meta)

    cards.mkdir(parents=True, exist_ok=True)
    probs = Calibration(cal["temperature"], tuple(cal["temperature_poly"])).probs(z)
    rel_dir = Path(os.path.relpath(cards, dst.parent)).as_posix()
    plots = {"reliability": f"{rel_dir}/{a.name}-reliability.png", "coverage": f"{rel_dir}/{a.name}-coverage.png"}
    rel = reliability(probs, y)
    plot_reliability(rel, cards / f"{a.name}-reliability.png",
                     f"{a.name} on validation (calibration fitted there)\nECE {rel['ece']:.4f} in-sample, "
                     f"{cal['after_cross_fit']['ece']:.4f} cross-fitted, {cal['before']['ece']:.4f} raw")
    plot_coverage(coverage_curve(probs, y), cards / f"{a.name}-coverage.png",
                  f"{a.name} on validation: accuracy on the most confident faces",
                  marks=[selective(probs, y, p) for p in MIN_SCORES])
    from ferkit.modelfile import load_model

    net, _ = load_model(dst)
    params = sum(p.numel() for p in net.parameters())
    atomic_write_text(card_path, card_text(a.name, meta, params, dst.stat().st_size / 1e6, r, cal, min_score,
                                           command, note, plots, half=stores_half(dst)))
    atomic_write_text(cards / f"{a.name}.json", json.dumps({"calibration": cal, **{k: v for k, v in r.items()
                                                                              if k != "validation"},
                                                      "validation": {k: v[k] for k in ("accuracy", "macro_f1", "n",
                                                                                       "per_class", "ece", "nll",
                                                                                       "brier")}},
                                                     indent=2) + "\n")
    print(f"bundled {a.src} as {dst} ({dst.stat().st_size / 1e6:.2f} MB): validation {pct(v['accuracy'])}, "
          f"{cal['method']}, ECE {cal['before']['ece']:.4f} -> {cal['after_cross_fit']['ece']:.4f} (cross-fitted), "
          f"NLL {cal['before']['nll']:.4f} -> {cal['after_cross_fit']['nll']:.4f}; card {card_path}")
    if not a.no_onnx:
        # The ONNX sibling the lean (torch-free) install runs; it records this file's digest, so write it last.
        from ferkit.export import write_sibling

        sib = write_sibling(dst)
        print(f"  and {sib['path']} (parity max |Δp| {sib['max_abs_diff']:.1e})")
    if a.int8:
        write_int8(dst, data, cards)
    else:
        dst.with_suffix(".int8.onnx").unlink(missing_ok=True)  # it was exported from the file just replaced


if __name__ == "__main__":
    main()
