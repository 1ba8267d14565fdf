"""Compose the demo's example images from the bundled public-domain photo (no files from ../shared).

Usage: python scripts/make_examples.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageOps

import ferkit

SRC = Path(ferkit.__file__).resolve().parent / "assets" / "astronaut.jpg"


def main(out: str) -> None:
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    im = Image.open(SRC).convert("RGB")
    im.save(o / "astronaut.jpg", quality=92)
    ImageOps.grayscale(im).save(o / "astronaut_gray.png")
    im.resize((640, 640)).crop((0, 80, 640, 560)).save(o / "astronaut_640x480.jpg", quality=90)
    two = Image.new("RGB", (1024, 512), (235, 235, 235))
    two.paste(im.resize((512, 512)), (0, 0))
    two.paste(ImageOps.mirror(im).resize((512, 512)), (512, 0))
    two.save(o / "two_faces.jpg", quality=90)
    im.crop((0, 380, 512, 512)).save(o / "no_face.jpg", quality=90)  # the suit and flag: no face
    print(f"examples written to {o}/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples")
