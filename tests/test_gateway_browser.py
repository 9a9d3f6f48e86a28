"""The gateway's page in a real headless browser: Debian's chromium driven by Playwright.

Playwright never downloads a browser here: it launches /usr/bin/chromium
(`make test` installs it). The screenshot is kept under out/test-artifacts/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD, TINY_SDXL
from pipelines.tiny_svd import TINY_SVD
from tests.conftest import RunningOrchestrator
from tests.gateway_helpers import gateway_on_loopback
from tests.loopback import WireFaults, loopback_orchestrator
from tests.test_image_pipelines import image_bytes
from tests.test_network_pipelines import orchestrator_with_all

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"


async def test_page_shows_previews_progress_cost_and_result(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    assert Path(CHROMIUM).exists(), "install Debian's chromium (make test does: apt-get install)"
    async with (
        gateway_on_loopback([running.url], tmp_path / "outputs") as gw,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 820})
            await page.goto(gw.url + "/")
            await page.fill("#prompt", "a red lighthouse on a cliff at dusk")
            await page.fill("#width", "64")
            await page.fill("#height", "64")
            await page.fill("#steps", "24")
            await page.fill("#preview_every", "4")
            await page.fill("#seed", "11")
            await page.click("#submit")

            result = page.locator("#result-media")
            await result.wait_for(state="visible", timeout=60_000)
            # The result image loaded from the gateway's output URL.
            await page.wait_for_function(
                "document.getElementById('result-media').naturalWidth === 64", timeout=10_000
            )
            preview = page.locator("#preview")
            steps = (await preview.get_attribute("data-steps") or "").split(",")
            assert int(await preview.get_attribute("data-changes") or 0) >= 2
            assert steps == ["4", "8", "12", "16", "20", "24"]
            assert "24 / 24" in await page.inner_text("#progress-text") or "done" in (
                await page.inner_text("#progress-text")
            )
            assert "paid for a fee of" in await page.inner_text("#cost")
            assert running.url in await page.inner_text("#orchestrator")
            assert await page.inner_text("#status") == "done"

            shot = tmp_path / "gateway-page.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "gateway-page.png")
    assert (ARTIFACTS / "gateway-page.png").stat().st_size > 10_000


async def test_page_uploads_an_image_for_both_image_pipelines(
    tiny_model: LoadedModel,
    tiny_sdxl_model: LoadedModel,
    tiny_svd_model: LoadedModel,
    tmp_path: Path,
) -> None:
    upload = tmp_path / "input.png"
    upload.write_bytes(image_bytes(48, 32))
    models = {TINY_SD: tiny_model, TINY_SDXL: tiny_sdxl_model, TINY_SVD: tiny_svd_model}
    async with (
        orchestrator_with_all(models) as running,
        gateway_on_loopback([running.url], tmp_path / "outputs") as gw,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 820})
            await page.goto(gw.url + "/")
            # image-to-image: the output takes the uploaded image's size (48x32).
            await page.select_option("#pipeline", "image-to-image")
            assert await page.locator("#width").is_hidden()
            await page.set_input_files("#image", str(upload))
            await page.fill("#model_id", TINY_SDXL)
            await page.fill("#strength", "0.5")
            await page.fill("#steps", "8")
            await page.fill("#preview_every", "2")
            await page.click("#submit")
            await page.wait_for_function(
                "document.getElementById('result-media')?.naturalWidth === 48", timeout=60_000
            )
            assert await page.get_attribute("#preview", "data-steps") == "2,4"
            assert await page.inner_text("#status") == "done"

            # image-to-video: the MP4 plays in the page at width x height.
            await page.select_option("#pipeline", "image-to-video")
            assert await page.locator("#prompt").is_hidden()
            await page.fill("#width", "64")
            await page.fill("#height", "48")
            await page.fill("#model_id", TINY_SVD)
            await page.fill("#num_frames", "4")
            await page.fill("#steps", "3")
            await page.click("#submit")
            await page.wait_for_function(
                "document.getElementById('result-media')?.videoWidth === 64", timeout=60_000
            )
            assert await page.inner_text("#status") == "done"
            shot = tmp_path / "gateway-page-video.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "gateway-page-video.png")


async def test_page_shows_the_orchestrator_change_of_a_failover(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    """The orchestrator shown changes when the job moves, and the job still finishes."""
    async with (
        loopback_orchestrator(tiny_model, wire=WireFaults(close_after=4)) as bad,
        loopback_orchestrator(tiny_model) as good,
        gateway_on_loopback([bad.url, good.url], tmp_path / "outputs", first=bad.url) as gw,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 820})
            await page.goto(gw.url + "/")
            await page.fill("#prompt", "a lighthouse in a storm")
            for field, text in (("#width", "64"), ("#height", "64"), ("#steps", "8")):
                await page.fill(field, text)
            await page.fill("#preview_every", "2")
            await page.click("#submit")
            await page.locator("#result-media").wait_for(state="visible", timeout=60_000)
            shown = page.locator("#orchestrator")
            assert await shown.get_attribute("data-changes") == "2"  # selected, then moved
            text = await shown.inner_text()
            assert text.startswith(good.url)
            assert f"moved from {bad.url} (disconnect), resumed at step 4" in text
            assert "paid for a fee of" in await page.inner_text("#cost")
            shot = tmp_path / "gateway-page-failover.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "gateway-page-failover.png")
