"""Video tracking on real clips made from wild-dev photos (tests/videoclips.py): stable IDs when two people cross and
swap sizes, a face that leaves for a second, rotated and variable-frame-rate clips, frame folders, bad inputs; the
summary's numbers checked against what each clip holds. Uses the bundled fer3 model and YuNet."""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from videoclips import WILD, Actor, gap_clip, load_face, write_clip

from ferkit.cli.predict import run_predict, run_track
from ferkit.infer.report import VideoReport
from ferkit.infer.results import Face, Results
from ferkit.infer.track import ScoreSmoother

pytestmark = pytest.mark.skipif(not WILD.is_dir(), reason=f"no wild-dev photos at {WILD}")

FPS = 20.0
CROSS_SECONDS = 4.0
# Two people walk past each other: the happy one left → right growing 90 → 170 px, the sad one right → left
# shrinking 170 → 90 px; the happy one passes in front and hides the sad one for about half a second.
HAPPY_PATH = ((120.0, 240.0, 90.0), (520.0, 240.0, 170.0))
SAD_PATH = ((520.0, 240.0, 170.0), (120.0, 240.0, 90.0))


def _lerp(path: tuple, t: float, seconds: float) -> tuple[float, float, float]:
    u = min(max(t / seconds, 0.0), 1.0)
    return tuple(a + (b - a) * u for a, b in zip(*path))  # type: ignore[return-value]


@pytest.fixture(scope="session")
def rec():
    from ferkit import Recognizer

    return Recognizer("fer3")


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    happy, sad = load_face("happy", 0), load_face("sad", 0)
    out = {}
    out["cross"] = write_clip(d / "cross.mp4", [
        Actor(sad, lambda t: _lerp(SAD_PATH, t, CROSS_SECONDS)),
        Actor(happy, lambda t: _lerp(HAPPY_PATH, t, CROSS_SECONDS)),  # drawn last: in front
    ], CROSS_SECONDS, FPS)
    # away from 1.0 s to 2.0 s (frames 20-39 hold no face), back at the same place
    out["gap"] = gap_clip(d / "gap.mp4", FPS)
    out["noface"] = write_clip(d / "noface.mp4", [], 1.0, FPS)
    avi = write_clip(d / "full.avi", [Actor(happy, lambda t: (320, 240, 150))], 2.0, FPS, fourcc="MJPG")
    data = avi.read_bytes()
    (d / "truncated.avi").write_bytes(data[: len(data) // 2])
    out["truncated"] = d / "truncated.avi"
    out["corrupt"] = d / "corrupt.mp4"
    out["corrupt"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    frames = d / "frames"
    frames.mkdir()
    import cv2

    cap = cv2.VideoCapture(str(avi))
    for i in range(12):
        ok, fr = cap.read()
        assert ok
        cv2.imwrite(str(frames / f"img{i:03d}.jpg"), fr)  # names sort in frame order
    cap.release()
    out["frames"] = frames
    (d / "empty").mkdir()
    out["empty"] = d / "empty"
    return out


def _ffmpeg() -> str:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    return imageio_ffmpeg.get_ffmpeg_exe()


def _track(path: Path, out: Path, **kw) -> tuple[int, str, str]:
    o, e = io.StringIO(), io.StringIO()
    rc = run_track([str(path)], out_dir=str(out), out=o, err=e, **kw)
    return rc, o.getvalue(), e.getvalue()


# -- tracking ----------------------------------------------------------------------------------------------------------

def test_people_who_cross_and_swap_sizes_keep_their_ids(rec, clips: dict[str, Path]) -> None:
    """Each face is matched to the actor whose scripted centre is nearer; every track must belong to one actor."""
    owner: dict[int, set[str]] = {}
    n_frames = 0
    for res in rec.track(clips["cross"]):
        n_frames += 1
        h, s = _lerp(HAPPY_PATH, res.time, CROSS_SECONDS), _lerp(SAD_PATH, res.time, CROSS_SECONDS)
        if abs(h[0] - s[0]) < 80:  # overlapping: who is who is what the tracker must carry through
            continue
        for f in res:
            cx = f.box[0] + f.box[2] / 2
            if f.track is not None:
                owner.setdefault(f.track, set()).add("happy" if abs(cx - h[0]) < abs(cx - s[0]) else "sad")
    assert n_frames == CROSS_SECONDS * FPS
    assert all(len(v) == 1 for v in owner.values()), owner  # no ID ever moved to the other person
    assert sorted(next(iter(v)) for v in owner.values()) == ["happy", "sad"], owner  # and no new ID after the cross


def test_cross_summary_labels_each_person(tmp_path: Path, clips: dict[str, Path]) -> None:
    rc, out, err = _track(clips["cross"], tmp_path)
    assert rc == 0, err
    summ = json.loads((tmp_path / "cross.tracks.json").read_text())
    assert summ["frames_processed"] == summ["frames_declared"] == 80
    by_label = {t["label"]: t for t in summ["tracks"]}
    assert set(by_label) == {"happy", "sad"}
    assert by_label["happy"]["share"]["happy"] >= 0.9
    assert by_label["sad"]["share"]["sad"] >= 0.8
    # the happy person is never hidden: visible the whole 4 s; the sad one loses the time it spent behind
    assert by_label["happy"]["seconds_visible"] == pytest.approx(4.0, abs=0.15)
    assert 2.5 < by_label["sad"]["seconds_visible"] < 3.9
    assert by_label["happy"]["mean_scores"]["happy"] > 0.8
    assert "2 tracks" in out


def test_face_away_for_a_second_keeps_its_id(rec, clips: dict[str, Path]) -> None:
    results = list(rec.track(clips["gap"]))
    tracks = {f.track for r in results for f in r if f.track is not None}
    assert tracks == {1}
    away = [r for r in results if 1.0 <= r.time < 2.0]
    assert len(away) == 20 and all(len(r) == 0 for r in away)  # no face invented while it was away
    report = VideoReport(rec.classes, file="gap", fps=FPS)
    for r in results:
        report.add(r)
    (t,) = report.summary()["tracks"]
    assert t["seconds_visible"] == pytest.approx(2.0, abs=0.06)
    assert (t["first"], t["last"]) == (0.0, pytest.approx(2.95))
    assert t["label"] == "happy"


def test_every_nth_frame(rec, clips: dict[str, Path]) -> None:
    results = list(rec.track(clips["gap"], every=3))
    assert [r.frame for r in results] == list(range(0, 60, 3))
    assert {f.track for r in results for f in r} <= {1, None}
    # one frame a second: the face is back at frame 40 after a frame without it; ByteTrack has no confirmed
    # track in that frame (a new track waits for a second sighting), the face is still reported
    sparse = list(rec.track(clips["gap"], every=20))
    assert [len(r) for r in sparse] == [1, 0, 1] and sparse[0][0].track == 1


def test_smoothing_is_in_seconds_not_frames() -> None:
    """A step from class 0 to class 1 at t=0: after 1 s the smoothed score is 1 - exp(-1/τ) at any frame rate."""
    tau = 0.5
    for fps in (10, 30, 60):
        sm = ScoreSmoother(tau)
        sm.update(1, -1.0 / fps, np.array([1.0, 0.0]))
        for i in range(fps + 1):
            v = sm.update(1, i / fps, np.array([0.0, 1.0]))
        assert v[1] == pytest.approx(1 - math.exp(-(1 + 1 / fps) / tau), abs=1e-9)


def test_report_numbers_against_what_was_put_in() -> None:
    """10 fps: track 1 happy for 2 s then sad for 1 s; track 2 neutral for 0.5 s; one untracked face."""
    rep = VideoReport(("happy", "sad", "neutral"), file="x.mp4", fps=10.0)
    for i in range(30):
        p = [0.9, 0.05, 0.05] if i < 20 else [0.1, 0.8, 0.1]
        faces = [Face((0, 0, 10, 10), "x", max(p), dict(zip(rep.classes, p)), 0.9, 1, dict(zip(rep.classes, p)))]
        if i < 5:
            q = [0.1, 0.1, 0.8]
            faces.append(Face((50, 0, 10, 10), "neutral", 0.8, dict(zip(rep.classes, q)), 0.9, 2,
                              dict(zip(rep.classes, q))))
        if i == 7:
            faces.append(Face((90, 0, 10, 10), "sad", 0.8, dict(zip(rep.classes, [0.1, 0.8, 0.1]))))
        rep.add(Results(faces, frame=i, time=i / 10))
    s = rep.summary()
    t1, t2 = s["tracks"]
    assert t1["seconds_visible"] == pytest.approx(3.0) and t2["seconds_visible"] == pytest.approx(0.5)
    assert t1["share"] == {"happy": pytest.approx(2 / 3, abs=1e-3), "sad": pytest.approx(1 / 3, abs=1e-3),
                           "neutral": 0.0}
    assert t1["mean_scores"]["happy"] == pytest.approx((20 * 0.9 + 10 * 0.1) / 30, abs=1e-3)
    assert t1["strongest"]["sad"][0]["time"] >= 2.0
    assert s["faces_without_track"] == 1 and s["frames_processed"] == 30
    lines = rep.csv_text().splitlines()
    assert len(lines) == 1 + 30 + 5 + 1
    assert lines[0].startswith("frame,time,track,x,y,w,h,det_score,label,score,smoothed_label")


# -- the command -------------------------------------------------------------------------------------------------------

def test_track_command_writes_csv_json_timeline_and_video(tmp_path: Path, clips: dict[str, Path]) -> None:
    import cv2
    from PIL import Image

    rc, out, err = _track(clips["gap"], tmp_path, save_video=True)
    assert rc == 0, err
    rows = (tmp_path / "gap.frames.csv").read_text().splitlines()
    assert len(rows) == 1 + 40  # one row per face per frame: 60 frames, 20 of them empty
    assert all(r.split(",")[2] == "1" for r in rows[1:])  # track 1 throughout, from the first frame
    png = Image.open(tmp_path / "gap.timeline.png")
    assert png.format == "PNG" and png.size[0] >= 600
    cap = cv2.VideoCapture(str(tmp_path / "gap.tracked.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 60
    cap.release()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_predict_track_adds_track_ids(clips: dict[str, Path]) -> None:
    o, e = io.StringIO(), io.StringIO()
    rc = run_predict([str(clips["gap"])], model="fer3", fmt="jsonl", track=True, out=o, err=e)
    assert rc == 0, e.getvalue()
    els = [json.loads(line) for line in o.getvalue().splitlines()]
    assert len(els) == 60
    faces = [f for el in els for f in el["faces"]]
    assert len(faces) == 40 and {f.get("track") for f in faces[1:]} == {1}
    assert all("smoothed" in f for f in faces[1:]) and faces[5]["smoothed"]["label"] == "happy"
    o3 = io.StringIO()
    assert run_predict([str(clips["gap"])], model="fer3", fmt="csv", track=True, every=10, out=o3,
                       err=io.StringIO()) == 0
    head, *rows = o3.getvalue().splitlines()
    assert head.endswith(",track,smoothed_label,smoothed_score") and len(rows) == 4  # frames 0, 10, 40, 50
    assert [r.split(",")[-3] for r in rows] == ["1"] * 4
    o2 = io.StringIO()
    run_predict([str(clips["gap"])], model="fer3", fmt="jsonl", out=o2, err=io.StringIO())
    assert all("track" not in f for line in o2.getvalue().splitlines() for f in json.loads(line)["faces"])


def test_frame_folder_is_a_video_in_name_order(rec, clips: dict[str, Path]) -> None:
    results = list(rec.track(clips["frames"]))
    assert [r.frame for r in results] == list(range(12))
    assert [r.time for r in results] == [round(i / 30, 3) for i in range(12)]
    assert [Path(r.path).name for r in results] == [f"img{i:03d}.jpg" for i in range(12)]
    assert {f.track for r in results[1:] for f in r} == {1}
    numbered = clips["frames"].parent / "numbered"
    numbered.mkdir(exist_ok=True)
    for i, n in enumerate((1, 2, 10)):  # name order would put f10 before f2
        (numbered / f"f{n}.jpg").write_bytes((clips["frames"] / f"img{i:03d}.jpg").read_bytes())
    assert [Path(r.path).name for r in rec.track(numbered)] == ["f1.jpg", "f2.jpg", "f10.jpg"]


def test_rotated_phone_video_comes_out_upright(tmp_path: Path, rec) -> None:
    """Frames stored sideways with a display rotation, as phones record them: the faces are found upright."""
    import cv2

    ff = _ffmpeg()
    happy = load_face("happy", 0)
    src = write_clip(tmp_path / "portrait.mp4", [Actor(happy, lambda t: (240, 300, 160))], 1.0, 10,
                     size=(480, 640))
    side = tmp_path / "sideways.mp4"
    cap, vw = cv2.VideoCapture(str(src)), cv2.VideoWriter(str(side), cv2.VideoWriter_fourcc(*"mp4v"), 10, (640, 480))
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        vw.write(cv2.rotate(fr, cv2.ROTATE_90_CLOCKWISE))  # the sensor's landscape frame
    cap.release()
    vw.release()
    phone = tmp_path / "phone.mp4"
    # display rotation 90 (counter-clockwise) undoes the clockwise turn
    subprocess.run([ff, "-loglevel", "error", "-y", "-display_rotation", "90", "-i", str(side), "-c", "copy",
                    str(phone)], check=True)
    assert _first_frame(side).shape[:2] == (480, 640)  # stored sideways (landscape)
    frames = list(rec.track(phone, keep_images=True))
    assert frames[0].image.shape[:2] == (640, 480)  # portrait, as displayed
    assert all(len(r) == 1 and r[0].label == "happy" for r in frames)


def _first_frame(path: Path) -> np.ndarray:
    import cv2

    cap = cv2.VideoCapture(str(path))
    ok, fr = cap.read()
    cap.release()
    assert ok
    return fr


def test_variable_frame_rate_uses_real_timestamps(tmp_path: Path, rec, clips: dict[str, Path]) -> None:
    """First 20 frames at 10 fps (2 s), the next 20 at 20 fps (1 s): times and seconds visible follow the clock."""
    ff = _ffmpeg()
    vfr = tmp_path / "vfr.mp4"
    subprocess.run([ff, "-loglevel", "error", "-y", "-i", str(clips["gap"]), "-vf",
                    "trim=end_frame=40,setpts='if(lt(N,20),N/10/TB,(2+(N-20)/20)/TB)'", "-fps_mode", "passthrough",
                    "-c:v", "mpeg4", "-q:v", "3", str(vfr)], check=True)
    results = list(rec.track(vfr))
    assert len(results) == 40
    times = [r.time for r in results]
    assert times[:3] == [0.0, 0.1, 0.2] and times[19] == pytest.approx(1.9) and times[21] == pytest.approx(2.05)
    o = tmp_path / "o"
    rc, _, err = _track(vfr, o)
    assert rc == 0, err


# -- bad inputs --------------------------------------------------------------------------------------------------------

def test_video_without_faces(tmp_path: Path, clips: dict[str, Path]) -> None:
    rc, out, err = _track(clips["noface"], tmp_path)
    assert rc == 0, err
    summ = json.loads((tmp_path / "noface.tracks.json").read_text())
    assert summ["tracks"] == [] and summ["frames_processed"] == 20
    assert (tmp_path / "noface.timeline.png").stat().st_size > 0
    assert "no face tracked" in out


def test_truncated_video_reports_frames_read_of_declared(tmp_path: Path, clips: dict[str, Path],
                                                         one_line_error) -> None:
    rc, out, err = _track(clips["truncated"], tmp_path)
    assert rc == 1
    line = one_line_error(err)
    assert str(clips["truncated"]) in line and "of 40 declared frames" in line
    summ = json.loads((tmp_path / "truncated.tracks.json").read_text())
    n = summ["frames_processed"]
    assert 0 < n < 40 and f"after {n} of 40" in summ["error"]
    o, e = io.StringIO(), io.StringIO()  # predict says it too, in its output and on stderr
    assert run_predict([str(clips["truncated"])], model="fer3", fmt="jsonl", out=o, err=e) == 1
    last = json.loads(o.getvalue().splitlines()[-1])
    assert "declared frames" in last["error"] and "declared frames" in one_line_error(e.getvalue())


def test_corrupt_video_and_empty_folder(tmp_path: Path, clips: dict[str, Path], one_line_error) -> None:
    for name, problem in (("corrupt", "cannot open video"), ("empty", "folder holds no frames")):
        rc, out, err = _track(clips[name], tmp_path)
        assert rc == 1
        line = one_line_error(err)
        assert str(clips[name]) in line and problem in line, line
    rc, out, err = _track(tmp_path / "missing.mp4", tmp_path)
    assert rc == 1 and "no such file" in one_line_error(err)
    assert not list(tmp_path.iterdir())  # nothing written for inputs that could not be read


def test_api_raises_video_error(rec, clips: dict[str, Path]) -> None:
    from ferkit.errors import VideoError

    for name in ("corrupt", "empty"):
        with pytest.raises(VideoError):
            list(rec.track(clips[name]))
    with pytest.raises(VideoError, match="declared frames"):
        list(rec.track(clips["truncated"]))


def test_progress_bar_on_a_terminal_only(tmp_path: Path, clips: dict[str, Path], monkeypatch) -> None:
    """stderr a terminal: a bar with frames done of the total and the rate; --quiet or not a terminal: no bar."""
    import os
    import pty
    import sys

    from ferkit.infer import sources

    main, sub = pty.openpty()  # a terminal that reports no size, like a bare CI console
    proc = subprocess.Popen([sys.executable, "-m", "ferkit", "track", str(clips["noface"]), "--out", str(tmp_path)],
                            env={**os.environ, "FERKIT_PROGRESS": "1"}, stdout=subprocess.DEVNULL, stderr=sub)
    os.close(sub)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait() == 0
    bar = b"".join(chunks).decode(errors="replace")
    assert "/20 [" in bar and "frame/s" in bar, bar  # frames done of the 20 declared, and the rate

    monkeypatch.setenv("FERKIT_PROGRESS", "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert sources.progress_enabled() and not sources.progress_enabled(quiet=True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not sources.progress_enabled()


def test_yunet_without_the_per_call_leak(clips: dict[str, Path]) -> None:
    """yuface.c_detect leaks its 36 KB result buffer on every call (RSS grew 130 MB over a 10-minute video): ferkit
    calls the same library function with a kept buffer; same faces, same numbers."""
    import cv2
    import yuface

    from ferkit.infer.detect import get_detector

    det = get_detector("yunet")
    assert det._c_detect is not yuface.c_detect
    cap = cv2.VideoCapture(str(clips["cross"]))
    for _ in range(3):
        ok, frame = cap.read()
        small = np.ascontiguousarray(cv2.resize(frame, (400, 300)))
        # column 15 is unused padding (uninitialised in yuface's fresh buffer)
        assert np.array_equal(det._c_detect(small)[:, :15], yuface.c_detect(small)[:, :15])
    cap.release()
    assert len(det._c_detect(small)) == 2


def test_track_applies_min_det_score(clips: dict[str, Path], tmp_path: Path) -> None:
    """`ferkit track --min-det-score` filters the detector's faces as predict does: above every face's confidence,
    nothing is tracked; at 0 the clip's faces are."""
    rc, _, _ = _track(clips["gap"], tmp_path / "all", min_det_score=0.0)
    assert rc == 0
    assert json.loads((tmp_path / "all" / "gap.tracks.json").read_text())["tracks"]
    rc, _, _ = _track(clips["gap"], tmp_path / "none", min_det_score=1.0)
    assert rc == 0
    assert json.loads((tmp_path / "none" / "gap.tracks.json").read_text())["tracks"] == []
