"""The web page in a real browser: Debian's chromium driven by Playwright, against a gateway (HTTP on a
free port) in front of real stage servers. Type a prompt, click Generate, watch the progress bar, see
the video play; an empty prompt shows the API's sentence; with API keys on, the page asks for one.

Never `playwright install` (no browser downloads here): `make test` installs Debian's chromium. If the
browser cannot start, these tests fail and say how to install it; they are never skipped.
Set T2V_WEB_SCREENSHOT=docs/img/web-page.png to keep the finished page's screenshot for the docs.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from PIL import Image

from tests.conftest import RunningStage, start_gateway, stop_gateway

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = ("install Debian's chromium with `apt-get update && apt-get install -y chromium` (make test does it), "
           "and Playwright with `.venv/bin/pip install -e '.[test]'`; never `playwright install`")
# Every text the status line and the step counter showed, and every width of the bar, as they change.
RECORDER = """() => {
  window.__seen = [];
  const note = () => window.__seen.push([document.getElementById('status-text').textContent,
                                         document.getElementById('progress-text').textContent,
                                         parseFloat(document.getElementById('progress-bar').style.width) || 0]);
  new MutationObserver(note).observe(document.querySelector('.progress'),
                                     {subtree: true, childList: true, characterData: true, attributes: true});
}"""
VIDEO_STATE = """() => { const v = document.getElementById('video');
  return {src: v.currentSrc, ready: v.readyState, duration: v.duration, width: v.videoWidth,
          height: v.videoHeight, time: v.currentTime, paused: v.paused, played: v.played.length}; }"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.fail(f"Playwright is not installed ({error}); {INSTALL}")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} does not exist; {INSTALL}")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        except Exception as error:  # noqa: BLE001 - any launch failure gets the same advice
            pytest.fail(f"chromium at {CHROMIUM} did not start ({str(error).splitlines()[0]}); {INSTALL}")
        yield browser
        browser.close()


@pytest.fixture
def make_gateway(text_encoder_stage: RunningStage, denoiser_stage: RunningStage, decoder_stage: RunningStage,
                 tmp_path: Path) -> Iterator[Callable[..., RunningStage]]:
    started: list[RunningStage] = []

    def make(**overrides: Any) -> RunningStage:
        gateway = start_gateway(text_encoder_stage.address, denoiser_stage.address, decoder_stage.address,
                                state_dir=str(tmp_path / f"state{len(started)}"), http_port=0, **overrides)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        stop_gateway(gateway)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"the page raised JavaScript errors: {errors}"


def fill_and_generate(page: Any, prompt: str, frames: int = 2, steps: int = 6) -> None:
    page.fill("#prompt", prompt)
    page.fill("#frames", str(frames))
    page.fill("#steps", str(steps))
    page.fill("#size", "32x32")
    page.fill("#seed", "5")
    page.select_option("#priority", "high")
    page.click("#generate")


def distinct_colours(path: Path) -> int:
    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 24) or [])


def test_generate_shows_progress_and_plays_the_video(make_gateway, page, tmp_path) -> None:
    page.goto(make_gateway().http_url + "/")
    page.wait_for_selector("#health-dot.ok", timeout=15_000)
    page.evaluate(RECORDER)
    fill_and_generate(page, "a red ball moving right on a black background", frames=2, steps=6)

    page.wait_for_function("document.getElementById('video').readyState >= 2", timeout=60_000)
    page.wait_for_function("document.getElementById('status-text').textContent === 'Done'", timeout=10_000)
    seen = page.evaluate("window.__seen")
    steps = [side for _, side, _ in seen if re.fullmatch(r"step \d+ / 6", side)]
    assert steps, f"no 'step N / 6' was shown; the page showed {seen}"   # (the observer sees batches)
    widths = [width for _, _, width in seen]
    assert widths == sorted(widths) and widths[-1] == 100 and len(set(widths)) >= 3, (
        f"the progress bar did not move forward: {widths}")
    assert page.get_attribute("#progress-bar", "class") == "done"
    assert not page.is_visible("#error")

    video = page.evaluate(VIDEO_STATE)
    assert re.search(r"/v1/videos/[0-9a-f]{32}/content$", video["src"]), video
    assert (video["width"], video["height"]) == (32, 32)
    assert abs(video["duration"] - 2 / 8) < 0.05, video          # 2 frames at 8 fps
    page.wait_for_function("(() => { const v = document.getElementById('video');"
                           " return !v.paused && v.played.length > 0; })()", timeout=10_000)
    link = page.locator("#download")
    assert link.is_visible() and link.get_attribute("href") == video["src"].removeprefix(
        page.url.rstrip("/")) and link.get_attribute("download").endswith(".mp4")
    chips = page.inner_text("#meta")
    assert "32x32" in chips and "seed 5" in chips and "6 steps" in chips
    page.wait_for_selector("#recent .badge.completed")

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    with Image.open(shot) as image:
        assert image.size == (1280, 800)
    assert shot.stat().st_size > 20_000 and distinct_colours(shot) > 200
    frame = tmp_path / "video.png"
    page.locator("#video").screenshot(path=str(frame))
    assert distinct_colours(frame) > 20, "the video element shows a blank picture"
    if os.environ.get("T2V_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["T2V_WEB_SCREENSHOT"])


def test_an_empty_prompt_shows_the_api_sentence(make_gateway, page) -> None:
    page.goto(make_gateway().http_url + "/")
    page.click("#generate")
    page.wait_for_selector("#error.shown", timeout=10_000)
    text = page.inner_text("#error")
    assert text.startswith("Prompt is empty; describe the video you want"), text
    assert page.inner_text("#status-text") == "Not started"
    assert not page.is_visible("#video")


def test_with_api_keys_the_page_asks_for_one_and_uses_it(make_gateway, page, monkeypatch) -> None:
    monkeypatch.setenv("T2V_API_KEYS", "page-key")
    page.goto(make_gateway().http_url + "/")
    page.wait_for_selector("#keybox.shown", timeout=10_000)       # the first API call got a 401
    fill_and_generate(page, "a blue cube", frames=2, steps=2)
    page.wait_for_selector("#error.shown", timeout=10_000)
    assert "needs an API key" in page.inner_text("#error")

    page.fill("#api-key", "page-key")
    page.dispatch_event("#api-key", "change")
    page.click("#generate")
    page.wait_for_function("document.getElementById('video').readyState >= 2", timeout=60_000)
    assert page.evaluate(VIDEO_STATE)["src"].startswith("blob:")   # fetched with the key, played from memory
    assert page.evaluate("localStorage.getItem('t2v.apiKey')") == "page-key"
    assert not page.is_visible("#error")
