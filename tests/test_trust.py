"""Trustworthy results (issue 11): no invented faces, no lost files, nothing silently skipped, no tracebacks.

Table-driven through the CLI (``ferkit.cli.main`` in-process, and real subprocesses where a pipe or another user
matters) and the Python API. The server's cases live in tests/test_serve_api.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit.cli import main
from ferkit.errors import DatasetError, DeviceError, FerkitError, ImageError, UnknownNameError
from ferkit.fsutil import atomic_path, atomic_write_bytes, atomic_write_text
from ferkit.images import IMAGE_SUFFIXES, load_image
from shared_data import VALIDATION, WILD, needs_wild

FACE = "happy/train__066_y_m_h_a.jpg"  # a 1592×1752 colour portrait
FACE2 = "neutral/train__71768_011.jpg"  # 295×360, one face
FERKIT = [sys.executable, "-m", "ferkit"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rec():
    from ferkit import Recognizer

    return Recognizer("fer3")


# ----------------------------------------------------------------------------------------------- 1. no invented face

SKIMAGE = ["coffee", "rocket", "chelsea", "cat", "page", "coins", "hubble_deep_field", "text", "clock", "retina",
           "immunohistochemistry", "colorwheel", "moon", "brick", "logo"]


def _skimage(name: str) -> np.ndarray:
    sd = pytest.importorskip("skimage.data")
    a = np.asarray(getattr(sd, name)())
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
    return a[:, :, :3] if a.ndim == 3 else a


def _synthetic(kind: str, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(h * w)
    if kind == "noise":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "blank":
        return np.full((h, w, 3), 200, np.uint8)
    blocks = rng.normal(128, 30, (h // 8 + 1, w // 8 + 1, 3)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:h, :w])


NO_FACE = [pytest.param(lambda n=n: _skimage(n), id=f"skimage-{n}") for n in SKIMAGE] + [
    pytest.param(lambda k=k, s=s: _synthetic(k, *s), id=f"{k}-{s[1]}x{s[0]}")
    for k in ("noise", "blank", "smooth") for s in ((48, 48), (480, 640), (1000, 1000))
] + [pytest.param(lambda: _synthetic("smooth", 3000, 4000), id="smooth-4000x3000")]


@pytest.mark.parametrize("make", NO_FACE)
def test_no_face_in_photos_without_faces(rec, make: Callable[[], np.ndarray]) -> None:
    # Before: the whole-image "face-crop fallback" labelled near-square textured images (noise, a page, a rocket) as
    # one face with score 0.0. Now a face needs detector evidence.
    assert rec.predict(make()).faces == []


@needs_wild
def test_no_face_through_the_cli_folder_and_video(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2

    d = tmp_path / "nofaces"
    d.mkdir()
    for n in ("coffee", "page", "rocket", "chelsea"):
        Image.fromarray(_skimage(n)).save(d / f"{n}.png")
    Image.fromarray(_synthetic("noise", 300, 300)).save(d / "noise.png")
    # a square video with nobody in it: a pan over the coffee photo (square frames used to get the fallback)
    coffee = _skimage("coffee")
    vw = cv2.VideoWriter(str(d / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (240, 240))
    for i in range(8):
        vw.write(cv2.cvtColor(np.ascontiguousarray(coffee[40:280, 20 * i:20 * i + 240]), cv2.COLOR_RGB2BGR))
    vw.release()
    assert main(["predict", str(d), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 5 + 8 and sum("frame" in e for e in data) == 8
    assert all(e["faces"] == [] for e in data), [e for e in data if e["faces"]]


@needs_wild
@pytest.mark.parametrize("rel", [FACE, FACE2, "sad/train__images_(2).jpg"])
def test_tight_web_crops_are_still_found_with_a_score(rec, rel: str) -> None:
    path = WILD / rel
    if not path.is_file():
        pytest.skip(f"{path} not found")
    faces = rec.predict(str(path)).faces
    assert len(faces) >= 1 and all(0.6 <= f.det_score <= 1.0 for f in faces)


def test_48px_dataset_crops_are_found_by_the_second_look(rec) -> None:
    files = sorted(VALIDATION.glob("*/*.jpg"))[::211][:30]
    if not files:
        pytest.skip("no fer2013 data")
    found = [bool(rec.predict(str(f)).faces) for f in files]
    assert sum(found) >= 0.9 * len(files)


@needs_wild
def test_det_score_in_every_format_and_no_detect_has_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = str(WILD / FACE2)
    assert main(["predict", photo, "--format", "json"]) == 0
    face = json.loads(capsys.readouterr().out)[0]["faces"][0]
    assert 0.6 <= face["det_score"] <= 1.0
    assert main(["predict", photo, "--format", "csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert float(row["det_score"]) == pytest.approx(face["det_score"], abs=1e-4)
    assert main(["predict", photo]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[8] == "det" and f"{face['det_score']:.2f}" in table[1]
    # --no-detect is the whole-image mode: the face is the whole photo and carries no detector score
    assert main(["predict", photo, "--no-detect", "--format", "json"]) == 0
    whole = json.loads(capsys.readouterr().out)[0]["faces"][0]
    assert "det_score" not in whole and whole["box"][:2] == [0, 0]
    # --min-det-score filters; the API takes the same
    assert main(["predict", photo, "--min-det-score", "0.999", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["faces"] == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--min-det-score", "1.5"], "min_det_score must be between 0 and 1"),
    (["--detect-size", "10"], "detect size must be between 32 and 16384"),
    (["--detector", "yunett"], "unknown detector 'yunett' (valid: yunet, mtcnn, whole); did you mean 'yunet'?"),
    (["--backend", "onx"], "invalid choice"),
    (["--model", "fer33"], "fer33"),
], ids=["min-det-score", "detect-size", "detector", "backend", "model"])
def test_bad_options_exit_2_with_one_line(argv: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          one_line_error: Callable[[str], str]) -> None:
    img = tmp_path / "x.png"
    Image.fromarray(_synthetic("smooth", 64, 64)).save(img)
    try:
        rc = main(["predict", str(img), *argv])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    if message == "invalid choice":
        assert message in err and "Traceback" not in err
    else:
        assert message in one_line_error(err)


@needs_wild
def test_detect_size_is_used(tmp_path: Path) -> None:
    from ferkit import Recognizer

    r = Recognizer("fer3", detect_size=800, min_det_score=0.7)
    assert r.detector.detect_size == 800 and r.detector.working_side(4000, 3000) == 800 and r.min_det_score == 0.7
    assert all(f.det_score >= 0.7 for f in r.predict(str(WILD / FACE2)).faces)


@needs_wild
def test_faces_in_a_large_group_photo(rec) -> None:
    # Before: detection always ran at 400 px, so 100-px faces in a 4000×3000 photo were 10 px there: 0 of 375 found.
    photo = np.asarray(Image.open(WILD / FACE2).convert("RGB"))
    canvas = np.full((3000, 4000, 3), (110, 120, 100), np.uint8)
    placed = []
    for i in range(24):
        x, y = 150 + 620 * (i % 6), 200 + 680 * (i // 6)
        w = 100 + 2 * i  # faces ~80-130 px wide
        h = round(w * photo.shape[0] / photo.shape[1])
        canvas[y:y + h, x:x + w] = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
        placed.append((x, y, w, h))
    faces = rec.predict(canvas).faces
    hit = sum(any(x <= f.box[0] + f.box[2] / 2 < x + w and y <= f.box[1] + f.box[3] / 2 < y + h for f in faces)
              for x, y, w, h in placed)
    assert hit >= 0.9 * len(placed) and len(faces) <= len(placed)


# ---------------------------------------------------------------------------------------------- 2. never lose a file

@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    if not WILD.is_dir():
        pytest.skip(f"{WILD} not found")
    d = tmp_path / "photos"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    shutil.copy(WILD / FACE2, d / "a" / "x.jpg")
    shutil.copy(WILD / FACE2, d / "b" / "x.jpg")
    shutil.copy(WILD / FACE2, d / "top.jpg")
    return d


def test_save_annotated_refuses_the_input_folder(photos: Path, capsys: pytest.CaptureFixture[str],
                                                 one_line_error: Callable[[str], str]) -> None:
    # Before: the originals were overwritten with their annotated copies, exit 0.
    before = {p: md5(p) for p in photos.rglob("*.jpg")}
    for inp, target in ((photos, photos), (photos / "a" / "x.jpg", photos / "a"), (photos / "b", photos / "b")):
        rc = main(["predict", str(inp), "--save-annotated", str(target), "--format", "json"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and "would overwrite the input" in one_line_error(err)
    assert {p: md5(p) for p in photos.rglob("*.jpg")} == before


def test_save_annotated_mirrors_paths_and_never_collides(photos: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a/x.jpg and b/x.jpg given as files wrote one x.jpg over the other.
    for inputs, want in (([photos], ["a/x.jpg", "b/x.jpg", "top.jpg"]),
                         ([photos / "a" / "x.jpg", photos / "b" / "x.jpg"], ["x-2.jpg", "x.jpg"])):
        out = tmp_path / f"ann{len(want)}"
        assert main(["predict", *map(str, inputs), "--save-annotated", str(out), "--format", "jsonl"]) == 0
        err = capsys.readouterr().err
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert written == want  # mirrored, told apart, and no temporary files left
        assert f"{len(want)} annotated image(s) written under {out}" in err
        assert all(Image.open(out / w).size == Image.open(photos / "top.jpg").size for w in written)


def test_atomic_writes_leave_nothing_half_written(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    os.chmod(target, 0o640)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o640  # mode kept
    with atomic_path(tmp_path / "plot.png") as tmp:  # the suffix survives: libraries pick the format from it
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        Image.new("RGB", (4, 4)).save(tmp)
    assert Image.open(tmp_path / "plot.png").format == "PNG"


# ------------------------------------------------------------------------------------- 4. nothing silently skipped

def test_folder_reads_every_format_and_videos_and_skips_hidden(photos: Path, capsys: pytest.CaptureFixture[str],
                                                               ) -> None:
    import cv2

    im = Image.open(photos / "top.jpg")
    im.save(photos / "c.avif")  # before: read when named, skipped in folders
    im.save(photos / "d.webp")
    frame = cv2.cvtColor(np.asarray(im.resize((240, 288))), cv2.COLOR_RGB2BGR)
    vw = cv2.VideoWriter(str(photos / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (240, 288))
    for _ in range(3):
        vw.write(frame)
    vw.release()
    (photos / "._top.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata, not a JPEG
    (photos / ".thumbnails").mkdir()
    shutil.copy(photos / "top.jpg", photos / ".thumbnails" / "t.jpg")
    assert main(["predict", str(photos), "--format", "json"]) == 0
    files = [Path(e["file"]).relative_to(photos).as_posix() for e in json.loads(capsys.readouterr().out)]
    assert files == ["a/x.jpg", "b/x.jpg", "c.avif", "clip.avi", "clip.avi", "clip.avi", "d.webp", "top.jpg"]


def test_every_listed_suffix_is_one_pillow_reads() -> None:
    Image.init()
    assert IMAGE_SUFFIXES <= set(Image.registered_extensions())


@needs_wild
def test_animated_gif_frames_are_all_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    face = Image.open(WILD / FACE2).convert("RGB")
    blank = Image.new("RGB", face.size, (128, 128, 128))
    face.save(tmp_path / "anim.gif", save_all=True, append_images=[blank, face], duration=100)
    assert main(["predict", str(tmp_path / "anim.gif"), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["frame"] for e in data] == [0, 1, 2] and [len(e["faces"]) for e in data] == [1, 0, 1]


def _as_other_user() -> list[str]:
    """A command prefix that runs as an unprivileged user (root reads everything); empty when not root."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot test permissions")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # That user runs ferkit from this checkout, so every folder above it must be open to others (a `mktemp -d`
    # parent is 0700, for one): say so rather than fail on something the test is not about.
    probe = subprocess.run([*prefix, *FERKIT, "--version"], capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"another user cannot run ferkit from this checkout (is a folder above it 0700?): "
                    f"{(probe.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return prefix


@needs_wild
def test_unreadable_folder_and_file_are_reported() -> None:
    # Before: an unreadable sub-folder was dropped silently; a path inside one gave a PermissionError traceback;
    # an unreadable file said "cannot identify image file".
    import tempfile

    run_as = _as_other_user()
    tmp_path = Path(tempfile.mkdtemp(prefix="ferkit-perm-"))  # not under pytest's 0700 tree: the other user walks it
    root = tmp_path / "shared"
    (root / "locked").mkdir(parents=True)
    shutil.copy(WILD / FACE2, root / "ok.jpg")
    shutil.copy(WILD / FACE2, root / "locked" / "x.jpg")
    shutil.copy(WILD / FACE2, root / "secret.jpg")
    for p in (tmp_path, root):
        p.chmod(0o755)
    (root / "ok.jpg").chmod(0o644)
    (root / "secret.jpg").chmod(0o000)
    (root / "locked").chmod(0o000)
    # the other user needs a model it can read, whatever the checkout's file modes: the bundled ONNX file, copied
    model = tmp_path / "fer3.onnx"
    shutil.copy(Path(__import__("ferkit").__file__).parent / "weights" / "fer3.onnx", model)
    model.chmod(0o644)
    try:
        env = {**os.environ, "HOME": str(tmp_path), "FERKIT_CACHE_DIR": str(tmp_path / "cache")}
        cmd = [*FERKIT, "predict", str(root), str(root / "locked" / "x.jpg"), "--model", str(model),
               "--format", "jsonl"]
        r = subprocess.run([*run_as, *cmd], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    finally:
        (root / "locked").chmod(0o755)
        (root / "secret.jpg").chmod(0o644)
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    els = {Path(e["file"]).name: e for e in map(json.loads, r.stdout.splitlines())}
    assert els["locked"]["error"] == "cannot read the folder (permission denied)"
    assert els["secret.jpg"]["error"] == "permission denied"
    assert els["x.jpg"]["error"] == "permission denied"
    assert len(els["ok.jpg"]["faces"]) == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ferkit: error: ")]
    assert len(errors) == 3 and all("permission denied" in ln for ln in errors)


@pytest.mark.parametrize(("array", "expected"), [
    (np.full((16, 16), 65535, np.uint16), 255),
    (np.full((16, 16), 32768, np.uint16), 128),  # before: clipped to 255
    (np.full((16, 16), 200, np.uint16), 1),  # a dark 16-bit image stays dark, as the same 16-bit PNG reads
    (np.full((16, 16), 0.5, np.float32), 128),
    (np.full((16, 16), True), 255),
], ids=["u16-max", "u16-half", "u16-dark", "float", "bool"])
def test_arrays_scale_like_files(array: np.ndarray, expected: int, tmp_path: Path) -> None:
    assert int(load_image(array).max()) == expected
    if array.dtype == np.uint16:
        Image.fromarray(array).save(tmp_path / "x.png")
        assert int(load_image(tmp_path / "x.png").max()) == expected


def test_nan_array_is_a_clear_error_without_warnings(rec) -> None:
    a = np.full((64, 64, 3), 0.5, np.float32)
    a[3, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="NaN"):
            rec.predict(a)


# --------------------------------------------------------------------------------- 5. no tracebacks, right exit codes

def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for line in ("0    success", "1    the command ran but something failed", "2    the command was refused",
                 "130  interrupted", "141  the output pipe was closed"):
        assert line in out


@needs_wild
def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    for i in range(12):
        shutil.copy(WILD / FACE2, tmp_path / f"p{i:02d}.jpg")
    # --batch-size 1: one element per image, so writing goes on well after `head` has gone (a whole run's output
    # would otherwise fit in the pipe's buffer before head exits, and ferkit would rightly end with 0)
    for fmt in ("json", "csv"):
        r = subprocess.run(f"{' '.join(FERKIT)} predict {tmp_path} --batch-size 1 --format {fmt} | head -1; "
                           "echo status=${PIPESTATUS[0]} >&2", shell=True, executable="/bin/bash",
                           capture_output=True, text=True, timeout=120)
        assert r.stdout.count("\n") == 1 and r.stderr.strip() == "status=141", r.stderr


@pytest.mark.parametrize(("call", "kind", "suggestion"), [
    (lambda: __import__("ferkit.infer.detect", fromlist=["x"]).get_detector("yunett"), "detector", "yunet"),
    (lambda: __import__("ferkit").Recognizer(backend="onx"), "backend", "onnx"),
    (lambda: __import__("ferkit.models", fromlist=["x"]).create_model("fastcn", num_classes=3), "model", "fastcnn"),
    (lambda: __import__("ferkit.evaluate", fromlist=["x"]).tta_views(None, "flipp"), "tta", "flip"),
], ids=["detector", "backend", "model", "tta"])
def test_unknown_names_raise_one_error_class(call: Callable[[], object], kind: str, suggestion: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        call()
    e = info.value
    assert isinstance(e, FerkitError) and isinstance(e, ValueError) and e.exit_code == 2
    assert e.kind == kind and e.suggestion == suggestion and suggestion in str(e)


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from ferkit import Recognizer

    with pytest.raises(DeviceError, match="no CUDA device is available"):
        Recognizer(device="cuda")
    with pytest.raises(DeviceError, match="not a device name"):
        Recognizer(device="gpu")


@needs_wild
def test_misleading_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                             one_line_error: Callable[[str], str]) -> None:
    from ferkit.data.sources import find_dataset

    loose = tmp_path / "photos"
    loose.mkdir()
    for i in range(4):
        shutil.copy(WILD / FACE2, loose / f"{i}.jpg")
    # before: "empty folder" for a folder of four JPEGs (export --data, evaluate --data, train --data)
    with pytest.raises(DatasetError, match="4 image\\(s\\) but no class folders"):
        find_dataset(loose, ["happy", "sad", "neutral"])
    # before: evaluate from another directory failed on the stored relative path ../shared/data/fer2013
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model", "fer3"]) == 2
    assert "give the dataset with --data" in one_line_error(capsys.readouterr().err)
