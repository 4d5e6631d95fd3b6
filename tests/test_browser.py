"""The page in a real browser (Playwright driving Debian's chromium): upload, click, atlas, export."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.served import served_app

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT / "docs"
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def page():
    with served_app() as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
        tab.goto(url)
        tab.wait_for_selector("#image-input input[type=file]", state="attached", timeout=60_000)
        tab.locator("#image-input input[type=file]").set_input_files(str(ROOT / "assets" / "chelsea.png"))
        tab.wait_for_selector("#head-grid img", timeout=120_000)
        yield tab
        browser.close()


def image_src(page, selector: str) -> str:
    return page.locator(f"{selector} img").get_attribute("src")


def wait_for_change(page, selector: str, before: str, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = image_src(page, selector)
        if now and now != before:
            return now
        time.sleep(0.2)
    raise AssertionError(f"{selector} did not change")


def test_upload_shows_the_head_grid(page):
    assert "grid 25×37" in page.locator("#status").inner_text()  # 451×300 at 518 px, patch 14
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "screenshot.png"), full_page=True)


def test_clicking_a_patch_changes_the_clicked_patch_map(page):
    page.get_by_role("tab", name="Clicked patch").click()
    before = image_src(page, "#patch-view")
    box = page.locator("#patch-view img").bounding_box()
    page.locator("#patch-view img").click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.42})
    after = wait_for_change(page, "#patch-view", before)
    page.wait_for_function("document.querySelector('#patch-info').innerText.includes('row 10, column 11')")
    page.locator("#patch-view img").click(position={"x": box["width"] * 0.82, "y": box["height"] * 0.82})
    wait_for_change(page, "#patch-view", after)
    page.wait_for_function("document.querySelector('#patch-info').innerText.includes('row 20, column 30')")
    page.screenshot(path=str(SCREENSHOTS / "clicked_patch.png"), full_page=True)


def test_choosing_a_head_in_the_atlas_selects_it(page):
    import visualizer
    page.get_by_role("tab", name="Head atlas").click()
    atlas = page.locator("#atlas img")
    atlas.wait_for()
    natural_w = page.evaluate("document.querySelector('#atlas img').naturalWidth")
    box = atlas.bounding_box()
    _, layout = visualizer.atlas(np.zeros((12, 6, 25, 37)))
    left, top, right, bottom = layout.box(4, 3)
    scale = box["width"] / natural_w
    before = image_src(page, "#atlas")
    atlas.click(position={"x": (left + right) / 2 * scale, "y": (top + bottom) / 2 * scale})
    page.wait_for_function("document.querySelector('#layer input[type=number]').value === '4'", timeout=30_000)
    assert page.locator("#head input").input_value() == "3"
    wait_for_change(page, "#atlas", before)  # redrawn with the chosen cell outlined
    page.screenshot(path=str(SCREENSHOTS / "head_atlas.png"), full_page=True)


def test_export_downloads_numbers_with_sidecar(page, tmp_path):
    page.get_by_role("tab", name="Animation & export").click()
    page.locator("#export").click()
    link = page.locator("#export-files a[download='analysis.json']")
    link.wait_for(timeout=60_000)
    with page.expect_download() as info:
        link.click()
    saved = tmp_path / "analysis.json"
    info.value.save_as(saved)
    meta = json.loads(saved.read_text())
    assert (meta["grid_h"], meta["grid_w"], meta["layer"], meta["head"]) == (25, 37, 4, 3)
    assert meta["arrays"]["cls_attention"]["shape"] == [12, 6, 25, 37]
    assert meta["query_patch"] == [20, 30]  # the patch clicked last
