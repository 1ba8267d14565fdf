"""The web page's live mode in a real headless Chromium against a real server (bundled fer3): Chromium's fake
camera plays a real clip of two wild-dev faces (a .y4m file), the page tracks them through /v1/track and shows each
face's track ID and smoothed label, and a live timeline."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from videoclips import WILD, Actor, load_face, write_clip

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

from test_webpage import CHROMIUM, camera_page, wait_js  # noqa: E402

pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"chromium not installed at {CHROMIUM}"),
              pytest.mark.skipif(not WILD.is_dir(), reason=f"no wild-dev photos at {WILD}")]


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two people side by side, nodding a little (the clip loops, so they must be where they started at its end)."""
    import math

    d = tmp_path_factory.mktemp("live")
    happy, sad = load_face("happy", 0), load_face("sad", 0)
    mp4 = write_clip(d / "cam.mp4", [
        Actor(happy, lambda t: (170, 240 + 12 * math.sin(t * math.pi), 150)),
        Actor(sad, lambda t: (470, 240 - 12 * math.sin(t * math.pi), 140)),
    ], 4.0, 15)
    y4m = d / "cam.y4m"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(mp4), "-pix_fmt",
                    "yuv420p", str(y4m)], check=True)
    return y4m


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory, running_server: Callable) -> Iterator[str]:
    d = tmp_path_factory.mktemp("live-server")
    with running_server("fer3", d / "server.log", workers=1, access_log=False) as (base, _):
        yield base


def test_live_mode_shows_track_ids_smoothed_labels_and_timeline(live_server: str, camera_clip: Path,
                                                                 tmp_path: Path) -> None:
    with sync_api.sync_playwright() as p, camera_page(p, live_server, camera_clip) as page:
        page.click("#live-start")
        wait_js(page, "+document.getElementById('live-canvas').dataset.frames >= 15", 120)
        time.sleep(3)  # a few seconds of steady state for the rate
        canvas = page.locator("#live-canvas")
        frames, fps = int(canvas.get_attribute("data-frames")), float(canvas.get_attribute("data-fps"))
        tracks = canvas.get_attribute("data-tracks")
        stats = page.text_content("#live-stats")
        page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
        page.click("#live-stop")
        print(f"live mode: {frames} frames at {fps:.1f} frames/s; tracks {tracks}; {stats}")
    assert tracks == "1,2", tracks  # two people, two IDs, kept through the whole run (and the clip's loops)
    assert "#1 happy" in stats and "#2 sad" in stats, stats
    assert fps > 1.0
