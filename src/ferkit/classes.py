"""FER2013 class names, their canonical order, and synonyms found in real dataset folders."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from ferkit.errors import UnknownClassError  # noqa: F401  (re-exported: ferkit.classes.UnknownClassError)

#: The seven FER2013 expressions in the order of the ``emotion`` column of ``fer2013.csv``.
FER2013_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: FER+'s eight expressions (Barsoum et al. 2016): FER2013's seven plus contempt (``--classes ferplus``).
FERPLUS_CLASSES: tuple[str, ...] = FER2013_CLASSES + ("contempt",)
#: The original project's three classes; ferkit's default.
DEFAULT_CLASSES: tuple[str, ...] = ("happy", "sad", "neutral")

SYNONYMS: dict[str, str] = {
    "anger": "angry",
    "angry": "angry",
    "mad": "angry",
    "disgust": "disgust",
    "disgusted": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "neutral": "neutral",
    "normal": "neutral",
    "calm": "neutral",
    "contempt": "contempt",
    "contemptuous": "contempt",
}


def canonical(name: str) -> str | None:
    """Return the FER2013 name for ``name`` (case-insensitive, synonyms allowed), or None if unknown."""
    return SYNONYMS.get(name.strip().lower())


def parse_classes(spec: str | Sequence[str] | None, *, allow_custom: bool = True) -> list[str]:
    """Resolve a ``--classes`` value to an ordered list of class names.

    Args:
        spec: ``None`` (the default three), ``"all"`` (the seven FER2013 classes), ``"ferplus"`` (those and
            contempt, FER+'s eight), a comma-separated string or a list.
        allow_custom: accept names that are not FER2013 expressions (custom datasets). Names that look like a
            misspelt expression (close to a known name) are still refused.

    Raises:
        UnknownClassError: a name that is not known, with the known names and the closest match.
    """
    if spec is None:
        return list(DEFAULT_CLASSES)
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(FER2013_CLASSES)
        if spec.strip().lower() == "ferplus":
            return list(FERPLUS_CLASSES)
        items = [s for s in (p.strip() for p in spec.split(",")) if s]
    else:
        items = [str(s).strip() for s in spec if str(s).strip()]
    if not items:
        raise UnknownClassError("--classes is empty: give names such as happy,sad,neutral or 'all'")
    out: list[str] = []
    for item in items:
        name = canonical(item)
        if name is None:
            close = difflib.get_close_matches(item.lower(), list(SYNONYMS), n=1, cutoff=0.75)
            if close or not allow_custom:
                hint = f"; did you mean '{SYNONYMS[close[0]]}'?" if close else ""
                raise UnknownClassError(
                    f"unknown class '{item}' (known: {', '.join(FER2013_CLASSES)}, or 'all'){hint}"
                )
            name = item.lower()
        if name in out:
            raise UnknownClassError(f"class '{item}' is given twice in --classes")
        out.append(name)
    return out


def match_folder(folder_name: str, classes: Iterable[str]) -> str | None:
    """Return which of ``classes`` a dataset folder name stands for (synonyms, any case), or None."""
    low = folder_name.strip().lower()
    canon = canonical(low) or low
    for c in classes:
        if canon == c or low == c:
            return c
    return None
