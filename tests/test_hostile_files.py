"""Hostile and careless files against the real ``ferkit`` command (issue 26: 2, 4, 5, 8, 9, 11, 12, 18-25, 28-30).

Every input is generated here: FIFOs and device nodes where files are expected, a TIFF whose second page is a
144-megapixel bomb, an APNG whose header declares a million frames, a float TIFF with a NaN pixel, names that are not
UTF-8, symbolic link loops, output paths that are files, folders or devices, a full disk (a file-size limit) and a
SIGTERM while a video is written. Each case runs ``python -m ferkit`` in a child process and checks, through
:func:`hostile.check`: the exit status, one ``ferkit: error:`` line per bad input naming it and the problem, no
traceback or raw library output, bounded memory, no NaN in JSON; and that no input file was lost or changed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hostile import ASTRONAUT, assert_unchanged, check, face_rgb, no_nan, run_cli, snapshot, write_clip
from PIL import Image
from shared_data import FER_DIR, needs_fer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    p = tmp_path / "in" / "face.jpg"
    p.parent.mkdir()
    p.write_bytes(ASTRONAUT.read_bytes())
    return p


# -- non-regular files: FIFOs, devices, links, standard input (8, 25) ----------------------------------------------

def test_fifos_in_a_folder_are_skipped_with_one_line_each(photo: Path) -> None:
    d = photo.parent
    for name in ("pipe.png", "pipe.gif", "pipe.tif", "pipe.webp", "pipe.mp4"):
        os.mkfifo(d / name)
    before = snapshot(d)
    r = run_cli(["predict", d, "--format", "json"], cwd=d.parent, timeout=60)  # used to hang forever
    check(r, 1, errors=5, says="is a FIFO (named pipe), not a regular file", json_out=True)
    els = json.loads(r.out)
    assert [e["file"].rsplit("/", 1)[-1] for e in els if "faces" in e] == ["face.jpg"] and els[-1]["faces"]
    assert_unchanged(before, d)


@pytest.mark.parametrize("kind", ["fifo", "device", "loop", "broken-link", "dev-stdin"])
def test_named_non_files_say_what_they_are(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(tmp_path / "clip.mp4")
        arg, says = "clip.mp4", "is a FIFO (named pipe)"
    elif kind == "device":
        arg, says = "/dev/null", "/dev/null: is a character device, not a regular file"
    elif kind == "loop":
        os.symlink("x.jpg", tmp_path / "x.jpg")
        arg, says = "x.jpg", "x.jpg: a symbolic link loop"  # said "no such file"
    elif kind == "broken-link":
        os.symlink("gone.jpg", tmp_path / "x.jpg")
        arg, says = "x.jpg", "x.jpg: a broken symbolic link (to gone.jpg"
    else:  # a pipe on standard input: said "empty file (0 bytes)"
        arg, says = "/dev/stdin", "give '-'"
    r = run_cli(["predict", arg], cwd=tmp_path, timeout=60, stdin=b"" if kind == "dev-stdin" else None)
    check(r, 1, says=says)


def test_track_refuses_a_fifo_named_like_a_video(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "clip.mp4")
    r = run_cli(["track", "clip.mp4", "--out", "out"], cwd=tmp_path, timeout=60)  # OpenCV blocked on it for ever
    check(r, 1, says="clip.mp4: is a FIFO (named pipe), not a regular file")


def test_dash_reads_one_image_from_standard_input(tmp_path: Path) -> None:
    r = run_cli(["predict", "-", "--format", "json"], cwd=tmp_path, stdin=ASTRONAUT.read_bytes())
    check(r, 0, errors=0, json_out=True)
    (el,) = json.loads(r.out)
    assert el["file"] == "-" and len(el["faces"]) == 1
    r = run_cli(["predict", "-"], cwd=tmp_path, stdin=b"")
    check(r, 1, says="-: standard input is empty (0 bytes)")


# -- bombs and odd pixels (9, 22, 28, 2) -------------------------------------------------------------------------

def test_a_later_tiff_page_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    small = Image.new("L", (64, 64), 128)
    bomb = Image.new("1", (12000, 12000), 0)  # 144 MP: 18 MB as bits, 144 MB as gray, 432 MB as RGB
    small.save(tmp_path / "pages.tif", save_all=True, append_images=[bomb], compression="tiff_deflate")
    assert (tmp_path / "pages.tif").stat().st_size < 100_000
    r = run_cli(["predict", "pages.tif", "--format", "jsonl"], cwd=tmp_path)
    check(r, 1, says="pages.tif: frame 2: image too large (12000×12000", json_out=True)
    assert r.rss_mb < 400, f"{r.rss_mb:.0f} MB: the page was decoded"


def _apng(path: Path, frames: int, declared: int) -> Path:
    ims = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(frames)]
    ims[0].save(path, save_all=True, append_images=ims[1:])
    b = bytearray(path.read_bytes())
    i = b.index(b"acTL")
    b[i + 4:i + 8] = struct.pack(">I", declared)
    b[i + 12:i + 16] = struct.pack(">I", zlib.crc32(bytes(b[i:i + 12])))
    path.write_bytes(bytes(b))
    return path


def test_an_apng_header_does_not_set_the_frame_count(tmp_path: Path) -> None:
    from ferkit import Recognizer

    p = _apng(tmp_path / "anim.png", 2, 1_000_000)
    assert Recognizer().predict(p).frames_total == 2  # said 1,000,000
    r = run_cli(["predict", "anim.png", "--format", "json"], cwd=tmp_path)
    check(r, 0, errors=0, json_out=True)
    assert [e["frame"] for e in json.loads(r.out)] == [0, 1]


def test_a_float_tiff_with_a_nan_pixel_is_refused(tmp_path: Path) -> None:
    a = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    a[3, 3] = np.nan
    Image.fromarray(a, "F").save(tmp_path / "nan.tif")
    r = run_cli(["predict", "nan.tif"], cwd=tmp_path)  # became an all-black image: "no face"
    check(r, 1, says="nan.tif: float image holds 1 NaN or infinite pixel(s)")


def test_video_frames_over_the_pixel_limit_are_refused(tmp_path: Path) -> None:
    write_clip(tmp_path / "clip.mp4", 3)  # 320×240 = 76,800 pixels a frame
    r = run_cli(["predict", "clip.mp4"], cwd=tmp_path, env={"FERKIT_MAX_PIXELS": "50000"})
    check(r, 1, says="video frames too large")


# -- names (12) and library warnings (23) ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["table", "json", "jsonl", "csv"])
def test_a_name_that_is_not_utf8_is_printed_escaped(tmp_path: Path, fmt: str) -> None:
    name = b"caf\xe9-\xff.jpg"  # Latin-1 bytes: not UTF-8
    (Path(os.fsdecode(tmp_path)) / os.fsdecode(name)).write_bytes(ASTRONAUT.read_bytes())
    r = run_cli(["predict", ".", "--format", fmt], cwd=tmp_path, env={"PYTHONIOENCODING": "utf-8"})
    check(r, 0, errors=0, json_out=fmt in ("json", "jsonl"))
    shown = r.out if fmt in ("table", "csv") else json.dumps([json.loads(x) for x in r.out.splitlines()
                                                              if x.strip() not in ("[", "]")] if fmt == "jsonl"
                                                             else json.loads(r.out))
    assert "caf\\xe9-\\xff.jpg" in shown.replace("\\\\", "\\"), r.out


def test_library_warnings_come_out_as_ferkit_lines(tmp_path: Path) -> None:
    im = Image.open(ASTRONAUT)
    # An EXIF entry pointing past the end of its block: Pillow warns while reading it.
    exif = (b"Exif\0\0II*\0\x08\0\0\0\x02\0" + struct.pack("<HHII", 0x0112, 3, 1, 1)
            + struct.pack("<HHII", 0x010E, 2, 1000, 100) + b"\0\0\0\0")
    im.save(tmp_path / "exif.jpg", exif=exif)
    r = run_cli(["predict", "exif.jpg"], cwd=tmp_path, env={"PYTHONWARNINGS": "always"})
    check(r, 0, errors=0, says="ferkit: UserWarning: Tag data larger than file")  # was 2 raw lines with a path


def test_warnings_become_one_log_record_in_the_cli_and_the_server(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import warnings

    from ferkit._warnings import route_warnings

    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="py.warnings"):
        warnings.simplefilter("always")
        undo = route_warnings()
        try:
            warnings.warn("Corrupt EXIF data.\n  Expecting 8 bytes", UserWarning, stacklevel=1)
        finally:
            undo()
    assert [r.getMessage() for r in caplog.records if r.name == "py.warnings"] == [
        "UserWarning: Corrupt EXIF data. Expecting 8 bytes"]
    pytest.importorskip("fastapi")
    from ferkit.serve.observe import log_config

    for fmt in ("text", "json"):  # the server's workers log them with the request ID
        assert log_config("info", fmt)["loggers"]["py.warnings"]["handlers"] == ["main"]


# -- output paths (4, 11, 18, 19, 20) ----------------------------------------------------------------------------

def _node(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
        except PermissionError:
            pytest.skip("making a device node needs root")
    return path


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_every_atomic_writer_replaces_regular_files_only(tmp_path: Path, kind: str) -> None:
    from ferkit.errors import OutputError
    from ferkit.fsutil import atomic_path, atomic_write_text

    target = tmp_path / "out.json"
    if kind == "folder":
        target.mkdir()
    else:
        _node(target, kind)
    mode = target.lstat().st_mode
    with pytest.raises(OutputError, match="out.json: is a .*; refusing to replace it"):
        atomic_write_text(target, "{}")
    with pytest.raises(OutputError):
        with atomic_path(target) as tmp:
            tmp.write_text("{}")
    assert target.lstat().st_mode == mode and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    atomic_write_text(tmp_path / "plain.json", "{}")  # a regular file (or none) is replaced as before
    atomic_write_text(tmp_path / "plain.json", "[]")
    assert (tmp_path / "plain.json").read_text() == "[]"


@pytest.mark.parametrize("fmt", ["onnx", "ferkit"])
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_export_never_replaces_a_device_or_fifo(tmp_path: Path, fmt: str, kind: str) -> None:
    out = _node(tmp_path / "out.onnx", kind)
    mode = out.stat().st_mode
    args = ["export", "--model", "fer3", "--out", "out.onnx"] + (["--format", "ferkit", "--classes", "happy,sad"]
                                                                   if fmt == "ferkit" else [])
    r = run_cli(args, cwd=tmp_path)
    check(r, 2, says="out.onnx: is a ")
    assert out.lstat().st_mode == mode  # still the node, not a regular file renamed over it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_export_refuses_to_write_over_its_input_model(tmp_path: Path) -> None:
    from ferkit.modelfile import bundled_models

    model = tmp_path / "m.safetensors"
    model.write_bytes(bundled_models()["fer3"].read_bytes())
    before = snapshot(tmp_path)
    r = run_cli(["export", "--format", "ferkit", "--model", "m.safetensors", "--out", "./m.safetensors",
                 "--classes", "happy,sad"], cwd=tmp_path)
    check(r, 2, says="is the input model m.safetensors")
    assert_unchanged(before, tmp_path)


@needs_fer
def test_an_interrupted_ferkit_export_leaves_nothing_at_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from ferkit import evaluate
    from ferkit.export import restrict_classes

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C while it calibrates (fer3 learnt the FER+ votes: it is calibrated on the validation faces' votes)
    monkeypatch.setattr(evaluate, "model_logits", interrupted)
    monkeypatch.setattr(evaluate, "predict_logits", interrupted)
    out = tmp_path / "out" / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        restrict_classes("fer3", ["happy", "sad"], str(out), data=str(FER_DIR))
    assert list(out.parent.iterdir()) == []  # was: an uncalibrated, unscored model at out


@pytest.mark.parametrize("command", ["predict", "track"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path: Path, command: str) -> None:
    write_clip(tmp_path / "clip.mp4", 3)
    (tmp_path / "out").write_text("not a folder")
    flag = "--save-annotated" if command == "predict" else "--out"
    r = run_cli([command, "clip.mp4", flag, "out"], cwd=tmp_path)
    check(r, 2, says="out: is a regular file, not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_a_folder_where_a_track_output_goes_is_refused_before_any_work(tmp_path: Path) -> None:
    write_clip(tmp_path / "clip.mp4", 3)
    (tmp_path / "out" / "clip.tracks.json").mkdir(parents=True)
    r = run_cli(["track", "clip.mp4", "--out", "out"], cwd=tmp_path)
    check(r, 2, says="clip.tracks.json: is a folder, not a regular file")  # was exit 1 after all the work
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.tracks.json"]


def test_annotated_video_frames_and_a_same_named_image_both_survive(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    write_clip(d / "clip.mp4", 2)
    (d / "clip_f000000.jpg").write_bytes(ASTRONAUT.read_bytes())
    r = run_cli(["predict", "in", "--save-annotated", "out"], cwd=tmp_path)
    check(r, 0, errors=0, says="3 annotated image(s) written")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_f000000-2.jpg", "clip_f000000.jpg",
                                                                     "clip_f000001.jpg"]


def test_track_never_reads_its_own_outputs_as_frames(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    face = face_rgb(200)
    for i in range(4):
        Image.fromarray(np.roll(face, 3 * i, axis=1)).save(frames / f"f{i}.png")
    first = run_cli(["track", "frames", "--out", "frames"], cwd=tmp_path)
    check(first, 0, errors=0)
    second = run_cli(["track", "frames", "--out", "frames"], cwd=tmp_path)
    check(second, 0, errors=0, says="frames.timeline.png: skipped (a file ferkit wrote")
    for r in (first, second):
        assert "frames: 4 frames" in r.out, r.out  # the second run read 5: its own timeline


# -- numbers (21, 29, 30) -----------------------------------------------------------------------------------------

def test_smooth_nan_is_refused(tmp_path: Path) -> None:
    write_clip(tmp_path / "clip.mp4", 3)
    r = run_cli(["track", "clip.mp4", "--out", "out", "--smooth", "nan"], cwd=tmp_path)
    check(r, 2, says="'nan' is not a finite number")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("margin", [float("nan"), -5, 1.5, float("inf"), "0.1"])
def test_crop_margin_is_validated(margin: object) -> None:
    from ferkit import Recognizer
    from ferkit.errors import ConfigError

    with pytest.raises(ConfigError, match="crop_margin must be a number from 0 to 1"):
        Recognizer(crop_margin=margin)  # type: ignore[arg-type]
    assert Recognizer(crop_margin=0.2).crop_margin == 0.2


def test_an_absurd_declared_frame_rate_keeps_tracks_and_times_sane(tmp_path: Path) -> None:
    ffmpeg = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe()
    face = face_rgb(240)
    for i in range(8):
        Image.fromarray(np.roll(face, 2 * i, axis=1)).save(tmp_path / f"f{i:03d}.png")
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-framerate", "0.001", "-i", str(tmp_path / "f%03d.png"),
                    "-c:v", "mpeg4", "-q:v", "5", str(tmp_path / "slow.mp4")], check=True)
    r = run_cli(["track", "slow.mp4", "--out", "out"], cwd=tmp_path)
    check(r, 0, errors=0, says="declared frame rate (0.001 fps) is implausible")
    summary = json.loads((tmp_path / "out" / "slow.tracks.json").read_text())
    assert summary["faces_without_track"] == 0  # most faces had none: ByteTrack forgot every track at once
    (track,) = summary["tracks"]
    assert track["frames"] == 8 and track["seconds_visible"] < 1.0  # was thousands of seconds


# -- a full disk and SIGTERM while a video is written (5, 24) --------------------------------------------------------

def test_a_full_disk_never_publishes_a_truncated_video(tmp_path: Path) -> None:
    write_clip(tmp_path / "clip.mp4", 60, noise=True)  # noise: the annotated MP4 is megabytes
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.tracked.mp4").write_bytes(b"the good video of yesterday")
    r = run_cli(["track", "clip.mp4", "--out", "out", "--save-video"], cwd=tmp_path, fsize=300_000)
    check(r, 1, says="clip.tracked.mp4 came out incomplete (60 frames written")  # was 146 lines and a renamed wreck
    assert (out / "clip.tracked.mp4").read_bytes() == b"the good video of yesterday"
    assert sorted(p.name for p in out.iterdir()) == ["clip.tracked.mp4"]  # no temporary file left


def test_sigterm_while_writing_a_video_cleans_up_and_exits_143(tmp_path: Path) -> None:
    write_clip(tmp_path / "clip.mp4", 600)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "ferkit", "track", "clip.mp4", "--out", "out", "--save-video"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(f.stat().st_size for f in out.glob(".*")):
            time.sleep(0.02)  # until frames are being written to the hidden temporary MP4
        assert p.poll() is None, "finished before it could be stopped"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143 and err.strip() == "ferkit: terminated (SIGTERM)", (p.returncode, err)
    assert list(out.iterdir()) == []  # the hidden temporary MP4 is gone


def test_exit_codes_are_documented() -> None:
    from ferkit.cli import EXIT_CODES

    assert "143" in EXIT_CODES and "SIGTERM" in EXIT_CODES


def test_no_nan_helper_catches_nan() -> None:
    with pytest.raises(AssertionError):
        no_nan('{"score": NaN}')
    no_nan('[{"score": 0.5}]')
