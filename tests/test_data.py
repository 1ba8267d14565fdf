"""Datasets: folder layouts, fer2013 CSV files, images of any format, bad images, the decoded cache."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit.classes import FER2013_CLASSES, parse_classes
from ferkit.data import find_dataset, load_split
from ferkit.data.cache import cache_dir
from ferkit.errors import DatasetError, ImageError
from ferkit.images import load_image

H3 = ["happy", "sad", "neutral"]


def face(seed: int, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """A smooth, deterministic grey picture (compresses well, survives JPEG)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * (3 + seed % 5) + yy * (2 + seed % 7) + seed * 11) % 256).astype(np.uint8)


def make_tree(root: Path, layout: dict[str, int], ext: str = ".jpg") -> Path:
    """``{"train/happy": 3, ...}`` → that many small images in each folder (0 makes an empty folder)."""
    for i, (rel, n) in enumerate(layout.items()):
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for j in range(n):
            Image.fromarray(face(i * 31 + j)).save(d / f"{j:03d}{ext}")
    return root


# ------------------------------------------------------------------------------------------------ folder layouts


def test_root_with_train_and_validation(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "train/happy": 3,
            "train/sad": 2,
            "train/neutral": 1,
            "validation/happy": 1,
            "validation/sad": 1,
            "validation/neutral": 2,
        },
    )
    ds = find_dataset(tmp_path, H3)
    assert set(ds.splits) == {"train", "validation"}
    assert ds.classes == H3
    assert ds.splits["train"].counts() == {"happy": 3, "sad": 2, "neutral": 1}
    assert ds.splits["validation"].counts() == {"happy": 1, "sad": 1, "neutral": 2}
    tr = ds.split("train")
    assert all(Path(f).is_file() for f in tr.files)
    assert [H3[i] for i in tr.labels] == [Path(f).parent.name for f in tr.files]
    assert ds.skipped_folders == []


@pytest.mark.parametrize("val_name", ["val", "valid", "Validation", "PublicTest"])
def test_validation_folder_aliases(tmp_path: Path, val_name: str) -> None:
    make_tree(tmp_path, {"Train/happy": 1, "Train/sad": 1, f"{val_name}/happy": 1, f"{val_name}/sad": 2})
    ds = find_dataset(tmp_path, ["happy", "sad"])
    assert set(ds.splits) == {"train", "validation"}
    assert len(ds.split("validation")) == 3
    assert ds.split("val") is ds.splits["validation"]  # aliases work when asking, too


def test_train_and_test_splits(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train/happy": 1, "train/sad": 1, "test/happy": 2, "test/sad": 2})
    ds = find_dataset(tmp_path, ["happy", "sad"])
    assert set(ds.splits) == {"train", "test"}
    with pytest.raises(DatasetError, match="no 'validation' split.*found: test, train"):
        ds.split("validation")


def test_single_split_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, {"happy": 2, "sad": 1, "neutral": 3})
    ds = find_dataset(tmp_path, H3)
    assert list(ds.splits) == ["single"]
    assert ds.splits["single"].counts() == {"happy": 2, "sad": 1, "neutral": 3}


def test_case_insensitive_and_synonym_folder_names(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "train/Happiness": 2,
            "train/SADNESS": 1,
            "train/normal": 3,
            "validation/HAPPY": 1,
            "validation/Sad": 1,
            "validation/Neutral": 1,
        },
    )
    ds = find_dataset(tmp_path, parse_classes(None))
    assert ds.splits["train"].counts() == {"happy": 2, "sad": 1, "neutral": 3}
    assert ds.splits["validation"].counts() == {"happy": 1, "sad": 1, "neutral": 1}


def test_folders_of_other_classes_and_junk_are_skipped(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "train/happy": 2,
            "train/sad": 1,
            "train/neutral": 1,
            "train/angry": 4,
            "train/__MACOSX": 1,
            "train/.git": 2,
            "train/happy/nested": 1,
        },
    )
    (tmp_path / "train" / "happy" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "sad" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    ds = find_dataset(tmp_path, H3)
    assert ds.skipped_folders == ["__MACOSX", "angry"]  # hidden folders are not even mentioned
    assert ds.splits["train"].counts() == {"happy": 3, "sad": 1, "neutral": 1}  # nested class sub-folders count


def test_custom_class_names(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train/Cat": 2, "train/dog": 1, "val/cat": 1, "val/DOG": 1})
    ds = find_dataset(tmp_path, parse_classes("cat,dog"))
    assert ds.classes == ["cat", "dog"]
    assert ds.splits["train"].counts() == {"cat": 2, "dog": 1}


def test_evaluation_keeps_only_the_classes_present(tmp_path: Path) -> None:
    """A 7-class model on a 3-class folder: the missing classes drop out and the labels are renumbered."""
    make_tree(tmp_path, {"happy": 2, "sad": 1, "neutral": 1})
    ds = find_dataset(tmp_path, list(FER2013_CLASSES), require_all=False)
    assert ds.classes == ["happy", "sad", "neutral"]  # FER2013 order, restricted
    s = ds.splits["single"]
    assert s.classes == ds.classes and s.counts() == {"happy": 2, "sad": 1, "neutral": 1}
    assert sorted(set(s.labels.tolist())) == [0, 1, 2]
    with pytest.raises(DatasetError, match="no images for class"):
        find_dataset(tmp_path, list(FER2013_CLASSES))  # training needs every class


@pytest.mark.parametrize(
    ("layout", "classes", "message"),
    [
        ({}, H3, "empty folder"),
        (
            {
                "train/happy": 1,
                "train/sad": 1,
                "train/neutral": 1,
                "validation/happy": 0,
                "validation/sad": 0,
                "validation/neutral": 0,
            },
            H3,
            r"validation: no images of the classes happy, sad, neutral",
        ),
        ({"train/happy": 1, "train/sad": 1, "train/neutral": 0}, H3, "no images for class.*neutral"),
        ({"train/happy": 1, "train/sad": 1}, ["happy", "sad", "cat"], "no images for class.*cat"),
        (
            {"train/angry": 1, "train/fear": 1},
            H3,
            r"no class folders for happy, sad, neutral \(folders found: angry, fear\)",
        ),
        ({"cats": 1, "dogs": 1}, H3, "no class folders"),
    ],
)
def test_unusable_folders(tmp_path: Path, layout: dict[str, int], classes: list[str], message: str) -> None:
    make_tree(tmp_path, layout)
    with pytest.raises(DatasetError, match=message) as info:
        find_dataset(tmp_path, classes)
    assert "\n" not in str(info.value)


def test_missing_path_and_non_csv_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or folder"):
        find_dataset(tmp_path / "nope", H3)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DatasetError, match="expected a dataset folder or a fer2013-style .csv"):
        find_dataset(tmp_path / "data.txt", H3)


def test_the_real_dataset_layout(data_dir: Path) -> None:
    ds = find_dataset(data_dir, parse_classes("all"))
    assert set(ds.splits) == {"train", "validation"}
    c = ds.splits["train"].counts()
    assert set(c) == set(FER2013_CLASSES) and min(c.values()) > 100
    assert len(ds.splits["validation"]) > 3000


# ------------------------------------------------------------------------------------------------ CSV files


def test_good_csv_splits_by_usage(tiny_csv: Path, data_dir: Path) -> None:
    ds = find_dataset(tiny_csv, H3)
    assert set(ds.splits) == {"train", "validation", "test"}
    assert ds.splits["train"].counts() == {"happy": 6, "sad": 6, "neutral": 6}
    assert ds.splits["validation"].counts() == {"happy": 3, "sad": 3, "neutral": 3}
    assert ds.splits["test"].counts() == {"happy": 2, "sad": 2, "neutral": 2}
    tr = ds.splits["train"]
    assert tr.pixels is not None and tr.pixels.shape == (18, 48, 48) and tr.pixels.dtype == np.uint8
    first_happy = min((data_dir / "train" / "happy").iterdir())
    assert np.array_equal(tr.pixels[list(tr.labels).index(0)], np.asarray(Image.open(first_happy).convert("L")))
    loaded = load_split(tr, 48)
    assert np.array_equal(loaded.images, tr.pixels) and np.array_equal(loaded.labels, tr.labels)
    assert load_split(tr, 64).images.shape == (18, 64, 64)


def test_csv_class_subset_and_order(tiny_csv: Path) -> None:
    ds = find_dataset(tiny_csv, ["sad", "happy"])
    assert ds.classes == ["sad", "happy"]
    assert ds.splits["train"].counts() == {"sad": 6, "happy": 6}
    with pytest.raises(DatasetError, match="no rows for class.*angry"):
        find_dataset(tiny_csv, ["happy", "angry"])
    with pytest.raises(DatasetError, match="only has the seven FER2013 classes, not cat"):
        find_dataset(tiny_csv, ["happy", "cat"])
    assert find_dataset(tiny_csv, list(FER2013_CLASSES), require_all=False).classes == ["happy", "sad", "neutral"]


def test_csv_with_byte_order_mark_and_spaces(tmp_path: Path) -> None:
    text = "\ufeffemotion , pixels ,Usage\n" + "".join(f"{e},{' '.join(['7'] * 2304)},Training\n" for e in (3, 4, 6))
    p = tmp_path / "excel.csv"
    p.write_text(text, encoding="utf-8")
    ds = find_dataset(p, H3)
    assert ds.splits["train"].counts() == {"happy": 1, "sad": 1, "neutral": 1}


def test_csv_without_usage_is_all_training(tmp_path: Path, write_fer_csv: Callable[..., Path]) -> None:
    p = tmp_path / "no_usage.csv"
    p.write_text("emotion,pixels\n" + "".join(f"{e},{' '.join(['1'] * 2304)}\n" for e in (3, 4, 6, 3)))
    ds = find_dataset(p, H3)
    assert list(ds.splits) == ["train"] and len(ds.splits["train"]) == 4


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("emotion,Usage", r"missing column\(s\) pixels \(found: emotion, Usage\)"),
        ("label,image,Usage", r"missing column\(s\) emotion, pixels"),
        ("", "missing column"),
    ],
)
def test_csv_missing_columns(tmp_path: Path, header: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(header + ("\n3,x\n" if header else ""))
    with pytest.raises(DatasetError, match=message):
        find_dataset(p, H3)


def test_csv_malformed_rows_are_named(tmp_path: Path, write_fer_csv: Callable[..., Path]) -> None:
    good = np.zeros((48, 48), np.uint8)
    rows = [
        (3, good, "Training"),  # row 2
        (4, "1 2 3", "Training"),  # row 3: too few values
        (6, good, "Training"),  # row 4
        (3, " ".join(["12"] * 2303 + ["abc"]), "Training"),  # row 5: not a number
        (9, good, "Training"),  # row 6: no such emotion
        (4, " ".join(["300"] * 2304), "PublicTest"),  # row 7: out of range
        (4, good, "Holdout"),  # row 8: unknown Usage
    ]
    p = write_fer_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DatasetError) as info:
        find_dataset(p, H3)
    msg = str(info.value)
    assert "5 malformed row(s)" in msg and "(and 2 more)" in msg
    assert "row 3: pixels has 3 values, expected 2304" in msg
    assert "row 5:" in msg and "row 6: emotion 9 is not in 0..6" in msg
    assert "row 2" not in msg and "row 4" not in msg
    assert "\n" not in msg


def test_csv_with_no_rows(tmp_path: Path) -> None:
    p = tmp_path / "empty.csv"
    p.write_text("emotion,pixels,Usage\n")
    with pytest.raises(DatasetError, match="no rows of the classes"):
        find_dataset(p, H3)


# ------------------------------------------------------------------------------------------------ image formats


def _save(im: Image.Image, path: Path, **kw: object) -> Path:
    im.save(path, **kw)
    return path


def _formats(d: Path) -> dict[str, Path]:
    """One file per awkward kind of image, all showing the same 60×40 (w×h) picture."""
    base = face(5, (60, 40))
    gray = Image.fromarray(base)
    rgb = Image.merge("RGB", [gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray])
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((40, 60), 128, np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    return {
        "png_rgb": _save(rgb, d / "rgb.png"),
        "palette": _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), d / "palette.png"),
        "palette_transparent": _save(
            rgb.convert("P", palette=Image.Palette.ADAPTIVE), d / "ptrans.png", transparency=0
        ),
        "rgba": _save(rgba, d / "rgba.png"),
        "la": _save(rgba.convert("LA"), d / "la.png"),
        "gray16": _save(Image.fromarray((base // 2).astype(np.uint16) * 257), d / "gray16.png"),  # a dark one
        "cmyk": _save(rgb.convert("CMYK"), d / "cmyk.jpg"),
        "exif_rotated": _save(rgb, d / "exif.jpg", exif=exif),
        "bitonal": _save(gray.convert("1"), d / "bitonal.bmp"),
        "gif": _save(rgb, d / "anim.gif", save_all=True, append_images=[gray.convert("RGB")]),
        "tiff": _save(gray, d / "gray.tif"),
        "webp": _save(rgb, d / "rgb.webp"),
        "pgm": _save(gray, d / "gray.pgm"),
        "JPG upper-case": _save(rgb, d / "UPPER.JPG"),
    }


def test_any_format_loads(tmp_path: Path) -> None:
    files = _formats(tmp_path)
    for kind, f in files.items():
        a = load_image(f)
        assert a.dtype == np.uint8, kind
        assert a.ndim in (2, 3) and (a.ndim == 2 or a.shape[2] == 3), (kind, a.shape)
        expect = (60, 40) if kind == "exif_rotated" else (40, 60)  # EXIF rotation applied
        assert a.shape[:2] == expect, (kind, a.shape)
    assert np.array_equal(load_image(files["gray16"]), face(5, (60, 40)) // 2)  # 16-bit keeps its brightness
    # transparency is composited on white, not black
    assert load_image(files["rgba"]).mean() > np.asarray(Image.open(files["png_rgb"])).mean()


def test_any_format_becomes_48x48_gray_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "data" / "happy"
    d.mkdir(parents=True)
    files = _formats(d)
    ds = find_dataset(tmp_path / "data", ["happy"])
    assert len(ds.splits["single"]) == len(files)
    s = load_split(ds.splits["single"], 48)
    assert s.skipped == []
    assert s.images.shape == (len(files), 48, 48) and s.images.dtype == np.uint8
    assert s.images.std(axis=(1, 2)).min() > 1  # every picture survived (not blank)


def test_inputs_other_than_paths() -> None:
    a = face(1)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    assert np.array_equal(load_image(buf.getvalue()), a)
    assert np.array_equal(load_image(Image.fromarray(a)), a)
    assert np.array_equal(load_image(a), a)
    assert load_image(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    assert load_image(np.ones((4, 5), np.float32)).max() == 255
    with pytest.raises(ImageError, match="empty data"):
        load_image(b"")
    with pytest.raises(ImageError, match="expected an H×W or H×W×3 array"):
        load_image(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ImageError, match="unsupported input type int"):
        load_image(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ bad images


def _bad_images(d: Path) -> dict[str, Path]:
    good = io.BytesIO()
    Image.fromarray(face(2)).save(good, "JPEG")
    data = good.getvalue()
    files = {
        "zero": d / "zero.jpg",
        "text": d / "text.jpg",
        "truncated": d / "truncated.jpg",
    }
    files["zero"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    files["truncated"].write_bytes(data[: len(data) * 2 // 3])
    return files


@pytest.mark.parametrize(
    ("kind", "message"),
    [("zero", "empty file"), ("text", "cannot identify image file"), ("truncated", "corrupt or truncated")],
)
def test_bad_image_errors(tmp_path: Path, kind: str, message: str) -> None:
    f = _bad_images(tmp_path)[kind]
    with pytest.raises(ImageError, match=message) as info:
        load_image(f)
    assert str(info.value).startswith(str(f) + ": ")


def test_bad_images_are_skipped_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tree(tmp_path / "data", {"happy": 3, "sad": 2})
    bad = _bad_images(root / "sad")
    src = find_dataset(root, ["happy", "sad"]).splits["single"]
    assert len(src) == 8
    s = load_split(src, 48)
    assert len(s) == 5 and s.labels.tolist() == [0, 0, 0, 1, 1]
    assert len(s.skipped) == 3
    for f in bad.values():
        assert sum(str(f) in line for line in s.skipped) == 1
    # the cached copy remembers what was skipped; strict refuses, cache or not
    again = load_split(src, 48)
    assert again.from_cache and again.skipped == s.skipped
    with pytest.raises(ImageError) as info:
        load_split(src, 48, strict=True)
    assert any(str(f) in str(info.value) for f in bad.values())
    with pytest.raises(ImageError):
        load_split(src, 48, strict=True, use_cache=False)


def _huge_png(path: Path, side: int) -> Path:
    """A PNG whose header says side×side pixels, without the pixel data (a decompression bomb's calling card)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )
    return path


def test_huge_image_is_refused_without_decoding(tmp_path: Path) -> None:
    """30000×30000 (900 M pixels) is refused from its header; the child process may not even allocate 1 GB."""
    big = _huge_png(tmp_path / "big.png", 30000)
    code = textwrap.dedent(f"""
        import resource, sys
        from ferkit.images import load_image
        from ferkit.errors import ImageError
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        try:
            load_image({str(big)!r})
        except ImageError as e:
            print(e)
            sys.exit(0)
        sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "image too large" in r.stdout and "big.png" in r.stdout


def test_pixel_limit_applies_to_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "a.png"
    Image.fromarray(face(0, (100, 80))).save(f)
    with pytest.raises(ImageError, match=r"too large \(100×80 = 8,000 pixels; the limit is 5,000\)"):
        load_image(f, max_pixels=5000)
    with pytest.raises(ImageError, match="too large"):
        load_image(Image.open(f), max_pixels=5000)
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data" / "happy").mkdir(parents=True)
    _huge_png(tmp_path / "data" / "happy" / "huge.png", 30000)
    Image.fromarray(face(1)).save(tmp_path / "data" / "happy" / "ok.png")
    s = load_split(find_dataset(tmp_path / "data", ["happy"]).splits["single"], 48)
    assert len(s) == 1 and len(s.skipped) == 1 and "image too large" in s.skipped[0]


# ------------------------------------------------------------------------------------------------ the cache


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(d))
    assert cache_dir() == d
    return d


def test_second_load_comes_from_the_cache(tmp_path: Path, private_cache: Path) -> None:
    root = make_tree(tmp_path / "data", {"happy": 4, "sad": 3})
    src = find_dataset(root, ["happy", "sad"]).splits["single"]
    first = load_split(src, 48)
    assert not first.from_cache and len(list(private_cache.glob("*.npz"))) == 1
    second = load_split(find_dataset(root, ["happy", "sad"]).splits["single"], 48)
    assert second.from_cache
    assert np.array_equal(first.images, second.images) and np.array_equal(first.labels, second.labels)
    assert not load_split(src, 32).from_cache  # another size is another cache entry
    assert not load_split(src, 48, use_cache=False).from_cache


def test_touching_or_replacing_a_file_invalidates_the_cache(tmp_path: Path, private_cache: Path) -> None:
    root = make_tree(tmp_path / "data", {"happy": 3, "sad": 3})

    def load() -> object:
        return load_split(find_dataset(root, ["happy", "sad"]).splits["single"], 48)

    first = load()
    f = root / "sad" / "001.jpg"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = load()
    assert not touched.from_cache and np.array_equal(touched.images, first.images)
    assert load().from_cache
    new = 255 - face(99)
    Image.fromarray(new).save(tmp_path / "new.png")
    os.replace(tmp_path / "new.png", f)  # same name, new picture
    replaced = load()
    assert not replaced.from_cache
    i = find_dataset(root, ["happy", "sad"]).splits["single"].files.index(str(f))
    assert np.array_equal(replaced.images[i], new)
    assert not np.array_equal(first.images[i], new)
    (root / "happy" / "002.jpg").unlink()  # a removed file
    assert len(load()) == 5


def test_damaged_cache_file_is_rebuilt(tmp_path: Path, private_cache: Path) -> None:
    root = make_tree(tmp_path / "data", {"happy": 2})
    src = find_dataset(root, ["happy"]).splits["single"]
    first = load_split(src, 48)
    (cached,) = private_cache.glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    again = load_split(src, 48)
    assert not again.from_cache and np.array_equal(again.images, first.images)
    assert load_split(src, 48).from_cache
    assert not list(private_cache.glob("*.tmp*"))  # no temporary files left behind


def test_a_split_with_no_readable_image_is_an_error(tmp_path: Path, private_cache: Path) -> None:
    root = tmp_path / "data"
    for c in ("happy", "sad"):
        (root / c).mkdir(parents=True)
        (root / c / "x.jpg").write_text("not a picture")
    src = find_dataset(root, ["happy", "sad"]).splits["single"]
    with pytest.raises(DatasetError, match=r"none of its 2 image\(s\) could be read \(first: .*x.jpg"):
        load_split(src, 48)
    # nor is an empty result trusted from a cache written before this check existed
    from ferkit.data.cache import _key

    private_cache.mkdir(parents=True, exist_ok=True)
    np.savez(
        private_cache / f"{_key(src, 48)}.npz",
        images=np.zeros((0, 48, 48), np.uint8),
        labels=np.zeros(0, np.int64),
        skipped=np.array('["x"]'),
    )
    with pytest.raises(DatasetError, match="could be read"):
        load_split(src, 48)
