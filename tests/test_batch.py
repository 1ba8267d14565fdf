"""``ferkit batch`` on real Ray (local, at most 2 CPUs), real wild-dev photos and a real clip made from them.

Every test that starts Ray shuts it down (``run_batch`` does so itself; the cluster tests in ``finally``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import WILD, needs_wild

pytest.importorskip("ray.data", reason="ferkit batch needs ray: pip install 'ferkit[ray]'")

pytestmark = [needs_wild, pytest.mark.timeout(600)]

FERKIT = [sys.executable, "-m", "ferkit"]


def _photos(n_per_class: int) -> list[Path]:
    return [f for c in ("happy", "sad", "neutral") for f in sorted((WILD / c).glob("*.jpg"))[:n_per_class]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder of 12 wild-dev photos (in sub-folders), an unreadable .jpg, a photo without a face, a 3 s clip."""
    from videoclips import background, gap_clip

    root = tmp_path_factory.mktemp("batch-in")
    photos = root / "photos"
    for f in _photos(4):
        (photos / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, photos / f.parent.name / f.name)
    bad = photos / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    empty = photos / "wall.jpg"  # the clips' background: a real JPEG that holds no face
    Image.fromarray(background(320, 240)).save(empty, quality=90)
    video = gap_clip(root / "clip.mp4")  # one face, away from 1.0 s to 2.0 s; 60 frames
    return {"root": root, "photos": photos, "bad": bad, "empty": empty, "video": video}


def _predict(args: list[str]) -> list[dict]:
    from ferkit.cli.predict import run_predict

    out, err = io.StringIO(), io.StringIO()
    track = "--track" in args
    run_predict([a for a in args if a != "--track"], fmt="json", out=out, err=err, track=track, quiet=True)
    return json.loads(out.getvalue())


def _faces_of_predict(elements: list[dict], track: bool = False) -> list[tuple]:
    rows = []
    for e in elements:
        for k, f in enumerate(e.get("faces", [])):
            key = (e["file"], e.get("frame"), k, tuple(f["box"]), f["label"], round(f["score"], 5))
            if track:
                key += (f.get("track"), f.get("smoothed", {}).get("label"))
            rows.append(key)
    return sorted(rows, key=repr)


def _faces_of_batch(df, track: bool = False) -> list[tuple]:
    rows = []
    for r in df[df.status == "face"].itertuples():
        frame = None if r.frame is None or r.frame != r.frame else int(r.frame)
        key = (r.file, frame, int(r.face), tuple(int(v) for v in r.box), r.label, round(float(r.score), 5))
        if track:
            tr = None if r.track is None or r.track != r.track else int(r.track)
            key += (tr, r.smoothed_label if isinstance(r.smoothed_label, str) else None)
        rows.append(key)
    return sorted(rows, key=repr)


def test_rows_equal_predict_and_failures_are_rows(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Photos (recursively), a video split into 4 frame ranges and a URL give predict's faces exactly; the unreadable
    file and the face-less photo are rows of their own; read_results and --report read the folder back."""
    from ferkit.batch import read_results, run_batch

    photos, video = inputs["photos"], inputs["video"]
    url = "local://" + str(inputs["photos"] / "happy" / sorted(os.listdir(photos / "happy"))[0])
    out = tmp_path / "out"
    s = run_batch([str(photos), str(video), url], out, workers=2, range_frames=16, quiet=True, report=True,
                  err=io.StringIO())
    assert s.errors == 1 and s.no_face >= 1 and not s.interrupted
    df = read_results(out)
    expected = _faces_of_predict(_predict([str(photos), str(video)]))
    got = _faces_of_batch(df[df.file != url])
    assert got == expected and len(got) > 12
    assert df[df.file == str(video)].frame.nunique() > 30  # frames from all four ranges
    bad = df[df.file == str(inputs["bad"])]
    assert list(bad.status) == ["error"] and "cannot identify image file" in bad.reason.iloc[0]
    empty = df[df.file == str(inputs["empty"])]
    assert list(empty.status) == ["no_face"]
    # the URL went through fsspec in the workers and found the same face as the path
    local = url.removeprefix("local://")
    assert [(tuple(b), lab) for b, lab in zip(df[df.file == url].box, df[df.file == url].label)] == \
           [(tuple(b), lab) for b, lab in zip(df[df.file == local].box, df[df.file == local].label)]
    assert (df.model == "fer3").all() and df.digest.notna().all()
    for name in ("labels.png", "video-1.png", "report.md", "report.html"):
        assert (out / "_report" / name).stat().st_size > 200, name
    assert "faces" in (out / "_report" / "report.md").read_text()

    # a rerun finds everything done: nothing recognised again, nothing added
    before = len(df)
    s2 = run_batch([str(photos), str(video), url], out, workers=1, range_frames=16, quiet=True, err=io.StringIO())
    assert s2.items == 0 and len(read_results(out)) == before


def test_tracked_video_equals_predict_track(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Tracking done per video by the driver from 4 ranges read by 2 workers = predict --track on the whole clip."""
    from ferkit.batch import read_results, run_batch

    video = inputs["video"]
    out = tmp_path / "tracked"
    run_batch([str(video)], out, workers=2, range_frames=16, track=True, quiet=True)
    got = _faces_of_batch(read_results(out), track=True)
    expected = _faces_of_predict(_predict([str(video), "--track"]), track=True)
    assert got == expected
    assert {g[6] for g in got} == {1}  # one face, one ID across the gap (away 1 s < LOST_SECONDS)


def test_out_of_another_model_or_options_is_refused_in_one_line(inputs: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 one_line_error) -> None:
    from ferkit.batch.store import MANIFEST, open_output
    from ferkit.cli import main

    out = tmp_path / "out"
    open_output(out, {"model": "fer3", "model_digest": "abc", "classes": ["happy", "sad", "neutral"],
                      "options": {"every": 1, "track": False}})
    assert main(["batch", str(inputs["empty"]), "--out", str(out), "--model", "fer7"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(out) in line and "fer3" in line and "fer7" in line
    assert json.loads((out / MANIFEST).read_text())["model"] == "fer3"  # left as it was
    # a folder of other things is not written into
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["batch", str(inputs["empty"]), "--out", str(other)]) == 2
    assert "not empty" in one_line_error(capsys.readouterr().err)
    assert sorted(os.listdir(other)) == ["notes.txt"]


def test_manifests_and_globs_name_the_same_files(inputs: dict[str, Path], tmp_path: Path) -> None:
    """txt, CSV and Parquet manifests (relative paths from the manifest's folder) and a recursive glob expand to the
    files predict's folder walk finds; a missing entry and a bad manifest are error rows, not silence."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ferkit.batch.plan import expand
    from ferkit.infer.sources import expand_inputs

    photos = inputs["photos"]
    walked = [f for f, _, e in expand_inputs([str(photos)]) if e is None]
    rel = [os.path.relpath(f, tmp_path) for f in walked]
    (tmp_path / "list.txt").write_text("# photos\n" + "\n".join(rel) + "\n\n")
    (tmp_path / "list.csv").write_text("id,path\n" + "".join(f"{i},{r}\n" for i, r in enumerate(rel)))
    pq.write_table(pa.table({"url": walked}), tmp_path / "list.parquet")
    for m in ("list.txt", "list.csv", "list.parquet"):
        got = [os.path.normpath(f) for f, e in expand([str(tmp_path / m)])]
        assert got == [os.path.normpath(f) for f in walked], m
    globbed = [f for f, e in expand([str(photos / "**" / "*.jpg")])]
    assert sorted(globbed) == sorted(str(f) for f in walked)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nope")
    assert [e is not None for _, e in expand([str(tmp_path / "broken.parquet"), str(tmp_path / "nope*.jpg"),
                                              str(tmp_path / "missing.jpg")])] == [True, True, True]


def _wait_for(cond, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigint_halfway_then_rerun_gives_every_input_exactly_once(tmp_path: Path) -> None:
    from ferkit.batch import read_results

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in _photos(30):  # 90 photos
        shutil.copy2(f, photos / f"{f.parent.name}_{f.name}")
    out = tmp_path / "out"
    cmd = FERKIT + ["batch", str(photos), "--out", str(out), "--workers", "2", "--batch-size", "2",
                    "--part-rows", "4", "--quiet"]
    log = (tmp_path / "first.log").open("wb")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2 or p.poll() is not None, 240, "two parts")
        p.send_signal(signal.SIGINT)
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
    first = read_results(out)
    assert rc == 130, (tmp_path / "first.log").read_text()
    assert 0 < first.file.nunique() < 90, "the interrupt came too late to test resuming"
    assert "run the same command again" in (tmp_path / "first.log").read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    df = read_results(out)
    assert df.file.nunique() == 90
    assert not df.duplicated(["file", "face"]).any()  # nothing twice
    assert df.groupby("file").item.nunique().max() == 1
    # what the first run had kept is still there, unchanged, and was not redone
    kept = df[df.file.isin(set(first.file))].sort_values(["file", "face"]).reset_index(drop=True)
    assert kept.drop(columns=[]).equals(first.sort_values(["file", "face"]).reset_index(drop=True))


def _actors() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values() if "ItemRecogniser" in a.get("ActorClassName", "")]


def _actor_pids(ray) -> list[int]:
    return [a["Pid"] for a in _actors() if a["State"] == "ALIVE"]


@pytest.mark.slow
def test_killing_an_actor_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """A worker killed mid-run (found through Ray's actor table, killed with SIGKILL): Ray restarts it and runs its
    batch again; every photo's faces are there once, as predict finds them."""
    import ray
    from ray.cluster_utils import Cluster

    from ferkit.batch import read_results

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in _photos(20):
        shutil.copy2(f, photos / f"{f.parent.name}_{f.name}")
    expected = _faces_of_predict(_predict([str(photos)]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "object_store_memory": 200 * 1024**2})
    out = tmp_path / "out"
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        p = subprocess.Popen(FERKIT + ["batch", str(photos), "--out", str(out), "--address", cluster.address,
                                       "--batch-size", "2", "--part-rows", "2", "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 1 and len(_actor_pids(ray)) == 2, 240,
                  "the first part")
        victim = _actor_pids(ray)[0]
        os.kill(victim, signal.SIGKILL)
        log, _ = p.communicate(timeout=400)
        assert p.returncode == 0, log
        assert max(a["NumRestarts"] for a in _actors()) >= 1  # Ray brought the killed actor back
    finally:
        ray.shutdown()
        cluster.shutdown()
    df = read_results(out)
    assert df.file.nunique() == 60
    assert not df.duplicated(["file", "face"]).any()
    assert _faces_of_batch(df) == expected


@pytest.mark.slow
def test_two_node_cluster_gives_the_same_rows(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Two Ray nodes of one CPU each (simulated here): the same rows as predict; both nodes ran actors."""
    import ray
    from ray.cluster_utils import Cluster

    from ferkit.batch import read_results, run_batch

    photos, video = inputs["photos"], inputs["video"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 150 * 1024**2})
    cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
    out = tmp_path / "out"
    try:
        cluster.wait_for_nodes()
        s = run_batch([str(photos), str(video)], out, address=cluster.address, range_frames=16, quiet=True,
                      err=io.StringIO())
        assert s.workers == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    expected = _faces_of_predict(_predict([str(photos), str(video)]))
    assert _faces_of_batch(read_results(out)) == expected


def test_missing_ray_names_the_pip_install(tmp_path: Path) -> None:
    """Without Ray (its import blocked in a child interpreter) the command says which pip install fixes it."""
    code = ("import sys; sys.modules['ray'] = None; from ferkit.cli import main; "
            f"sys.exit(main(['batch', {str(WILD)!r}, '--out', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == r.stderr.strip().splitlines()[0]
    assert "pip install 'ferkit[ray]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # said before the output folder was made


def test_recognise_in_a_users_own_map_batches(tmp_path: Path) -> None:
    """ferkit.ray.Recognise in ray.data.read_images(...).map_batches: the faces predict finds in the same photos."""
    import ray

    from ferkit.ray import Recognise

    files = _photos(2)
    for f in files:
        shutil.copy2(f, tmp_path / f.name)
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, logging_level="ERROR")
        ds = ray.data.read_images(str(tmp_path), include_paths=True, mode="RGB")
        df = ds.map_batches(Recognise, fn_constructor_kwargs={"model": "fer3"}, batch_size=4,
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).to_pandas()
    finally:
        ray.shutdown()
    assert set(df.status) == {"face"}
    expected = _predict([str(tmp_path)])
    for e in expected:
        name = os.path.basename(e["file"])
        mine = df[df.file.map(os.path.basename) == name]
        # read_images decodes every pixel (no EXIF turn, no reduced decoding): same labels, boxes within a few px
        assert list(mine.label) == [f["label"] for f in e["faces"]], name
        for b, f in zip(mine.box, e["faces"]):
            assert np.abs(np.array(b) - np.array(f["box"])).max() <= max(8, 0.03 * max(f["box"][2:])), name


def test_committer_keeps_one_complete_attempt_per_item(tmp_path: Path) -> None:
    """The exactly-once rule without Ray's timing: a partial attempt, a complete one and a late repeat of the same
    item give its rows once; an item is written only when all its rows are in."""
    from ferkit.batch.engine import BatchSummary, _Committer
    from ferkit.batch.store import PartWriter, read_results

    classes = ("happy", "sad", "neutral")
    (tmp_path / "_ferkit_batch.json").write_text(json.dumps({"classes": list(classes)}))
    writer = PartWriter(tmp_path, classes, part_rows=1)

    class Bar:
        def update(self, n: int = 1) -> None:
            pass

    summary = BatchSummary(out=str(tmp_path))
    c = _Committer(writer, classes, {}, every=1, track=False, summary=summary, err=io.StringIO(), bar=Bar())

    def rows(item: str, attempt: str, n: int, upto: int | None = None) -> list[dict]:
        return [{"file": item, "face": k, "box": [k, 0, 10, 10], "label": "happy", "score": 0.9, "status": "face",
                 "item": item, "attempt": attempt, "item_rows": n, "item_frames": 1, "track": None}
                for k in range(n)][:upto]

    import pyarrow as pa

    def block(rs: list[dict]):
        return pa.Table.from_pylist(rs)

    c.add(block(rows("a.jpg", "x1", 3, upto=2)))  # an attempt cut short (its worker died)
    assert writer.written == 0 and not list(tmp_path.glob("part-*"))  # nothing of a partial item is written
    c.add(block(rows("a.jpg", "x2", 3)[:1]))  # the retry's rows arrive in two blocks
    c.add(block(rows("a.jpg", "x2", 3)[1:] + rows("b.jpg", "y1", 2)))
    c.add(block(rows("a.jpg", "x3", 3)))  # a late repeat
    df = read_results(tmp_path)
    assert sorted(zip(df.file, df.face)) == [("a.jpg", 0), ("a.jpg", 1), ("a.jpg", 2), ("b.jpg", 0), ("b.jpg", 1)]
    assert summary.items == 2 and summary.faces == 5 and summary.repeats == 1
