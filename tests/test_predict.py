"""``ferkit predict`` (``run_predict``) on real photos, folders and a real video: every output format parsed back,
bad inputs reported one line each while the rest is still processed."""

from __future__ import annotations

import csv
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferkit.cli.predict import run_predict
from ferkit.modelfile import ModelMeta, save_model
from ferkit.models import create_model
from shared_data import WILD

CLASSES = ("happy", "sad", "neutral")
FACES = ("happy/train__istock1_10.jpg", "sad/train__119677-765849.jpg", "neutral/train__istock1_106.jpg")

pytestmark = pytest.mark.skipif(not all((WILD / f).is_file() for f in FACES), reason=f"no wild-dev photos at {WILD}")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    net = create_model("fastcnn", num_classes=3)
    return str(save_model(tmp_path_factory.mktemp("model") / "m.safetensors", net,
                          ModelMeta(arch="fastcnn", classes=CLASSES, name="test")))


def predict(inputs: list, model: str, **kw) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("backend", "torch")  # the in-memory ONNX conversion is tested in test_recognizer
    rc = run_predict([str(i) for i in inputs], model=model, out=out, err=err, **kw)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``photos/a_happy.jpg``, ``photos/sub/b_sad.jpg``, ``photos/sub/deeper/c_neutral.jpg`` and a non-image file
    (which a folder scan skips)."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    dests = [root / "a_happy.jpg", root / "sub" / "b_sad.jpg", root / "sub" / "deeper" / "c_neutral.jpg"]
    for src, dst in zip(FACES, dests):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((WILD / src).read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


def big_png(path: Path, side: int = 30000) -> Path:
    """A valid 1-bit PNG of ``side``×``side`` pixels (all black) written in well under a second (112 MB of pixel
    rows compress to ~0.5 MB), without ever holding the image in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    rows = (b"\x00" * (1 + (side + 7) // 8)) * 1000
    idat = b"".join([comp.compress(rows) for _ in range(side // 1000)] + [comp.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photos in awkward encodings (which must work) and broken or unusable files (which must be refused)."""
    d = tmp_path_factory.mktemp("odd")
    face = Image.open(WILD / FACES[0]).convert("RGB")
    jpg = (WILD / FACES[1]).read_bytes()
    f = {}
    f["gray16.png"] = d / "gray16.png"
    Image.fromarray(np.asarray(face.convert("L")).astype(np.uint16) * 257).save(f["gray16.png"])
    assert Image.open(f["gray16.png"]).mode.startswith("I")
    f["cmyk.jpg"] = d / "cmyk.jpg"
    face.convert("CMYK").save(f["cmyk.jpg"])
    f["palette.png"] = d / "palette.png"
    face.convert("P", palette=Image.Palette.ADAPTIVE).save(f["palette.png"])
    f["rgba.png"] = d / "rgba.png"
    rgba = face.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(f["rgba.png"])
    # and the bad ones
    f["notes.txt"] = d / "notes.txt"
    f["notes.txt"].write_text("a text file, not an image\n")
    f["truncated.jpg"] = d / "truncated.jpg"
    f["truncated.jpg"].write_bytes(jpg[: len(jpg) // 2])
    f["empty.jpg"] = d / "empty.jpg"
    f["empty.jpg"].write_bytes(b"")
    f["tiny.png"] = d / "tiny.png"
    Image.new("RGB", (1, 1), (128, 64, 32)).save(f["tiny.png"])
    f["huge.png"] = big_png(d / "huge.png")
    f["broken.mp4"] = d / "broken.mp4"
    f["broken.mp4"].write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else of a video" * 10)
    f["empty_folder"] = d / "empty_folder"
    (f["empty_folder"] / "sub").mkdir(parents=True)
    (f["empty_folder"] / "sub" / "readme.md").write_text("no images here")
    return f


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 fps MJPEG .avi of 7 frames: the three real faces, moving across a 320×240 frame."""
    import cv2

    path = tmp_path_factory.mktemp("video") / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    assert w.isOpened()
    faces = [np.asarray(Image.open(WILD / f).convert("RGB").resize((150, 150))) for f in FACES]
    for i in range(7):
        frame = np.full((240, 320, 3), 180, np.uint8)
        x = 10 + 20 * i
        frame[45:195, x:x + 150] = faces[i % 3]
        w.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    w.release()
    return path


# -- formats ------------------------------------------------------------------------------------------------------

def test_json_is_one_array(model: str, photos: Path) -> None:
    files = [photos / "a_happy.jpg", photos / "sub" / "b_sad.jpg"]
    rc, out, err = predict(files, model, fmt="json")
    assert rc == 0 and err == ""
    data = json.loads(out)
    assert isinstance(data, list) and [e["file"] for e in data] == [str(f) for f in files]
    for el in data:
        assert set(el) == {"file", "faces"} and len(el["faces"]) == 1
        face = el["faces"][0]
        assert set(face) == {"box", "label", "score", "scores", "det_score"} and 0.6 <= face["det_score"] <= 1
        assert len(face["box"]) == 4 and all(isinstance(v, int) for v in face["box"])
        assert face["label"] in CLASSES and list(face["scores"]) == list(CLASSES)
        assert face["score"] == max(face["scores"].values())
        assert sum(face["scores"].values()) == pytest.approx(1, abs=1e-5)


def test_jsonl_csv_and_table_carry_the_same_results(model: str, photos: Path) -> None:
    _, js, _ = predict([photos], model, fmt="json")
    ref = json.loads(js)

    rc, out, _ = predict([photos], model, fmt="jsonl")
    assert rc == 0 and [json.loads(line) for line in out.splitlines()] == ref

    rc, out, _ = predict([photos], model, fmt="csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0
    assert list(rows[0]) == ["file", "frame", "time", "x", "y", "w", "h", "label", "score", "det_score", *CLASSES]
    assert [r["file"] for r in rows] == [e["file"] for e in ref]
    for r, e in zip(rows, ref):
        f = e["faces"][0]
        assert [int(r[k]) for k in "xywh"] == f["box"] and r["label"] == f["label"]
        assert r["frame"] == r["time"] == ""
        assert float(r["score"]) == pytest.approx(f["score"], abs=1e-4)
        assert [float(r[c]) for c in CLASSES] == pytest.approx(list(f["scores"].values()), abs=1e-4)

    rc, out, _ = predict([photos], model, fmt="table")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["file", "frame", "time"] and len(lines) == 1 + len(ref)
    for line, e in zip(lines[1:], ref):
        f = e["faces"][0]
        assert line.startswith(e["file"]) and f["label"] in line.split()
        assert ",".join(map(str, f["box"])) in line and f"{f['score']:.3f}" in line
    widths = {line.index(",".join(map(str, e["faces"][0]["box"]))) for line, e in zip(lines[1:], ref)}
    assert len(widths) == 1, "table columns are not aligned"


def test_folder_is_searched_recursively_in_sorted_order(model: str, photos: Path) -> None:
    rc, out, err = predict([photos], model, fmt="jsonl")
    files = [json.loads(line)["file"] for line in out.splitlines()]
    assert rc == 0 and err == ""
    assert files == [str(photos / "a_happy.jpg"), str(photos / "sub" / "b_sad.jpg"),
                     str(photos / "sub" / "deeper" / "c_neutral.jpg")]  # notes.txt is not an image: skipped


def test_no_detect_boxes_the_whole_image(model: str, photos: Path) -> None:
    rc, out, _ = predict([photos / "a_happy.jpg"], model, fmt="json", no_detect=True)
    w, h = Image.open(photos / "a_happy.jpg").size
    assert rc == 0 and json.loads(out)[0]["faces"][0]["box"] == [0, 0, w, h]


def test_no_face_gives_empty_list(model: str, tmp_path: Path) -> None:
    Image.fromarray(np.full((480, 640, 3), 90, np.uint8)).save(tmp_path / "wall.png")
    for fmt in ("json", "table"):
        rc, out, _ = predict([tmp_path / "wall.png"], model, fmt=fmt)
        assert rc == 0
        if fmt == "json":
            assert json.loads(out) == [{"file": str(tmp_path / "wall.png"), "faces": []}]
        else:
            assert "no face" in out


def test_batch_size_does_not_change_results(model: str, photos: Path) -> None:
    a = predict([photos], model, fmt="json", batch_size=1)[1]
    b = predict([photos], model, fmt="json", batch_size=64)[1]
    assert _same(json.loads(a), json.loads(b))


def _same(a: list, b: list) -> bool:
    assert [e["file"] for e in a] == [e["file"] for e in b]
    for x, y in zip(a, b):
        assert [f["box"] for f in x["faces"]] == [f["box"] for f in y["faces"]]
        for fx, fy in zip(x["faces"], y["faces"]):
            assert fx["scores"] == pytest.approx(fy["scores"], abs=1e-5)
    return True


def test_onnx_backend_through_predict(model: str, photos: Path) -> None:
    pytest.importorskip("onnxruntime")
    a = json.loads(predict([photos], model, fmt="json", backend="onnx")[1])
    b = json.loads(predict([photos], model, fmt="json", backend="torch")[1])
    _same(a, b)


def test_save_annotated_writes_each_image(model: str, photos: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "annotated"
    rc, _, _ = predict([photos, photos / "a_happy.jpg"], model, fmt="json", save_annotated=str(out_dir))
    assert rc == 0
    written = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    assert written == ["a_happy.jpg", "sub/b_sad.jpg", "sub/deeper/c_neutral.jpg"]
    orig = np.asarray(Image.open(photos / "sub" / "b_sad.jpg").convert("RGB")).astype(int)
    ann = np.asarray(Image.open(out_dir / "sub" / "b_sad.jpg").convert("RGB")).astype(int)
    assert ann.shape == orig.shape and np.abs(ann - orig).max() > 100, "no box drawn"


# -- video --------------------------------------------------------------------------------------------------------

def test_video_frames_with_frame_and_time(model: str, video: Path) -> None:
    rc, out, err = predict([video], model, fmt="json")
    data = json.loads(out)
    assert rc == 0 and err == ""
    assert [e["frame"] for e in data] == list(range(7))
    assert [e["time"] for e in data] == pytest.approx([i / 10 for i in range(7)])
    assert all(e["file"] == str(video) for e in data)
    assert sum(len(e["faces"]) == 1 for e in data) >= 6, data
    xs = [e["faces"][0]["box"][0] for e in data if e["faces"]]
    assert xs == sorted(xs), "the face moves right from frame to frame"


def test_video_every_nth_frame_and_csv(model: str, video: Path) -> None:
    rc, out, _ = predict([video], model, fmt="jsonl", every=3)
    assert rc == 0 and [json.loads(line)["frame"] for line in out.splitlines()] == [0, 3, 6]
    rc, out, _ = predict([video], model, fmt="csv", every=3)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {int(r["frame"]) for r in rows} <= {0, 3, 6} and rows
    assert all(float(r["time"]) == pytest.approx(int(r["frame"]) / 10) for r in rows)


def test_video_annotated_frames(model: str, video: Path, tmp_path: Path) -> None:
    rc, _, _ = predict([video], model, fmt="json", every=2, save_annotated=str(tmp_path / "ann"))
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "ann").iterdir())
    assert names == [f"clip_f{i:06d}.jpg" for i in (0, 2, 4, 6)]
    assert Image.open(tmp_path / "ann" / names[0]).size == (320, 240)


# -- bad inputs ---------------------------------------------------------------------------------------------------

WORKS = ["gray16.png", "cmyk.jpg", "palette.png", "rgba.png"]
FAILS = {
    "notes.txt": "cannot identify image",
    "truncated.jpg": "truncated",
    "empty.jpg": "empty",
    "tiny.png": "too small",
    "huge.png": "too large",
    "broken.mp4": "cannot open video",
    "empty_folder": "no images",
    "missing.jpg": "no such file",
}


def test_bad_inputs_are_reported_and_the_rest_processed(model: str, odd_files: dict[str, Path], photos: Path,
                                                        tmp_path: Path, one_line_error) -> None:
    missing = tmp_path / "missing.jpg"
    inputs = [photos / "a_happy.jpg"] + [odd_files[n] for n in WORKS] + \
             [odd_files[n] if n != "missing.jpg" else missing for n in FAILS] + [photos / "sub" / "b_sad.jpg"]
    t0 = time.perf_counter()
    rc, out, err = predict(inputs, model, fmt="json")
    assert time.perf_counter() - t0 < 20
    assert rc == 1
    data = json.loads(out)
    assert [e["file"] for e in data] == [str(i) for i in inputs]
    by_name = {Path(e["file"]).name: e for e in data}
    for n in ["a_happy.jpg", "b_sad.jpg", *WORKS]:
        assert "error" not in by_name[n], by_name[n]
        assert len(by_name[n]["faces"]) == 1, n
    err_lines = err.strip().splitlines()
    assert len(err_lines) == len(FAILS)
    for n, why in FAILS.items():
        el = by_name[n]
        assert "faces" not in el and why in el["error"] and "\n" not in el["error"], el
        line = next(ln for ln in err_lines if f" {inputs[[Path(i).name for i in inputs].index(n)]}: " in ln)
        assert one_line_error(line) and why in line


@pytest.mark.parametrize("name", list(FAILS))
def test_each_bad_input_alone(model: str, odd_files: dict[str, Path], tmp_path: Path, name: str,
                              one_line_error) -> None:
    path = odd_files.get(name, tmp_path / name)
    for fmt in ("table", "jsonl"):
        rc, out, err = predict([path], model, fmt=fmt)
        assert rc == 1
        line = one_line_error(err)
        assert line.startswith(f"ferkit: error: {path}: ") and FAILS[name] in line
        if fmt == "table":
            assert "error: " + FAILS[name] in out or FAILS[name] in out
        else:
            assert json.loads(out)["error"]


def test_huge_image_is_refused_quickly(model: str, odd_files: dict[str, Path]) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rc, _, err = predict([odd_files["huge.png"]], model, fmt="json")
    assert rc == 1 and "too large" in err
    assert time.perf_counter() - t0 < 5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB"


@pytest.mark.parametrize("make", [
    lambda d: d / "missing.safetensors",
    lambda d: (d / "notes.safetensors").write_text("hello") and d / "notes.safetensors",
    lambda d: (d / "photo.onnx").write_bytes((WILD / FACES[0]).read_bytes()) and d / "photo.onnx",
], ids=["missing", "not-safetensors", "not-onnx"])
def test_bad_model_is_one_line_and_exit_2(photos: Path, tmp_path: Path, make, one_line_error) -> None:
    path = make(tmp_path)
    rc, out, err = predict([photos / "a_happy.jpg"], str(path), fmt="json")
    assert rc == 2 and out == ""  # refused before any work (ferkit --help: exit status)
    assert str(path) in one_line_error(err)


def test_bad_options(model: str, photos: Path, one_line_error) -> None:
    for kw, why in [({"every": 0}, "--every"), ({"batch_size": 0}, "--batch-size"), ({"fmt": "xml"}, "format"),
                    ({"detector": "yunett"}, "yunet")]:
        rc, out, err = predict([photos], model, **kw)
        assert rc == 2 and out == "" and why in one_line_error(err)


def test_cli_entry_point(model: str, photos: Path, capsys: pytest.CaptureFixture) -> None:
    from ferkit.cli import main

    rc = main(["predict", str(photos / "a_happy.jpg"), "--model", model, "--format", "json", "--backend", "torch"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data[0]["file"] == str(photos / "a_happy.jpg") and len(data[0]["faces"]) == 1
