"""Where the tests find the real data: ``../shared/data`` beside the repository (also there in CI).

``fer2013/{train,validation}/<class>/*.jpg`` are the 48×48 FER2013 faces, ``wild-dev/<class>/*.jpg`` the colour web
photos. A clone without them skips the tests that read them (``needs_fer``, ``needs_wild``) instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FER_DIR = DATA / "fer2013"
VALIDATION = FER_DIR / "validation"
WILD = DATA / "wild-dev"

HAVE_FER = (FER_DIR / "train").is_dir() and VALIDATION.is_dir()

needs_fer = pytest.mark.skipif(not HAVE_FER, reason=f"no FER2013 data at {FER_DIR}")
needs_wild = pytest.mark.skipif(not WILD.is_dir(), reason=f"no wild-dev photos at {WILD}")
