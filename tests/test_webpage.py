"""The web page in a real headless Chromium (Playwright) against a real server process."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from shared_data import WILD

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


CLASSES = ("happy", "sad", "neutral")
CHROMIUM = os.environ.get("FERKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"chromium not installed at {CHROMIUM} (apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, running_server: Callable) -> Iterator[str]:
    d = tmp_path_factory.mktemp("webpage")
    model = "fer3"  # the bundled model runs from its ONNX sibling: no torch, no conversion at start
    with running_server(model, d / "server.log", max_upload_mb=2, access_log=False) as (base, _):
        yield base


@pytest.fixture(scope="module")
def playwright() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: object) -> Iterator[object]:
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def photo() -> Path:
    files = sorted((WILD / "happy").glob("*.jpg"))
    if not files:
        pytest.skip(f"no wild-dev photos at {WILD}")
    # a modest photo (fast to upload and decode) that is not a tiny thumbnail
    sized = [f for f in files[:40] if min(Image.open(f).size) >= 300] or files
    return min(sized, key=lambda f: f.stat().st_size)


def wait_js(page: object, expr: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression until it is truthy (``page.wait_for_function`` evaluates strings with ``eval``
    in the page, which the page's Content-Security-Policy rightly forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expr):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expr}")
        page.wait_for_timeout(100)


def open_page(browser: object, base: str) -> tuple[object, object, list[str]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.goto(base + "/")
    wait_js(page, "document.getElementById('model-info').textContent.includes('classes')")
    return context, page, console_errors


def test_upload_photo_shows_result(server: str, browser: object, photo: Path, tmp_path: Path) -> None:
    context, page, console_errors = open_page(browser, server)
    try:
        assert "happy, sad, neutral" in page.text_content("#model-info")
        # what the server says about this photo, to compare with what the page shows
        expected = httpx.post(
            server + "/v1/predict", files={"file": (photo.name, photo.read_bytes())}, timeout=60
        ).json()
        assert expected["faces"]

        page.set_input_files("#file-input", str(photo))
        page.wait_for_selector("#canvas[data-state='done']", timeout=60_000)
        assert page.is_hidden("#error")
        canvas = page.locator("#canvas")
        assert int(canvas.get_attribute("data-faces")) == len(expected["faces"])
        size = page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]")
        assert size[0] > 100 and size[1] > 100
        # the canvas really holds the photo (not a blank or placeholder)
        spread = page.evaluate("""() => {
            const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let lo = 255, hi = 0;
            for (let i = 0; i < d.length; i += 4 * 97) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
            return hi - lo;
        }""")
        assert spread > 50

        cards = page.locator("#faces li")
        assert cards.count() == len(expected["faces"])
        labels = [cards.nth(i).locator(".face-label").text_content() for i in range(cards.count())]
        assert labels == [f["label"] for f in expected["faces"]]
        bars = cards.nth(0).locator(".bar-row")
        assert bars.count() == len(CLASSES)
        assert [bars.nth(i).locator(".bar-name").text_content() for i in range(len(CLASSES))] == list(CLASSES)
        assert expected["faces"][0]["label"] in page.text_content("#summary")
        shot = tmp_path / "webpage-result.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert not console_errors, console_errors
    finally:
        context.close()


def test_non_image_upload_shows_error(server: str, browser: object, photo: Path, tmp_path: Path) -> None:
    context, page, _ = open_page(browser, server)
    try:
        bad = tmp_path / "notes.txt"
        bad.write_text("this is not a photo\n")
        page.set_input_files("#file-input", str(bad))
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        text = page.text_content("#error")
        assert "notes.txt" in text and "cannot identify image file" in text
        assert page.locator("#canvas").get_attribute("data-state") == "error"
        page.screenshot(path=str(tmp_path / "webpage-error.png"), full_page=True)

        # a file over the limit is refused in the page, before uploading
        big = tmp_path / "big.jpg"
        big.write_bytes(photo.read_bytes() + os.urandom(3 * 2**20))
        page.set_input_files("#file-input", str(big))
        wait_js(page, "document.getElementById('error').textContent.includes('limit')", 10)

        # and the page recovers: a good photo afterwards clears the error
        page.set_input_files("#file-input", str(photo))
        page.wait_for_selector("#canvas[data-state='done']", timeout=60_000)
        assert page.is_hidden("#error")
    finally:
        context.close()


def test_docs_page_renders_offline_and_tries_requests(server: str, browser: object, photo: Path) -> None:
    context = browser.new_context()
    page = context.new_page()
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(server) else None)
    try:
        page.goto(server + "/docs")
        page.wait_for_selector(".endpoint", timeout=10_000)
        text = page.text_content("#endpoints")
        assert "/v1/predict" in text and "/healthz" in text and "413" in text
        predict = page.locator("section[data-path='/v1/predict'][data-method='post']")
        # the response body is described field by field (from the typed response models)
        assert "Prediction" in predict.text_content() and "det_score" in predict.text_content()
        # and the request can be tried from the page
        predict.locator(".try-file").set_input_files(str(photo))
        predict.locator(".try-send").click()
        page.wait_for_selector("section[data-path='/v1/predict'] .try-out[data-status='200']", timeout=60_000)
        out = predict.locator(".try-out").text_content()
        assert '"faces"' in out and "X-Request-ID" in out
        ready = page.locator("section[data-path='/readyz']")
        ready.locator(".try-send").click()
        page.wait_for_selector("section[data-path='/readyz'] .try-out[data-status='200']", timeout=10_000)
        assert '"ready"' in ready.locator(".try-out").text_content()
        assert not [u for u in external if not u.startswith("data:")], external
    finally:
        context.close()


@contextlib.contextmanager
def camera_page(playwright: object, url: str, clip: Path | None = None) -> Iterator[object]:
    """The web page in Chromium with a fake camera already started: Chromium's moving test pattern, or ``clip``
    (a .y4m/.mjpeg video) played as the camera."""
    fake = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    if clip is not None:
        fake.append(f"--use-file-for-fake-video-capture={clip}")
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + fake, headless=True)
    try:
        context = b.new_context()
        context.grant_permissions(["camera"], origin=url)
        page = context.new_page()
        page.goto(url + "/")
        page.click("#webcam-start")
        wait_js(page, "document.getElementById('video').videoWidth > 0", 20)
        yield page
    finally:
        b.close()


def test_webcam_snapshot_with_fake_camera(server: str, playwright: object, tmp_path: Path) -> None:
    """Chromium's fake camera (a moving test pattern, no face) goes through getUserMedia → snapshot → /v1/predict."""
    with camera_page(playwright, server) as page:
        page.click("#snap")
        page.wait_for_selector("#canvas[data-state='done']", timeout=60_000)
        assert page.is_hidden("#error")
        assert int(page.locator("#canvas").get_attribute("data-faces")) >= 0
        assert "webcam snapshot" in page.text_content("#status")
        page.screenshot(path=str(tmp_path / "webpage-webcam.png"), full_page=True)
        page.click("#webcam-stop")
        assert page.is_hidden("#webcam")


WEB_KEY = "web-page-key-0042"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, running_server: Callable) -> Iterator[str]:
    d = tmp_path_factory.mktemp("webpage-keyed")
    (d / "keys.txt").write_text(WEB_KEY + "\n")
    with running_server("fer3", d / "server.log", api_keys=str(d / "keys.txt"), access_log=False) as (base, _):
        yield base


def test_page_asks_for_the_api_key(keyed_server: str, browser: object, photo: Path, tmp_path: Path) -> None:
    """A server started with --api-keys: the page asks for a key, says when it is wrong, and works with the right
    one (sent as a Bearer token with every request)."""
    context = browser.new_context()
    page = context.new_page()
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
    try:
        page.goto(keyed_server + "/")
        page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
        assert "needs an API key" in page.text_content("#model-info")
        page.fill("#api-key", "not-the-right-key")
        page.click("#key-submit")
        wait_js(page, "document.getElementById('key-why').textContent.includes('not accepted')", 10)
        assert page.is_visible("#key-form")
        page.screenshot(path=str(tmp_path / "webpage-key.png"), full_page=True)

        page.fill("#api-key", WEB_KEY)
        page.click("#key-submit")
        wait_js(page, "document.getElementById('model-info').textContent.includes('classes')", 10)
        assert page.is_hidden("#key-form")
        page.set_input_files("#file-input", str(photo))
        page.wait_for_selector("#canvas[data-state='done']", timeout=60_000)
        assert page.is_hidden("#error") and int(page.locator("#canvas").get_attribute("data-faces")) >= 1
        assert sent[-1] == f"Bearer {WEB_KEY}" and None in sent  # the first request went without a key
        # the API page in the same tab uses the same key for its "Try it" forms
        page.goto(keyed_server + "/docs")
        models = page.locator("section[data-path='/v1/models']")
        models.wait_for(timeout=10_000)
        assert page.input_value("#docs-key") == WEB_KEY
        models.locator(".try-send").click()
        page.wait_for_selector("section[data-path='/v1/models'] .try-out[data-status='200']", timeout=10_000)
    finally:
        context.close()
