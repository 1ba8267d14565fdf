"""Class names: canonical order, synonyms, --classes parsing, dataset folder matching."""

from __future__ import annotations

import pytest

from ferkit.classes import (
    DEFAULT_CLASSES,
    FER2013_CLASSES,
    UnknownClassError,
    canonical,
    match_folder,
    parse_classes,
)
from ferkit.errors import FerkitError


def test_fer2013_order_matches_the_csv_emotion_column() -> None:
    # fer2013.csv: 0=Angry, 1=Disgust, 2=Fear, 3=Happy, 4=Sad, 5=Surprise, 6=Neutral
    assert FER2013_CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert DEFAULT_CLASSES == ("happy", "sad", "neutral")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("happy", "happy"),
        ("Happy", "happy"),
        ("HAPPINESS", "happy"),
        (" sadness ", "sad"),
        ("normal", "neutral"),
        ("Anger", "angry"),
        ("disgusted", "disgust"),
        ("Fearful", "fear"),
        ("surprised", "surprise"),
        ("contempt", "contempt"),  # FER+ has it (the 8-class fer8)
        ("Contemptuous", "contempt"),
        ("pride", None),
        ("", None),
    ],
)
def test_canonical(name: str, expected: str | None) -> None:
    assert canonical(name) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ["happy", "sad", "neutral"]),
        ("all", list(FER2013_CLASSES)),
        (" ALL ", list(FER2013_CLASSES)),
        ("happy,sad", ["happy", "sad"]),
        ("Happiness, sadness ,normal", ["happy", "sad", "neutral"]),
        ("sad,happy", ["sad", "happy"]),  # order is the user's: it fixes the label indices
        ("happy,,sad,", ["happy", "sad"]),
        (["Anger", "fear"], ["angry", "fear"]),
        (("surprise",), ["surprise"]),
        ("cat,Dog", ["cat", "dog"]),  # custom datasets
    ],
)
def test_parse_classes(spec: object, expected: list[str]) -> None:
    assert parse_classes(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("hapy,sad", {}, "did you mean 'happy'"),
        ("happy,sadd", {}, "did you mean 'sad'"),
        ("nuetral", {}, "did you mean 'neutral'"),
        ("cat", {"allow_custom": False}, "unknown class 'cat'"),
        ("happy,happiness", {}, "given twice"),
        ("", {}, "empty"),
        (" , ", {}, "empty"),
        ([], {}, "empty"),
    ],
)
def test_parse_classes_rejects(spec: object, kwargs: dict, message: str) -> None:
    with pytest.raises(UnknownClassError, match=message) as info:
        parse_classes(spec, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, FerkitError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_unknown_class_lists_the_known_ones() -> None:
    with pytest.raises(UnknownClassError) as info:
        parse_classes("hapy")
    for c in FER2013_CLASSES:
        assert c in str(info.value)


@pytest.mark.parametrize(
    ("folder", "classes", "expected"),
    [
        ("happy", DEFAULT_CLASSES, "happy"),
        ("Happiness", DEFAULT_CLASSES, "happy"),
        ("SADNESS", DEFAULT_CLASSES, "sad"),
        ("normal", DEFAULT_CLASSES, "neutral"),
        ("angry", DEFAULT_CLASSES, None),
        ("anger", FER2013_CLASSES, "angry"),
        ("Cat", ("cat", "dog"), "cat"),
        ("__MACOSX", DEFAULT_CLASSES, None),
    ],
)
def test_match_folder(folder: str, classes: tuple[str, ...], expected: str | None) -> None:
    assert match_folder(folder, classes) == expected
