"""Wrap a trained model file as ``flip(<arch>)``: the same weights with flip test-time augmentation built in.

Usage: python scripts/wrap_flip.py SRC OUT      (SRC: run directory, model file or bundled name)

The result is an ordinary ferkit model file (weights under ``net.``, no pickle); calibrate and bundle it with
``scripts/bundle_model.py OUT NAME``, which fits the temperature on the TTA outputs.
"""

from __future__ import annotations

import dataclasses
import sys

from ferkit.models import create_model
from ferkit.modelfile import load_model, save_model


def main(argv: list[str] | None = None) -> None:
    src, out = (argv if argv is not None else sys.argv[1:])[:2]
    net, meta = load_model(src)
    wrapped = create_model(f"flip({meta.arch})", num_classes=len(meta.classes), in_chans=meta.in_chans)
    wrapped.net.load_state_dict(net.state_dict())
    training = {**meta.training, "wrapped": f"{src} with flip TTA built in (scripts/wrap_flip.py)"}
    meta = dataclasses.replace(meta, arch=f"flip({meta.arch})", temperature=1.0, temperature_poly=(), training=training)
    print(f"wrote {save_model(out, wrapped, meta)} ({meta.arch})")


if __name__ == "__main__":
    main()
