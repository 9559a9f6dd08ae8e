"""The web page in a real browser: Debian's chromium driven by Playwright, against a gateway (HTTP on a
free port) in front of real stage servers. Click an example prompt, click Generate, watch the progress
bar and the elapsed time and time left, see the video play; on a phone (390 px wide) every control is
on screen with no sideways scrolling; a cancel reads as an outcome, not an error; after a failure or
a cancel the last video does not stay on the stage, dimmed; an empty prompt shows the API's sentence;
with API keys on, the page asks for one.

Never `playwright install` (no browser downloads here): `make test` installs Debian's chromium. If the
browser cannot start, these tests fail and say how to install it; they are never skipped.
Set T2V_WEB_SCREENSHOT=docs/img/web-page.png (and T2V_WEB_PHONE_SCREENSHOT=docs/img/web-page-phone.png)
to keep the finished page's screenshots for the docs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from PIL import Image

from t2v.train import world
from tests.conftest import RunningStage, start_gateway, stop_gateway

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = ("install Debian's chromium with `apt-get update && apt-get install -y chromium` (make test does it), "
           "and Playwright with `.venv/bin/pip install -e '.[test]'`; never `playwright install`")
# Every text the status line, the step counter and the timing line showed, and every width of the bar,
# as they change.
RECORDER = """() => {
  window.__seen = [];
  const note = () => window.__seen.push([document.getElementById('status-text').textContent,
                                         document.getElementById('progress-text').textContent,
                                         parseFloat(document.getElementById('progress-bar').style.width) || 0,
                                         document.getElementById('timing').textContent]);
  new MutationObserver(note).observe(document.querySelector('.progress'),
                                     {subtree: true, childList: true, characterData: true, attributes: true});
}"""
# Every live preview the stage showed, as it loaded: its picture's own size, how big and how it is drawn, the
# note over it, and what the status line said then.
PREVIEW_RECORDER = """() => {
  window.__previews = [];
  const img = document.getElementById('preview');
  img.addEventListener('load', () => {
    const box = img.getBoundingClientRect();
    window.__previews.push({src: img.src.slice(0, 22), width: img.naturalWidth, height: img.naturalHeight,
                            shownWidth: box.width, shown: img.classList.contains('shown'),
                            visible: getComputedStyle(img).display !== 'none',
                            rendering: getComputedStyle(img).imageRendering,
                            note: document.getElementById('preview-note').textContent,
                            status: document.getElementById('status-text').textContent});
  });
}"""
# Every control of the page that a person uses, as CSS selectors.
CONTROLS = ["#prompt", "button.example", "#negative", "#frames", "#steps", "#guidance", "#seed", "#size", "#priority",
            "#generate", "#cancel", "#download", "#recent button"]
# For each element of a selector: its box, and whether a click at its centre lands on it (nothing over it).
HIT = """(selector) => [...document.querySelectorAll(selector)].map((element) => {
  element.scrollIntoView({block: 'center', inline: 'nearest'});
  const box = element.getBoundingClientRect();
  const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
  return {left: box.left, right: box.right, top: box.top, bottom: box.bottom, width: box.width,
          onTop: hit !== null && (hit === element || element.contains(hit)), text: element.textContent.trim()};
})"""
DURATION = r"(?:\d+ min )?\d+(?:\.\d)? s"          # 4.2 s, 42 s, 2 min 05 s
ELAPSED_AND_LEFT = re.compile(rf"Elapsed ({DURATION}) · about ({DURATION}) left")


def seconds(text: str) -> float:
    """A DURATION's seconds."""
    minutes, _, rest = text.rpartition(" min ")
    return 60 * int(minutes or 0) + float(rest.removesuffix(" s"))
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


def at_the_defaults(page: Any, example: int, seed: int = 5) -> str:
    """Click example prompt number ``example``, leave every setting at the model's default but the seed."""
    page.locator("button.example").nth(example).click()
    for field in ("#frames", "#steps", "#guidance", "#size"):
        page.fill(field, "")
    page.fill("#seed", str(seed))
    return page.input_value("#prompt")


def wait_done(page: Any, timeout: float = 120_000) -> None:
    page.wait_for_function("document.getElementById('status-text').textContent === 'Done'", timeout=timeout)
    page.wait_for_function("document.getElementById('video').readyState >= 2", timeout=10_000)


def settle_for_a_picture(page: Any) -> None:
    """The mouse off the page and 3 s of playing, so that chromium's video controls have faded."""
    page.mouse.move(0, 0)
    page.wait_for_timeout(3_000)


def stage_state(page: Any) -> dict[str, Any]:
    """What the result area shows: the video (visible, dimmed) or the sentence in its place."""
    return page.evaluate("""() => ({video: getComputedStyle(document.getElementById('video')).display !== 'none',
        dimmed: document.getElementById('video').classList.contains('stale'),
        opacity: getComputedStyle(document.getElementById('video')).opacity,
        empty: getComputedStyle(document.getElementById('empty')).display !== 'none'
               ? document.getElementById('empty').textContent : null})""")


def distinct_colours(path: Path) -> int:
    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 24) or [])


def test_generate_shows_progress_and_plays_the_video(make_gateway, page, tmp_path) -> None:
    """An example prompt at the embedded model's defaults (64x64, 16 frames, 50 steps): the video the
    docs show (T2V_WEB_SCREENSHOT), with the elapsed time and the time left while it denoises."""
    page.goto(make_gateway().http_url + "/")
    page.wait_for_selector("#health-dot.ok", timeout=15_000)
    page.evaluate(RECORDER)
    page.evaluate(PREVIEW_RECORDER)
    at_the_defaults(page, 0)
    page.select_option("#priority", "high")
    page.click("#generate")

    wait_done(page)
    # While it denoised, the latest live preview took the checkerboard's place: 16 frames of 8x8 latents in a
    # 4 x 4 grid, drawn pixel for pixel at many times its size; once the video plays, it is gone.
    previews = page.evaluate("window.__previews")
    assert len(previews) >= 3, f"fewer than 3 previews were shown in 50 steps: {previews}"
    for preview in previews:
        assert preview["src"] == "data:image/png;base64," and (preview["width"], preview["height"]) == (32, 32)
        assert preview["shown"] and preview["visible"] and preview["shownWidth"] >= 4 * 32, preview
        assert preview["rendering"] == "pixelated", preview
        assert re.fullmatch(r"preview · step \d+ / 50", preview["note"]), preview
    steps_shown = [int(p["note"].split()[3]) for p in previews]
    assert steps_shown == sorted(steps_shown) and all(step % 5 == 0 for step in steps_shown), steps_shown
    assert not page.is_visible("#preview") and not page.is_visible("#preview-note") and page.is_visible("#video")
    seen = page.evaluate("window.__seen")
    steps = [side for _, side, _, _ in seen if re.fullmatch(r"step \d+ / 50", side)]
    assert steps, f"no 'step N / 50' was shown; the page showed {seen}"   # (the observer sees batches)
    widths = [width for _, _, width, _ in seen]
    assert widths == sorted(widths) and widths[-1] == 100 and len(set(widths)) >= 3, (
        f"the progress bar did not move forward: {widths}")
    assert page.get_attribute("#progress-bar", "class") == "done"
    assert not page.is_visible("#error")
    # While it ran: the time since the click, ticking, and from the pace of the steps the time left.
    timings = [timing for _, _, _, timing in seen if timing]
    assert timings and timings[0].startswith("Elapsed "), timings
    estimates = [ELAPSED_AND_LEFT.fullmatch(timing) for timing in timings]
    estimates = [(seconds(m.group(1)), seconds(m.group(2))) for m in estimates if m]
    assert len(estimates) >= 3, f"no 'Elapsed N s · about M s left' while it denoised: {timings}"
    elapsed = [first for first, _ in estimates]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0], f"the elapsed time did not tick: {timings}"
    assert estimates[-1][1] < estimates[0][1] or estimates[0][1] == 1, f"the time left did not go down: {timings}"
    assert re.fullmatch(f"in {DURATION}", page.inner_text("#progress-text")), page.inner_text("#progress-text")

    video = page.evaluate(VIDEO_STATE)
    assert re.search(r"/v1/videos/[0-9a-f]{32}/content$", video["src"]), video
    assert (video["width"], video["height"]) == (64, 64)
    assert abs(video["duration"] - 16 / 8) < 0.05, video          # 16 frames at 8 fps
    page.wait_for_function("(() => { const v = document.getElementById('video');"
                           " return !v.paused && v.played.length > 0; })()", timeout=10_000)
    link = page.locator("#download")
    assert link.is_visible() and link.get_attribute("href") == video["src"].removeprefix(
        page.url.rstrip("/")) and link.get_attribute("download").endswith(".mp4")
    chips = page.inner_text("#meta")
    assert "64x64" in chips and "seed 5" in chips and "50 steps" in chips
    page.wait_for_selector("#recent .badge.completed")

    shot = tmp_path / "page.png"
    settle_for_a_picture(page)
    page.screenshot(path=str(shot))
    with Image.open(shot) as image:
        assert image.size == (1280, 800)
    assert shot.stat().st_size > 20_000 and distinct_colours(shot) > 200
    frame = tmp_path / "video.png"
    page.locator("#video").screenshot(path=str(frame))
    assert distinct_colours(frame) > 20, "the video element shows a blank picture"
    if os.environ.get("T2V_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["T2V_WEB_SCREENSHOT"])


def test_on_a_phone_every_control_is_on_screen_and_nothing_scrolls_sideways(make_gateway, browser) -> None:
    """390 x 844, a phone's viewport: the page was 535-742 px wide once a long prompt was in Recent videos
    (the grid's columns grew to its unwrapped text), Guidance, Priority and Cancel off screen."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(make_gateway().http_url + "/")
        page.wait_for_selector("#health-dot.ok", timeout=15_000)
        page.fill("#prompt", "an orange triangle spinning over a dark green background")   # long, in Recent
        page.fill("#seed", "3")
        page.click("#generate")
        wait_done(page)
        page.wait_for_selector("#recent button", timeout=10_000)     # its Play button

        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide on a 390 px screen: it scrolls sideways"
        for selector in CONTROLS:
            boxes = page.evaluate(HIT, selector)
            assert boxes, f"no {selector} on the page"
            for box in boxes:
                assert box["width"] > 0 and box["left"] >= 0 and box["right"] <= 390, (
                    f"{selector} {box['text']!r} is not within the 390 px screen: {box}")
                assert box["top"] >= 0 and box["bottom"] <= 844, f"{selector} cannot be scrolled into view: {box}"
                assert box["onTop"], f"{selector} {box['text']!r} is covered: a tap on it lands elsewhere ({box})"
        if os.environ.get("T2V_WEB_PHONE_SCREENSHOT"):
            page.evaluate("window.scrollTo(0, 0)")
            settle_for_a_picture(page)
            page.screenshot(path=os.environ["T2V_WEB_PHONE_SCREENSHOT"], full_page=True, scale="css")
        # And they work there, by touch: an example fills the prompt, the settings take values.
        page.locator("button.example").nth(1).tap()
        assert page.input_value("#prompt") == page.locator("button.example").nth(1).inner_text()
        page.locator("#guidance").tap()
        page.keyboard.type("7.5")
        page.select_option("#priority", "low")
        assert page.input_value("#guidance") == "7.5" and page.input_value("#priority") == "low"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
    assert errors == [], f"the page raised JavaScript errors: {errors}"


def test_the_example_prompts_are_in_the_embedded_models_words(make_gateway, page) -> None:
    """Each example is a caption in the phrasings the embedded model was trained on (docs/model.md:
    t2v/train/world.py's TRAIN templates), and a click puts it in the prompt."""
    page.goto(make_gateway().http_url + "/")
    known = {caption for spec in world.train_specs() + world.heldout_specs() for caption in world.all_captions(spec)}
    examples = page.locator("button.example")
    assert examples.count() >= 4
    shown = set()
    for i in range(examples.count()):
        text = examples.nth(i).inner_text().strip()
        assert text in known, f"example {text!r} is not a phrasing the embedded model was trained on"
        examples.nth(i).click()
        assert page.input_value("#prompt") == text
        shown.add(text)
    words = " ".join(shown)
    assert len({shape for shape in ("circle", "ball", "square", "box", "triangle") if shape in words}) >= 3
    assert len({motion for motion in ("right", "up", "spinning", "growing", "falling", "left", "shrinking")
                if motion in words}) >= 4, "the examples should show off different motions"


def test_a_cancel_reads_as_an_outcome_and_clears_the_stage(make_gateway, page) -> None:
    page.goto(make_gateway().http_url + "/")
    page.wait_for_selector("#health-dot.ok", timeout=15_000)
    fill_and_generate(page, "a blue box growing", frames=2, steps=2)
    wait_done(page)

    page.evaluate(RECORDER)
    at_the_defaults(page, 3)
    page.fill("#steps", "200")                          # long enough to be cancelled while it runs
    page.click("#generate")
    page.wait_for_function(f"/{ELAPSED_AND_LEFT.pattern}/.test(document.getElementById('timing').textContent)",
                           timeout=60_000)
    assert stage_state(page)["dimmed"], "while the new video is made, the last one is shown dimmed"
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status-text').textContent === 'Cancelled'", timeout=30_000)
    page.wait_for_selector("#recent .badge.cancelled", timeout=10_000)

    assert not page.is_visible("#error"), f"a cancel is not an error: {page.inner_text('#error')!r}"
    notice = page.inner_text("#notice")
    assert notice.startswith("You cancelled this video; nothing was made."), notice
    assert "DELETE" not in notice and "/v1/" not in notice, notice
    assert re.fullmatch(f"after {DURATION}", page.inner_text("#progress-text")), page.inner_text("#progress-text")
    assert page.get_attribute("#progress-bar", "class") == "cancelled"
    assert page.get_attribute("#recent .badge.cancelled", "class") == "badge cancelled"   # grey, not red
    assert stage_state(page) == {"video": False, "dimmed": False, "opacity": "1",
                                 "empty": "Cancelled: no video was made"}
    assert not page.is_visible("#download") and page.inner_text("#meta") == ""
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")
    assert page.inner_text("#timing") == ""             # the clock stopped


def test_after_an_error_the_last_video_does_not_stay_dimmed(make_gateway, page) -> None:
    page.goto(make_gateway().http_url + "/")
    page.wait_for_selector("#health-dot.ok", timeout=15_000)
    fill_and_generate(page, "a red ball moving right", frames=2, steps=2)
    wait_done(page)
    shown = page.evaluate(VIDEO_STATE)["src"]

    # Refused (nothing started): the last video stays as it was, its download link and chips too.
    page.fill("#prompt", " ")
    page.click("#generate")
    page.wait_for_selector("#error.shown", timeout=10_000)
    assert page.inner_text("#status-text") == "Not started"
    assert stage_state(page) == {"video": True, "dimmed": False, "opacity": "1", "empty": None}
    assert page.evaluate(VIDEO_STATE)["src"] == shown and page.is_visible("#download") and page.inner_text("#meta")

    # Accepted, then failed: a job with a deadline it cannot meet (timeout_seconds, sent as an API client
    # would; the page itself sets none) fails in the gateway. The last video leaves the stage.
    def with_deadline(route: Any) -> None:
        body = route.request.post_data_json
        route.continue_(post_data=json.dumps({**body, "timeout_seconds": 0.5}))

    page.route("**/v1/videos", lambda route: with_deadline(route) if route.request.method == "POST"
               else route.continue_())
    at_the_defaults(page, 2)
    page.click("#generate")
    page.wait_for_function("document.getElementById('status-text').textContent === 'Failed'", timeout=60_000)
    error = page.inner_text("#error")
    assert page.is_visible("#error") and error[0].isupper() and "deadline" in error.lower(), error
    assert stage_state(page) == {"video": False, "dimmed": False, "opacity": "1", "empty": "No video: the job failed"}
    assert not page.is_visible("#download") and page.inner_text("#meta") == ""
    assert not page.is_visible("#notice")


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
