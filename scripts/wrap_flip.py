"""Wrap a trained model file with test-time augmentation built in: ``flip(<arch>)`` or ``views[a+b](<arch>)``.

Usage: python scripts/wrap_flip.py SRC OUT [--views orig,zoom_flip]    (SRC: run directory, model file or bundled name)

The default views are the face and its mirror (``flip(<arch>)``); ``--views`` takes any of orig, flip, zoom and
zoom_flip (zoom: the centre crop of a 12.5% upscale, as in ten-crop TTA). The result is an ordinary ferkit model
file (weights under ``net.``, no pickle); calibrate and bundle it with ``scripts/bundle_model.py OUT NAME``, which
fits the temperature on the TTA outputs.
"""

from __future__ import annotations

import argparse
import dataclasses

from ferkit.models import create_model
from ferkit.models.ensemble import VIEW_NAMES, tta_arch
from ferkit.modelfile import load_model, save_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--views", default="orig,flip", help=f"comma-separated, from {', '.join(VIEW_NAMES)}")
    a = ap.parse_args(argv)
    views = tuple(v.strip() for v in a.views.split(","))
    net, meta = load_model(a.src)
    arch = tta_arch(views, meta.arch)
    wrapped = create_model(arch, num_classes=len(meta.classes), in_chans=meta.in_chans)
    wrapped.net.load_state_dict(net.state_dict())
    training = {**meta.training, "wrapped": f"{a.src} with {'+'.join(views)} TTA built in (scripts/wrap_flip.py)"}
    meta = dataclasses.replace(meta, arch=arch, temperature=1.0, temperature_poly=(), training=training)
    print(f"wrote {save_model(a.out, wrapped, meta)} ({meta.arch})")


if __name__ == "__main__":
    main()
