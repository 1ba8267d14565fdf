"""The ``ferkit`` command: train | distill | evaluate | predict | export | serve | models | download.

Each subcommand is a thin wrapper over the Python API. Heavy modules are imported inside the handlers so that
``ferkit predict`` never loads the training or server stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ferkit import __version__
from ferkit.errors import ConfigError, FerkitError

log = logging.getLogger("ferkit")


def finite_float(text: str) -> float:
    """argparse type of every numeric option: a finite number (``nan``, ``inf`` are refused, exit 2)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return v


TRAIN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--data", dict(help="dataset root (train/, validation/ …), a split folder or fer2013.csv")),
    (
        "--classes",
        dict(help="comma-separated classes, or 'all' for the seven FER2013 ones (default happy,sad,neutral)"),
    ),
    ("--recipe", dict(help="quick (CPU default) | seed (the original EfficientNet-B0 recipe) | accurate (GPU)")),
    ("--model", dict(help="architecture: see 'ferkit models --arch'; timm/<name> for timm backbones")),
    ("--epochs", dict(type=int)),
    ("--batch-size", dict(type=int)),
    ("--lr", dict(type=finite_float)),
    ("--out", dict(help="run directory (default runs/<model>-<time>)")),
    ("--device", dict(choices=["auto", "cpu", "cuda"])),
    ("--devices", dict(type=int, help="processes/GPUs per machine (DDP through Lightning Fabric)")),
    ("--num-nodes", dict(type=int, help="machines (DDP through Lightning Fabric / torchrun)")),
    ("--seed", dict(type=int)),
    ("--threads", dict(type=int, help="CPU threads for torch")),
    ("--max-steps", dict(type=int, help="stop after this many optimizer steps (smoke runs)")),
    ("--early-stop", dict(type=int, help="stop after this many epochs without validation improvement")),
    ("--tta", dict(choices=["none", "flip", "tencrop"], help="test-time augmentation for the final evaluation")),
    ("--labels", dict(help="crowd votes to train on instead of the folder labels: a votes CSV or a folder of them "
                          "(ferkit's layout, e.g. fer2013/ferplus/) or FER+'s fer2013new.csv beside a fer2013.csv; "
                          "--set label_mode=soft|majority|probability, --set label_missing=skip|folder")),
    ("--init", dict(help="fine-tune or warm-restart with a fresh schedule from this model's weights (bundled name such "
                        "as fer7-large, run dir or file); its architecture unless --model is given")),
]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for flag, kw in TRAIN_FLAGS:
        p.add_argument(flag, default=None, **kw)
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ImageNet weights for timm backbones (needs network the first time)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or the latest run) from last.ckpt")
    p.add_argument("--config", help="YAML/JSON file of TrainConfig fields")
    p.add_argument("--strict", action="store_true", default=None, help="fail on the first unreadable image")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any TrainConfig field (repeatable), e.g. --set label_smoothing=0.05",
    )


#: The one exit-status rule of every command (shown by ``ferkit --help``); ``FerkitError.exit_code`` carries it.
EXIT_CODES = """exit status (every command):
  0    success
  1    the command ran but something failed: an input could not be read (each is named on stderr and,
       for predict, marked "error" in the output), a file could not be written, a check failed
  2    the command was refused before doing any work: a bad command line, an unknown name, or a model,
       data set, config, device or output folder that cannot be used
  130  interrupted (Ctrl-C)
  143  stopped by SIGTERM (kill, a service manager): files being written are removed, finished ones kept
  141  the output pipe was closed early (e.g. ferkit predict ... | head -1): stops quietly, like Unix tools"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferkit", description="Facial expression recognition: train, recognise, serve.",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ferkit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a model on a FER dataset")
    _add_train_flags(t)

    d = sub.add_parser("distill", help="train a small student on teacher models' soft labels")
    d.add_argument("--teacher", required=True, help="teacher model(s): name, run dir or file; comma-separated")
    d.add_argument("--student", default=None, help="student architecture (default fastcnn)")
    d.add_argument("--alpha", type=finite_float, default=None, help="weight of the soft-label loss (default 0.7)")
    d.add_argument("--temperature", type=finite_float, default=None, help="distillation temperature (default 4)")
    d.add_argument("--views", type=int, default=None, metavar="K",
                   help="label K augmented views of every training face with the teachers once, store them in the "
                        "run directory and train on those (the teachers are then not paid at every step; "
                        "= --set distill_views=K)")
    _add_train_flags(d)

    e = sub.add_parser("evaluate", help="accuracy, macro-F1, per-class metrics and confusion matrix")
    e.add_argument("--model", required=True, help="model name, run dir or file; comma-separated for an ensemble")
    e.add_argument("--data", help="dataset root or split folder (default: the data the model was trained on)")
    e.add_argument("--split", default=None, help="test | validation (default: test if present, else validation)")
    e.add_argument("--classes", help="restrict to these classes")
    e.add_argument("--tta", default="none", choices=["none", "flip", "tencrop"])
    e.add_argument("--out", help="write metrics.json, confusion_matrix.png, reliability.png and coverage.png here")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--min-score", type=finite_float, default=None, metavar="P",
                   help="also report coverage and accuracy on the faces whose top calibrated score is at least P")
    e.add_argument("--labels", help="also score against crowd votes (a votes CSV, a folder of them, or FER+'s "
                                    "fer2013new.csv with a fer2013.csv): FER+ majority accuracy, soft agreement, "
                                    "cross-entropy against the votes, ECE against the majority label")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--strict", action="store_true", help="fail on the first unreadable image")

    pr = sub.add_parser("predict", help="recognise expressions in images, folders and videos")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, video files")
    pr.add_argument("--model", default="fer3")
    pr.add_argument("--format", default="table", choices=["table", "json", "jsonl", "csv"])
    pr.add_argument("--save-annotated", metavar="DIR")
    pr.add_argument("--no-detect", action="store_true",
                    help="classify each whole image as one face (the only mode with faces the detector did not find)")
    pr.add_argument("--detector", default="yunet")
    pr.add_argument("--min-det-score", type=finite_float, default=None, metavar="S",
                    help="drop faces whose detector confidence (det_score) is below S (0..1; YuNet keeps >= 0.65)")
    pr.add_argument("--detect-size", type=int, default=None, metavar="PX",
                    help="longest side of the image the face detector sees (default: 400 for ordinary photos, up to "
                         "1600 for large ones; larger finds smaller faces, slower)")
    pr.add_argument("--every", type=int, default=1, help="video: every Nth frame")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    pr.add_argument("--track", action="store_true", help="video: give each face a track ID and smoothed scores")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--min-score", type=finite_float, default=None, metavar="P",
                    help="label a face 'uncertain' when its top calibrated score is below P (see ferkit models --card)")

    tk = sub.add_parser("track", help="follow each person through videos: per-frame CSV, per-track summary, timeline",
                        description="For each video (or folder of frames) write NAME.frames.csv, NAME.tracks.json, "
                                    "NAME.timeline.png and, with --save-video, NAME.tracked.mp4 into --out.")
    tk.add_argument("inputs", nargs="+", metavar="VIDEO", help="video files or folders of frames (sorted by name)")
    tk.add_argument("--out", default=".", metavar="DIR", help="output folder (default: the current one)")
    tk.add_argument("--every", type=int, default=1, help="use every Nth frame")
    tk.add_argument("--model", default="fer3")
    tk.add_argument("--save-video", action="store_true", help="also write an annotated MP4")
    tk.add_argument("--smooth", type=finite_float, default=None, metavar="SECONDS",
                    help="time constant of the score smoothing (default 0.5)")
    tk.add_argument("--detector", default="yunet")
    tk.add_argument("--min-det-score", type=finite_float, default=None, metavar="S",
                    help="drop faces whose detector confidence (det_score) is below S (0..1)")
    tk.add_argument("--detect-size", type=int, default=None, metavar="PX",
                    help="longest side of the frame the face detector sees (default as for predict)")
    tk.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    tk.add_argument("--quiet", action="store_true", help="no progress bar")

    from ferkit.batch.options import add_arguments as add_batch_arguments  # light: the options, not Ray

    add_batch_arguments(sub.add_parser(
        "batch", help="recognise expressions in many photos and videos on Ray, into a Parquet dataset (ferkit[ray])",
        description="Photos, folders, videos, globs, manifests and URLs -> one Parquet row per face (and per input "
                    "that failed or held no face) in --out. Runs on a local Ray with all CPUs, or on a cluster "
                    "(--address). Rerun the same command to finish an interrupted run."))

    ex = sub.add_parser("explain", help="heat maps of what drove each face's prediction (Grad-CAM; needs torch)")
    ex.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    ex.add_argument("--out", required=True, help="folder for NAME.explain.png and NAME.faceN.png")
    ex.add_argument("--model", default="fer3")
    ex.add_argument("--detector", default="yunet")
    ex.add_argument("--no-detect", action="store_true", help="explain each whole image as one face")
    ex.add_argument("--target", help="explain this class instead of each face's predicted one")

    x = sub.add_parser("export", help="export a model to ONNX with a parity check, or pack an ensemble")
    x.add_argument("--model", required=True, help="model name, run dir or file; comma-separated for an ensemble")
    x.add_argument("--format", default="onnx", choices=["onnx", "ferkit"],
                   help="onnx, or ferkit: one ferkit model file (packs an ensemble of --model a,b,... into one)")
    x.add_argument("--out", required=True)
    x.add_argument("--data", help="onnx: images for the parity check (default ../shared/data/fer2013 validation if "
                   "present); ferkit: the dataset to score the packed model on (default: its training data)")
    x.add_argument("--classes", help="ferkit: keep only these of the model's classes (cuts its output layers), "
                   "e.g. a happy,sad,neutral model from a seven-class one")
    x.add_argument("--half", action="store_true",
                   help="ferkit: store the weights as float16 (half the file; calibrated and scored as stored); "
                   "its ONNX export is then half the size too")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--int8", action="store_true",
                   help="onnx: statically quantised int8 (onnxruntime), calibrated on --data's train split and refused "
                   "if it loses more than 0.5 points of accuracy on its validation split")

    from ferkit.serve.settings import add_arguments as add_serve_arguments  # light: the options, not the server

    s = sub.add_parser("serve", help="REST API and web page")
    add_serve_arguments(s)  # every flag, its environment variable and its help come from ServeSettings

    m = sub.add_parser("models", help="list bundled models (and architectures)")
    m.add_argument("--json", action="store_true")
    m.add_argument("--arch", action="store_true", help="list trainable architectures instead")
    m.add_argument("--card", metavar="NAME", help="print a bundled model's model card")

    dl = sub.add_parser("download", help="download a dataset (needs network)")
    dl.add_argument("dataset", choices=["fer2013"])
    dl.add_argument("--to", required=True, help="where to lay out the dataset root")
    return p


def _train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    ov: dict[str, Any] = {}
    for flag, _ in TRAIN_FLAGS:
        key = flag[2:].replace("-", "_")
        if getattr(a, key, None) is not None:
            ov[key] = getattr(a, key)
    for key in ("pretrained", "strict"):
        if getattr(a, key, None) is not None:
            ov[key] = getattr(a, key)
    for item in a.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        ov[k.strip()] = v.strip()
    return ov


def _latest_run() -> Path | None:
    runs = sorted(Path("runs").glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None


def cmd_train(a: argparse.Namespace, extra: dict[str, Any] | None = None) -> int:
    import time

    import yaml

    from ferkit.config import make_config
    from ferkit.errors import ConfigError

    ov = {**_train_overrides(a), **(extra or {})}
    if ov.get("init") and not ov.get("model") and not a.resume:
        # a warm restart (--init fer7-large) continues the same architecture unless --model says otherwise
        from ferkit.modelfile import read_meta, resolve_model_path
        from ferkit.models.ensemble import tta_inner

        arch = read_meta(resolve_model_path(str(ov["init"]))).arch
        ov["model"] = tta_inner(arch) or arch  # flip(...)/views[...] TTA is for inference: train the network inside
    config_file = a.config
    if a.resume:
        out = Path(ov["out"]) if ov.get("out") else _latest_run()
        if out is None or not (out / "last.ckpt").exists():
            raise ConfigError(f"{out or 'runs/'}: nothing to resume (no last.ckpt); give the run with --out")
        saved = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").exists() else {}
        ov = {**saved, **ov, "out": str(out)}
        print(f"ferkit: resuming {out}")
    cfg = make_config(ov.get("recipe") or "quick", ov, config_file)
    if not cfg.data:
        raise ConfigError("--data is required: a dataset root with train/ (and validation/), or fer2013.csv")
    if not ov.get("out") and not a.resume:
        cfg.out = f"runs/{cfg.model.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    from ferkit.train.loop import fit

    fit(cfg, resume=a.resume)
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"teacher": a.teacher}
    if a.student:
        extra["model"] = a.student
    if a.alpha is not None:
        extra["distill_alpha"] = a.alpha
    if a.temperature is not None:
        extra["distill_temp"] = a.temperature
    if a.views is not None:
        extra["distill_views"] = a.views
    return cmd_train(a, extra)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ferkit.evaluate import evaluate_models
    from ferkit.modelfile import model_specs

    if a.min_score is not None and not 0.0 <= a.min_score <= 1.0:
        from ferkit.errors import ConfigError

        raise ConfigError(f"--min-score {a.min_score:g}: a score between 0 and 1")
    m, probs, labels = evaluate_models(
        model_specs(a.model),
        data=a.data,
        split=a.split,
        classes=a.classes,
        tta=a.tta,
        batch_size=a.batch_size,
        strict=a.strict,
        min_score=a.min_score,
        return_probs=True,
        labels=a.labels,
        say=lambda s: print(s, file=sys.stderr),
    )
    if a.out:
        from ferkit.evaluate import write_report

        write_report(m, a.out, title=f"{a.model} on {m['split']}: {m['accuracy'] * 100:.2f}% (tta {a.tta})",
                     probs=probs, labels=labels)
    if a.json:
        print(json.dumps(m))
    else:
        from ferkit.evaluate import format_table

        print(f"model {a.model}   data {m['data']} [{m['split']}]   tta {a.tta}")
        print(format_table(m))
        if "ferplus" in m:
            fp = m["ferplus"]
            print(f"against people ({fp['source']}): FER+ majority accuracy {fp['accuracy'] * 100:.2f}% "
                  f"(n={fp['n']}; {fp['accuracy_in_folders'] * 100:.2f}% on the n={fp['n_in_folders']} of "
                  f"them in the classes' own folders), soft agreement {fp['soft_agreement'] * 100:.2f}%, cross-entropy "
                  f"{fp['cross_entropy']:.4f}, ECE {fp['ece']:.4f}; the folder-label figures above: "
                  f"n={m.get('n', 0)}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from ferkit.cli.predict import run_predict

    return run_predict(
        a.inputs,
        model=a.model,
        fmt=a.format,
        save_annotated=a.save_annotated,
        no_detect=a.no_detect,
        detector=a.detector,
        every=a.every,
        batch_size=a.batch_size,
        backend=a.backend,
        track=a.track,
        quiet=a.quiet,
        min_det_score=a.min_det_score,
        detect_size=a.detect_size,
        min_score=a.min_score,
    )


def cmd_batch(a: argparse.Namespace) -> int:
    from ferkit.batch.options import run_from_arguments

    return run_from_arguments(a)


def cmd_track(a: argparse.Namespace) -> int:
    from ferkit.cli.predict import run_track

    return run_track(a.inputs, out_dir=a.out, model=a.model, every=a.every, save_video=a.save_video,
                     detector=a.detector, backend=a.backend, smooth=a.smooth, quiet=a.quiet,
                     min_det_score=a.min_det_score, detect_size=a.detect_size)


def cmd_explain(a: argparse.Namespace) -> int:
    from ferkit.infer.explain import run_explain

    return run_explain(a.inputs, a.out, model=a.model, detector=a.detector, no_detect=a.no_detect, target=a.target)


def cmd_export(a: argparse.Namespace) -> int:
    from ferkit.errors import ConfigError
    from ferkit.modelfile import model_specs

    specs = model_specs(a.model)
    if a.classes and a.format != "ferkit":
        raise ConfigError("--classes cuts a model's classes into a ferkit model file: use it with --format ferkit")
    if a.half and a.format != "ferkit":
        raise ConfigError("--half stores a ferkit model file's weights as float16: use it with --format ferkit (the "
                          "ONNX export of such a file is then half the size)")
    if a.format == "ferkit":
        from ferkit.export import pack_ensemble, restrict_classes

        say = lambda s: print(s, file=sys.stderr)  # noqa: E731
        if a.classes:
            if len(specs) != 1:
                raise ConfigError("--classes cuts one model; pack the ensemble first, then cut the packed file")
            from ferkit.classes import parse_classes

            r = restrict_classes(specs[0], parse_classes(a.classes), a.out, data=a.data, say=say, half=a.half)
        else:
            r = pack_ensemble(specs, a.out, data=a.data, say=say, half=a.half)
        acc = r["metrics"].get("accuracy")
        print(f"wrote {r['path']}: {r['arch']}" + (f", {r['metrics']['val_split']} accuracy {acc * 100:.2f}%"
                                                   if acc is not None else ""))
        return 0
    from ferkit.export import export_onnx

    if len(specs) != 1:
        raise ConfigError("--format onnx exports one model; pack an ensemble first with --format ferkit")
    if a.int8:
        from ferkit.export import export_int8

        if not a.data:
            raise ConfigError("--int8 needs --data DATASET: its train split calibrates, its validation split checks")
        r = export_int8(a.model, a.out, data=a.data, opset=a.opset)
        print(f"wrote {r['path']}: int8 validation accuracy {r['int8_accuracy'] * 100:.2f}% (float "
              f"{r['float_accuracy'] * 100:.2f}%, {-r['loss_points']:+.2f} points, n={r['n_validation']}), "
              f"{r['int8_faces_per_s']:,.0f} faces/s (float {r['float_faces_per_s']:,.0f}), "
              f"{r['int8_bytes'] / 1e6:.2f} MB (float {r['float_bytes'] / 1e6:.2f} MB)")
        return 0
    r = export_onnx(a.model, a.out, data=a.data, opset=a.opset)
    print(
        f"wrote {r['path']}: parity vs PyTorch on {r['n']} images, max |Δp| = {r['max_abs_diff']:.2e} "
        f"({'ok' if r['passed'] else 'FAILED'}, limit 1e-4)"
    )
    return 0 if r["passed"] else 1


def cmd_serve(a: argparse.Namespace) -> int:
    from ferkit.serve.settings import from_arguments

    settings = from_arguments(a)  # a bad value or FERKIT_SERVE_* variable: one line, before importing the server
    from ferkit.serve.app import serve

    serve(settings)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    if a.card:
        from ferkit.errors import UnknownNameError
        from ferkit.modelfile import bundled_models

        models = bundled_models()
        if a.card not in models:
            raise UnknownNameError("bundled model", a.card, models)
        card = models[a.card].with_suffix(".md")
        print(card.read_text(encoding="utf-8") if card.is_file() else f"{a.card}: no model card ({card} is missing)",
              end="")
        return 0
    if a.arch:
        from ferkit.models import get_model_info, list_models

        rows = [
            {
                "name": n,
                "input_size": get_model_info(n).default_input_size,
                "description": get_model_info(n).description,
            }
            for n in list_models()
        ]
        if a.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{r['name']:<14} {r['description']}")
            print("timm/<name>    any timm backbone (pip install timm), e.g. timm/efficientnet_b0")
        return 0
    from ferkit.modelfile import bundled_models, read_meta

    rows = []
    for name, path in bundled_models().items():
        meta = read_meta(path)
        m = meta.metrics
        rows.append(
            {
                "name": name,
                "tier": m.get("tier", "large" if name.endswith("-large") else "fast"),
                "arch": meta.arch,
                "classes": list(meta.classes),
                "input_size": meta.input_size,
                "validation_accuracy": m.get("accuracy"),
                # which truth: "ferplus-majority" (trained and scored on the FER+ votes) or "folder"
                "validation_labels": m.get("labels", "folder"),
                "int8_sibling": path.with_suffix(".int8.onnx").is_file(),
                "validation_accuracy_tta": {k: m[f"accuracy_tta_{k}"] for k in ("flip", "tencrop")
                                            if m.get(f"accuracy_tta_{k}") is not None},
                "faces_per_second": m.get("faces_per_second"),
                "size_mb": round(path.stat().st_size / 1e6, 2),
                "path": str(path),
            }
        )
    if a.json:
        print(json.dumps(rows))
        return 0

    def pct(v: float | None) -> str:
        return f"{v * 100:.2f}%" if v is not None else "-"

    from ferkit.models.ensemble import tta_wrapped

    rows.sort(key=lambda r: (r["tier"] != "fast", r["name"]))
    aw = max([len(r["arch"]) for r in rows] + [4]) + 2
    print(f"{'name':<12}{'tier':<7}{'arch':<{aw}}{'input':<7}{'truth':<7}{'val acc':<9}{'flip':<9}{'10-crop':<9}"
          f"{'faces/s':<9}{'size':<9}{'int8':<6}classes")
    for r in rows:
        tta, fps = r["validation_accuracy_tta"], r["faces_per_second"]
        flip = "in model" if tta_wrapped(r["arch"]) else pct(tta.get("flip"))
        truth = "FER+" if r["validation_labels"] == "ferplus-majority" else "folder"
        print(
            f"{r['name']:<12}{r['tier']:<7}{r['arch']:<{aw}}{r['input_size']:<7}{truth:<7}"
            f"{pct(r['validation_accuracy']):<9}{flip:<9}{pct(tta.get('tencrop')):<9}{(f'{fps:,}' if fps else '-'):<9}"
            f"{r['size_mb']:<6.2f}MB {('yes' if r['int8_sibling'] else '-'):<6}{','.join(r['classes'])}"
        )
    print("val acc: FER2013 validation (PublicTest), as the model runs (a flip(...) or views[...] model's TTA is in "
          "the model), against the truth named: FER+ = the majority of ten annotators' votes (faces with one), "
          "folder = FER2013's own labels; flip / 10-crop: with `evaluate --tta`; faces/s: onnxruntime float graph, "
          "batch 256, measured when bundled; int8: an int8 sibling that backend auto runs where it is faster "
          "(`ferkit models --card NAME` for more)")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from ferkit.download import download_fer2013

    root = download_fer2013(a.to)
    print(f"fer2013 laid out in {root}: train with  ferkit train --data {root}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "distill": cmd_distill,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "batch": cmd_batch,
    "track": cmd_track,
    "explain": cmd_explain,
    "export": cmd_export,
    "serve": cmd_serve,
    "models": cmd_models,
    "download": cmd_download,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ferkit`` console script; returns the exit status (tests call it in-process)."""
    _quiet_native_libraries()
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="ferkit: %(message)s")
    from ferkit._warnings import route_warnings

    unroute = route_warnings()  # Pillow's, numpy's … warnings: one "ferkit: UserWarning: ..." line each
    restore = _stop_on_sigterm() if a.command != "serve" else None  # the server handles its own signals
    try:
        return COMMANDS[a.command](a)
    except KeyboardInterrupt:
        print(
            "ferkit: interrupted" + ("; continue with --resume" if a.command in ("train", "distill") else ""),
            file=sys.stderr,
        )
        return 130
    except Terminated:
        print("ferkit: terminated (SIGTERM)" + ("; continue with --resume" if a.command in ("train", "distill")
                                                else ""), file=sys.stderr)
        return 143
    except BrokenPipeError:
        return _broken_pipe()
    except FerkitError as e:  # only ferkit's own errors are one line: any other exception is a bug, with traceback
        _error(str(e))
        return e.exit_code
    except ImportError as e:  # a missing extra: the message names the pip install that fixes it
        from ferkit._extras import explain

        _error(explain(e, f"ferkit {a.command}"))
        return 1
    except OSError as e:  # the environment: permissions, full disk, a vanished file
        _error(_os_error_message(e))
        return 1
    finally:
        unroute()
        if restore is not None:
            restore()


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that every ``finally`` and atomic writer cleans up (a
    ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it)."""


def _stop_on_sigterm() -> Any:
    """Turn SIGTERM into :class:`Terminated` while a command runs (Python's default is to die at once, leaving
    temporary files behind: a hidden half-written MP4 after ``track --save-video``); returns the undo, or None where
    signals cannot be set (not the main thread: in-process callers)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def _quiet_native_libraries() -> None:
    """OpenCV and FFmpeg print straight to stderr (not through Python): only their errors, and FFmpeg's not at all;
    ferkit reports what matters in its own lines. Set before OpenCV loads; a user's own setting wins."""
    import os

    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def _error(message: str) -> None:
    from ferkit.fsutil import display

    try:
        print(f"ferkit: error: {display(message)}", file=sys.stderr)
    except (BrokenPipeError, OSError):  # stderr closed too: nothing left to tell
        pass


def _os_error_message(e: OSError) -> str:
    """``PATH: permission denied`` rather than ``[Errno 13] Permission denied: 'PATH'``."""
    what = e.strerror.lower() if e.strerror else str(e)
    return f"{e.filename}: {what}" if e.filename is not None else what


def _broken_pipe() -> int:
    """The reader went away (``| head -1``): stop quietly with 141 (128 + SIGPIPE, what a shell reports for Unix
    tools killed by it). stdout is pointed at /dev/null so the interpreter's final flush cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # in-process callers (tests) may hold a stdout without a descriptor
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
