"""Copy a trained run's model file into the package as a bundled model, with its model card.

Usage: python scripts/bundle_model.py RUN_DIR NAME [--note TEXT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ferkit.modelfile import WEIGHTS_DIR, load_model, save_model

CARD = """# {name}: {arch}, {n} classes ({classes})

| | |
|---|---|
| architecture | `{arch}` ({params:,} parameters), input {size}×{size} grayscale, mean {mean}, std {std} |
| classes | {classes} |
| training data | FER2013 `train/` (Kaggle split folders, {train_images:,} images of these classes) |
| recipe | `{recipe}`, {epochs} epochs (best epoch {best_epoch}){teacher} |
| validation (FER2013 PublicTest, n={val_n}) | accuracy **{acc:.2f}%** (macro-F1 {f1_plain:.2f}%); with flip TTA {acc_tta:.2f}% |
| file | `{file}` ({size_mb:.2f} MB): safetensors weights + ferkit metadata JSON, loads without pickle |

Reproduce: `{command}`

{note}
## Licence and intended use
The weights are released with ferkit (Apache-2.0), but they were learnt from FER2013, whose images were collected from
the web and distributed by Kaggle for research; check that your use fits the dataset's terms. FER2013 faces are
48×48 grayscale crops with label noise; expect lower accuracy on faces unlike them (extreme poses, occlusion,
children, poor light). Facial expression is not emotion: do not use these predictions alone for decisions about people.
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("name")
    ap.add_argument("--command", default="")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    net, meta = load_model(a.run)
    metrics = json.loads((Path(a.run) / "metrics.json").read_text())
    meta = dataclasses.replace(meta, name=a.name)
    out = save_model(WEIGHTS_DIR / f"{a.name}.safetensors", net, meta, json_sidecar=False)
    t = meta.training
    card = CARD.format(
        name=a.name,
        arch=meta.arch,
        n=len(meta.classes),
        classes=", ".join(meta.classes),
        params=sum(p.numel() for p in net.parameters()),
        size=meta.input_size,
        mean=meta.mean,
        std=meta.std,
        train_images=t.get("train_images", 0),
        recipe=t.get("recipe"),
        epochs=t.get("epochs"),
        best_epoch=t.get("best_epoch"),
        teacher=f", distilled from {t['teacher']}" if t.get("teacher") else "",
        val_n=meta.metrics.get("n"),
        acc=meta.metrics["accuracy"] * 100,
        acc_tta=metrics["final"]["accuracy"] * 100,
        f1_plain=meta.metrics["macro_f1"] * 100,
        file=out.name,
        size_mb=out.stat().st_size / 1e6,
        command=a.command or "see benchmarks/README.md",
        note=(a.note + "\n") if a.note else "",
    )
    (WEIGHTS_DIR / f"{a.name}.md").write_text(card)
    # The ONNX sibling the lean (torch-free) install runs; it records this file's digest, so write it last.
    from ferkit.export import write_sibling

    sib = write_sibling(out)
    print(f"bundled {a.run} as {out} ({out.stat().st_size / 1e6:.2f} MB) and {sib['path']} "
          f"(parity max |Δp| {sib['max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
