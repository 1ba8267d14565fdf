"""Video endpoints: upload a short video and get the per-track summary of ``ferkit track``; live tracking of webcam
frames for the web page.

* ``POST /v1/videos`` — a video as multipart field ``file`` or the raw body (``?every=N`` samples every Nth frame).
  202 with ``{"id", "status": "queued", ...}``. 413 over ``--max-video-mb``, longer than ``--max-video-seconds`` or
  frames over ``--max-pixels``;
  415 not a video OpenCV can read; 503 (``Retry-After``) when ``--max-video-jobs`` jobs are queued or running.
* ``GET /v1/videos/{id}`` — ``{"id", "status": queued|running|done|failed|cancelled, "progress": {"frames_done",
  "frames_total"}, "result": <summary, when done>, "error": <one line, when failed or truncated>}``; 404 unknown or
  expired.
* ``DELETE /v1/videos/{id}`` — cancels a queued or running job (it stops within a frame) and forgets it.
* ``POST /v1/track?session=S`` — one webcam frame (an image, as for ``/v1/predict``); the faces come back with
  ``track`` and ``smoothed`` scores, tracked across the frames of session ``S`` (see :mod:`ferkit.infer.track`).

Jobs live in files under the server's state directory (shared by its worker processes), so any worker answers for
any job: ``{id}.json`` is the job's state, written atomically; ``{id}.video`` the upload, deleted when the job ends;
``{id}.cancel`` asks the worker running it to stop. A job is forgotten ``--video-job-ttl`` seconds after it ended
(``expires_in_s`` counts down); a running job is not (its length is bounded by ``--max-video-seconds``).
Jobs run one at a time per process, in their own thread, so ``/v1/predict`` keeps its inference slots. Live
sessions are kept in memory per process (at most :data:`MAX_SESSIONS`, dropped after :data:`SESSION_IDLE_S` idle):
with several workers a session's frames may reach different processes and its IDs restart, so the page's live mode
is meant for a single-worker server (``--workers 1``, the default on one or two cores when set so).

With ``--api-keys``, a job and a live session belong to the key that made them: other keys get 404 for the job and
their own, separate session of the same name. Uploads are read before a job slot is reserved (a slow client holds
none), the frame size is checked against ``--max-pixels`` before any frame is decoded, and a job stops decoding at
``--max-video-seconds`` whatever the file's header declared (the job then ends with what it tracked and an
``error`` saying so).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ferkit.errors import FerkitError, ImageTooLargeError, VideoError
from ferkit.fsutil import atomic_write_text
from ferkit.serve.upload import Rejected, image_bytes, one_line

log = logging.getLogger(__name__)

router = APIRouter()

_ID = re.compile(r"^[A-Za-z0-9_-]{16}$")
#: The jobs' folder in the state directory (emptied when the server starts: no job outlives its worker process).
JOBS_DIR = "videos"
#: Live-mode sessions kept per process, and how long an idle one is kept (seconds).
MAX_SESSIONS, SESSION_IDLE_S = 32, 60.0
#: How often a running job writes its progress (seconds).
_PROGRESS_EVERY_S = 0.5
_ACTIVE = ("queued", "running")


# -- the job folder ----------------------------------------------------------------------------------------------------

def _jobs_dir(state: Any) -> Path:
    """``<state dir>/videos``, created on first use (a private temporary folder when the app has no state dir)."""
    d = getattr(state, "video_dir", None)
    if d is None:
        base = state.settings.state_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="ferkit-videos-")
        d = Path(base) / JOBS_DIR
        d.mkdir(parents=True, exist_ok=True)
        state.video_dir = d
        state.video_pool = ThreadPoolExecutor(1, thread_name_prefix="ferkit-video")
        state.video_lock = threading.Lock()
    return d


def _read_job(d: Path, job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads((d / f"{job_id}.json").read_text())
    except (OSError, ValueError):
        return None


def _write_job(d: Path, job: dict[str, Any]) -> None:
    atomic_write_text(d / f"{job['id']}.json", json.dumps(job))


def _forget(d: Path, job_id: str) -> None:
    for suffix in (".json", ".video", ".cancel"):
        try:
            (d / f"{job_id}{suffix}").unlink()
        except FileNotFoundError:
            pass


def _sweep(d: Path, ttl: float) -> list[dict[str, Any]]:
    """Forget expired jobs; the jobs that remain."""
    now, jobs = time.time(), []
    for f in d.glob("*.json"):
        job = _read_job(d, f.stem)
        if job is None:
            continue
        # a finished job is kept ttl seconds for its client to fetch; a running one until it ends (its length is
        # bounded by --max-video-seconds); a reservation whose upload never came, ttl after it was made
        since = job.get("finished") or (job.get("created", now) if job["status"] == "uploading" else None)
        if since is not None and now - since > ttl:
            _forget(d, job["id"])
            continue
        jobs.append(job)
    return jobs


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in ("created", "finished", "owner")}


def _owner(request: Request) -> str | None:
    """Who a job or live session belongs to: the API key's client id (``key:`` and a digest), None without keys.

    With keys, a job or session is visible to the key that made it only; another key gets 404, as for an unknown id.
    """
    return request.state.client_id if request.app.state.api_keys is not None else None


# -- running a job -----------------------------------------------------------------------------------------------------

def _run_job(state: Any, d: Path, job: dict[str, Any], every: int) -> None:
    """Track the uploaded video, writing progress into the job file; runs in the video thread."""
    from ferkit.infer.report import VideoReport
    from ferkit.infer.sources import read_video
    from ferkit.infer.track import LOST_SECONDS, SMOOTH_SECONDS, track_units

    video, cancel = d / f"{job['id']}.video", d / f"{job['id']}.cancel"
    if cancel.exists() or _read_job(d, job["id"]) is None:
        _forget(d, job["id"])
        return
    rec = state.recognizer
    job.update(status="running")
    _write_job(d, job)
    s = state.settings
    report = VideoReport(rec.classes, file=job["name"], fps=job["fps"], declared_frames=job["progress"]["frames_total"],
                         every=every, model=state.label, smoothing_seconds=SMOOTH_SECONDS, lost_seconds=LOST_SECONDS)
    last, done = time.monotonic(), 0
    try:
        # the decoder stops at the duration and pixel limits whatever the header claimed (an error unit says so)
        units = read_video(str(video), None, every, max_pixels=s.max_pixels, max_seconds=s.max_video_seconds)
        for u, res in track_units(rec, units, fps=job["fps"], every=every):
            if u.error is not None:
                report.error = u.error
                continue
            report.add(res)
            done = (u.frame or 0) + 1
            if time.monotonic() - last > _PROGRESS_EVERY_S:
                last = time.monotonic()
                if cancel.exists() or not (d / f"{job['id']}.json").exists():
                    _forget(d, job["id"])
                    log.info("video job %s cancelled after %d frames", job["id"], report.frames_processed)
                    return
                job["progress"]["frames_done"] = done
                _write_job(d, job)
        job["progress"]["frames_done"] = done
        if report.frames_processed == 0:
            job.update(status="failed", error=report.error or "video holds no readable frames")
        else:
            job.update(status="done", result=report.summary(), **({"error": report.error} if report.error else {}))
    except FerkitError as e:
        job.update(status="failed", error=one_line(e))
    except Exception as e:  # noqa: BLE001 - a job must end in a state the client can read, never hang "running"
        log.error("video job %s failed", job["id"], exc_info=e)
        job.update(status="failed", error="internal error while processing the video")
    finally:
        try:
            video.unlink()
        except FileNotFoundError:
            pass
    job["finished"] = time.time()
    if (d / f"{job['id']}.json").exists() and not cancel.exists():
        _write_job(d, job)
    else:
        _forget(d, job["id"])


# -- endpoints ---------------------------------------------------------------------------------------------------------

@router.post("/v1/videos", status_code=202, summary="Start tracking the faces of an uploaded video")
async def start_video(request: Request, every: int = Query(1, ge=1, le=30, description="use every Nth frame")
                      ) -> JSONResponse:
    state = request.app.state
    s = state.settings
    if state.recognizer is None:
        raise Rejected(503, "model not loaded yet", {"Retry-After": "2"}, reason="not_ready")
    d = _jobs_dir(state)
    # the upload is read first (bounded in size, rate and memory), so a client sending slowly holds no job slot
    data, name = await image_bytes(request, s.max_video_bytes)
    with state.video_lock:
        active = [j for j in _sweep(d, s.video_job_ttl_s) if j["status"] in (*_ACTIVE, "uploading")]
        if len(active) >= s.max_video_jobs:
            raise Rejected(503, f"busy: {len(active)} video jobs queued or running (the limit is "
                                f"{s.max_video_jobs}); retry later", {"Retry-After": "10"}, reason="busy")
        job_id = secrets.token_urlsafe(12)
        # reserve the slot before the file is written and probed, so concurrent uploads cannot all pass the check
        job = {"id": job_id, "status": "uploading", "created": time.time(), "progress": {}, "owner": _owner(request)}
        _write_job(d, job)
    try:
        video = d / f"{job_id}.video"
        await asyncio.to_thread(video.write_bytes, data)
        del data
        info = await asyncio.to_thread(_probe, video, name, s.max_video_seconds, s.max_pixels)
    except BaseException:
        _forget(d, job_id)
        raise
    job.update(status="queued", name=name, fps=info.fps, every=every,
               progress={"frames_done": 0, "frames_total": info.frames},
               duration_s=round(info.frames / info.fps, 3) if info.fps > 0 else None, expires_in_s=None)
    _write_job(d, job)
    asyncio.get_running_loop().run_in_executor(state.video_pool, _run_job, state, d, dict(job), every)
    return JSONResponse(_public(job), status_code=202, headers={"Location": f"/v1/videos/{job_id}"})


def _probe(path: Path, name: str, max_seconds: float, max_pixels: int) -> Any:
    """Open the upload as a video and check its declared duration and frame size; the VideoInfo."""
    from ferkit.infer.sources import check_video_frame_size, open_video

    try:
        cap, info = open_video(str(path))
    except VideoError:
        raise Rejected(415, f"{name}: not a video this server can read (corrupt, or an unsupported codec)",
                       reason="unsupported") from None
    cap.release()
    try:
        check_video_frame_size(info, max_pixels, name)
    except ImageTooLargeError as e:
        raise Rejected(413, one_line(e), reason="too_large") from None
    if info.fps > 0 and info.frames / info.fps > max_seconds:
        raise Rejected(413, f"{name}: video too long ({info.frames / info.fps:.1f} s; the limit is "
                            f"{max_seconds:g} s)", reason="too_large")
    return info


def _job_or_404(request: Request, job_id: str) -> tuple[Path, dict[str, Any]]:
    d = _jobs_dir(request.app.state)
    _sweep(d, request.app.state.settings.video_job_ttl_s)
    job = _read_job(d, job_id) if _ID.match(job_id) else None
    if job is None or job["status"] == "uploading" or job.get("owner") != _owner(request):
        raise Rejected(404, f"no video job '{one_line(job_id, 40)}' (unknown, or expired)", reason="not_found")
    return d, job


@router.get("/v1/videos/{job_id}", summary="A video job's progress, then its per-track summary")
async def get_video(request: Request, job_id: str) -> dict[str, Any]:
    _, job = _job_or_404(request, job_id)
    ttl = request.app.state.settings.video_job_ttl_s
    job["expires_in_s"] = None if job.get("finished") is None else round(max(0.0, ttl - (time.time() -
                                                                                         job["finished"])), 1)
    return _public(job)


@router.delete("/v1/videos/{job_id}", summary="Cancel a video job and forget it")
async def cancel_video(request: Request, job_id: str) -> dict[str, Any]:
    d, job = _job_or_404(request, job_id)
    if job["status"] in _ACTIVE:
        (d / f"{job_id}.cancel").touch()  # the worker running it stops at its next progress check
    (d / f"{job_id}.json").unlink(missing_ok=True)
    if job["status"] not in _ACTIVE:
        _forget(d, job_id)
    return {"id": job_id, "status": "cancelled" if job["status"] in _ACTIVE else "deleted"}


# -- live tracking of webcam frames ------------------------------------------------------------------------------------

class _Session:
    def __init__(self) -> None:
        from ferkit.infer.track import FaceTracker, ScoreSmoother

        self.tracker, self.smoother = FaceTracker(10.0), ScoreSmoother()
        self.t0 = time.monotonic()
        self.seen = self.t0
        self.lock = threading.Lock()


def _session(state: Any, owner: str | None, sid: str) -> _Session:
    """Live session ``sid`` of ``owner`` (an API key's client id, or None without keys), made on first use.

    Each owner has its own sessions, at most :data:`MAX_SESSIONS` of them (its least recently used one is dropped for
    a new one): a client can neither post into nor evict another key's session.
    """
    _jobs_dir(state)  # creates the lock
    with state.video_lock:
        owners: dict[str | None, OrderedDict[str, _Session]] | None = getattr(state, "live_sessions", None)
        if owners is None:
            owners = state.live_sessions = {}
        now = time.monotonic()
        for who in list(owners):
            for k in [k for k, v in owners[who].items() if now - v.seen > SESSION_IDLE_S]:
                del owners[who][k]
            if not owners[who]:
                del owners[who]
        sessions = owners.setdefault(owner, OrderedDict())
        sess = sessions.get(sid)
        if sess is None:
            sess = sessions[sid] = _Session()
            while len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)
        sessions.move_to_end(sid)
        sess.seen = now
        return sess


def _track_frame(state: Any, data: bytes, name: str, owner: str | None, session: str) -> dict[str, Any]:
    from ferkit.infer.results import Face

    rec = state.recognizer
    image = rec.load(data, name=name, max_pixels=state.settings.max_pixels)
    sess = _session(state, owner, session)
    with sess.lock:  # one session's frames in order
        t = time.monotonic() - sess.t0
        dets = rec.detector.detect(image)
        ids = sess.tracker.update(dets, image, t)
        probs = rec.classify(rec.crops(image, [d.box for d in dets])) if dets else []
        faces = []
        for d, tid, p in zip(dets, ids, probs):
            i = int(p.argmax())
            sm = None if tid is None else sess.smoother.update(tid, t, p)
            faces.append(Face(d.box, rec.classes[i], float(p[i]), dict(zip(rec.classes, map(float, p))),
                              det_score=float(d.score), track=tid,
                              smoothed=None if sm is None else dict(zip(rec.classes, map(float, sm)))).to_dict())
    h, w = image.shape[:2]
    return {"model": state.label, "classes": list(rec.classes), "image": {"width": w, "height": h},
            "time": round(t, 3), "faces": faces}


@router.post("/v1/track", summary="Track the faces of one webcam frame within a session (live mode)")
async def track_frame(request: Request, session: str = Query(..., min_length=8, max_length=64,
                                                              pattern=r"^[A-Za-z0-9_-]+$")) -> dict[str, Any]:
    from ferkit.serve.routes import run_upload

    t0 = time.perf_counter()
    out = await run_upload(request, _track_frame, _owner(request), session)
    out["time_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return out
