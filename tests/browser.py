"""Headless Chromium for the browser tests: Debian's ``chromium`` and ``chromedriver`` (``make browser``
installs them), driven by Selenium, offline. :func:`chrome` skips the test, with the reason, where
they are missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LOKA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LOKA_CHROMEDRIVER", "/usr/bin/chromedriver")


@contextmanager
def chrome(tmp_path: Path, width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium WebDriver (closed afterwards); skips when Chromium or Selenium is missing."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(
            f"no {CHROMIUM} / {CHROMEDRIVER}: run `make browser` (Debian's chromium, chromium-driver)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed (pip install '.[dev]')"
    )
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def full_page_screenshot(driver, path: Path) -> Path:
    """A screenshot of the whole page (the window grown to the document's height)."""
    h = driver.execute_script("return document.documentElement.scrollHeight")
    w = driver.execute_script("return document.documentElement.scrollWidth")
    driver.set_window_size(max(w, 1200), min(max(h, 600), 12000))
    driver.save_screenshot(str(path))
    return path


def rendered_images(driver) -> list[dict]:
    """Every ``<img>`` of the page: its alt text and whether it decoded to a non-empty picture."""
    return driver.execute_script(
        "return [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0, "
        "w: i.naturalWidth, h: i.naturalHeight}))"
    )
