"""The gateway's page in a real headless browser: Debian's chromium driven by Playwright.

Playwright never downloads a browser here: it launches /usr/bin/chromium
(`make test` installs it). The screenshots are kept under out/test-artifacts/.
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
from tests.loopback import FaultPlan, WireFaults, loopback_orchestrator
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


async def test_page_keeps_history_shows_every_image_reuses_a_seed_and_resets_after_an_error(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    assert Path(CHROMIUM).exists(), "install Debian's chromium (make test does: apt-get install)"
    shots: list[Path] = []
    async with (
        gateway_on_loopback([running.url], tmp_path / "outputs") as gw,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 900})
            await page.goto(gw.url + "/")
            # The model list comes from /offers, with prices.
            await page.wait_for_function(
                f"document.querySelector('#models option[value=\"{TINY_SD}\"]') !== null",
                timeout=10_000,
            )
            assert "wei/pixel-step" in await page.inner_text("#offers-hint")

            # Two images of one prompt: both shown, each with its seed and a download link.
            await page.fill("#prompt", "two lighthouses")
            for field, text in (("#width", "64"), ("#height", "64"), ("#steps", "4")):
                await page.fill(field, text)
            await page.fill("#preview_every", "2")
            await page.fill("#seed", "21")
            await page.fill("#guidance_scale", "6")
            await page.fill("#num_images", "2")
            await page.click("#submit")
            await page.wait_for_function(
                "[...document.querySelectorAll('#result .result-media')]"
                ".filter(i => i.naturalWidth === 64).length === 2",
                timeout=60_000,
            )
            results = page.locator("#result .result-media")
            assert [await results.nth(i).get_attribute("data-seed") for i in (0, 1)] == [
                "21",
                "22",
            ]  # ai-runner's rule: image i has seed + i
            downloads = page.locator("#result a.download")
            assert await downloads.count() == 2
            assert (await downloads.nth(1).get_attribute("href") or "").endswith(".png")
            assert await page.get_attribute("#progress", "role") == "progressbar"
            assert await page.get_attribute("#progress", "aria-valuenow") == "100"
            assert await page.get_attribute("#status", "aria-live") == "polite"

            # Reuse the second image's seed.
            await page.locator("#result .reuse-seed").nth(1).click()
            assert await page.input_value("#seed") == "22"

            # A job that fails: nothing of the last job, or of this one, stays on screen.
            await page.fill("#model_id", "nope/none")
            await page.click("#submit")
            await page.wait_for_function(
                "document.getElementById('status').classList.contains('error')", timeout=60_000
            )
            assert (await page.inner_text("#status")).startswith("unknown_model: ")
            assert await page.inner_text("#progress-text") == "failed: unknown_model"
            for field in ("#rate", "#eta", "#cost", "#tickets"):
                assert await page.inner_text(field) == "-", field
            assert await page.locator("#result .result-media").count() == 0
            assert "no result" in await page.inner_text("#result")
            assert await page.get_attribute("#progress", "aria-valuenow") == "0"
            assert await page.locator("#preview").is_hidden()
            shots.append(tmp_path / "gateway-page-error.png")
            await page.screenshot(path=str(shots[-1]), full_page=True)

            # The history survives a reload: both images, their seeds, and reuse.
            await page.reload()
            items = page.locator("#history .history-item")
            await page.wait_for_function(
                "[...document.querySelectorAll('#history img')]"
                ".filter(i => i.naturalWidth === 64).length === 2",
                timeout=10_000,
            )
            assert [await items.nth(i).get_attribute("data-seed") for i in (0, 1)] == ["21", "22"]
            await items.nth(0).locator(".reuse-seed").click()
            assert await page.input_value("#seed") == "21"
            assert await page.input_value("#prompt") == "two lighthouses"
            assert await page.input_value("#guidance_scale") == "6"
            shots.append(tmp_path / "gateway-page-history.png")
            await page.screenshot(path=str(shots[-1]), full_page=True)

            # On a phone the preview and result frames stack.
            await page.set_viewport_size({"width": 390, "height": 844})
            preview = await page.locator("#preview-frame").bounding_box()
            result = await page.locator("#result").bounding_box()
            assert preview is not None and result is not None
            assert result["y"] >= preview["y"] + preview["height"]
            assert preview["x"] + preview["width"] <= 390
            shots.append(tmp_path / "gateway-page-narrow.png")
            await page.screenshot(path=str(shots[-1]), full_page=True)
        finally:
            await browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in shots:
        shutil.copy(shot, ARTIFACTS / shot.name)


async def test_page_shows_the_input_image_and_resets_after_a_cancel(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    upload = tmp_path / "input.png"
    upload.write_bytes(image_bytes(48, 32))
    async with (
        loopback_orchestrator(tiny_model, FaultPlan(step_seconds=0.2)) as slow,
        gateway_on_loopback([slow.url], tmp_path / "outputs") as gw,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 820})
            await page.goto(gw.url + "/")
            await page.select_option("#pipeline", "image-to-image")
            await page.set_input_files("#image", str(upload))
            await page.wait_for_function(
                "document.getElementById('input-preview').naturalWidth === 48", timeout=10_000
            )
            assert await page.locator("#input-preview").is_visible()

            await page.select_option("#pipeline", "text-to-image")
            for field, text in (("#width", "64"), ("#height", "64"), ("#steps", "200")):
                await page.fill(field, text)
            await page.fill("#preview_every", "1")
            await page.click("#submit")
            await page.wait_for_function(
                "document.getElementById('preview').dataset.changes >= '2'", timeout=60_000
            )
            assert (await page.inner_text("#progress-text")).startswith("step ")
            await page.click("#cancel")
            await page.wait_for_function(
                "document.getElementById('progress-text').textContent === 'cancelled'",
                timeout=60_000,
            )
            assert await page.inner_text("#eta") == "-" and await page.inner_text("#rate") == "-"
            assert "paid before it stopped" in await page.inner_text("#cost")
            assert (await page.inner_text("#status")).startswith("cancelled")
            assert not await page.is_disabled("#submit") and await page.is_disabled("#cancel")
            shot = tmp_path / "gateway-page-cancelled.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
