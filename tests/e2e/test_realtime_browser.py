"""The realtime page in a real browser: Debian's Chromium (headless, through Playwright) signs in as
a demo user on the gateway's page, posts are written with pymongo, and the page shows them live.

The test saves its screenshot under run/screenshots/ (git-ignored, so a test run never dirties the
checkout); docs/realtime-page.png is one of them, copied there by hand when the page changes.
Chromium comes from scripts/install.sh (apt): when it is missing this test fails, it does not skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bson import ObjectId
from playwright.sync_api import Page, expect, sync_playwright

from harness.pipeline import LocalPipeline

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "run" / "screenshots" / "realtime-page.png"


@pytest.fixture
def page() -> Iterator[Page]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: scripts/install.sh installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 720})
        finally:
            browser.close()


def test_a_signed_in_user_sees_posts_arrive_live(page: Page) -> None:
    ada, grace, linus = ObjectId(), ObjectId(), ObjectId()
    with LocalPipeline(workers=1, realtime_port=0, realtime_demo=True) as pipeline:
        db = pipeline.db
        db.users.insert_many(
            [{"_id": ada, "name": "Ada"}, {"_id": grace, "name": "Grace"}, {"_id": linus, "name": "Linus"}]
        )
        # Ada follows Grace; nobody follows Linus.
        db.followers.insert_one({"user_id": grace, "follower_id": ada})

        page.goto(pipeline.realtime_url)
        page.get_by_role("button", name="Ada").click()
        expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=15_000)
        expect(page.locator("#user-name")).to_have_text("Ada")

        db.posts.insert_one(
            {"author_id": grace, "text": "Compilers are just programs.", "created_at": datetime.now(UTC)}
        )
        db.posts.insert_one(
            {"author_id": ada, "text": "The engine weaves algebra.", "created_at": datetime.now(UTC)}
        )
        db.posts.insert_one({"author_id": linus, "text": "Talk is cheap.", "created_at": datetime.now(UTC)})

        feed, own = page.locator("#feed li"), page.locator("#new-posts li")
        expect(feed).to_have_count(1, timeout=30_000)
        expect(own).to_have_count(1, timeout=30_000)
        expect(feed.first).to_contain_text("Grace")
        expect(feed.first).to_contain_text("Compilers are just programs.")
        expect(own.first).to_contain_text("The engine weaves algebra.")
        page.wait_for_timeout(1500)  # Linus's post, were it shown, would be here by now
        text = page.locator("#live").inner_text()
        page.wait_for_timeout(1000)  # let the arrival highlight fade before the picture
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

    assert "Talk is cheap." not in text
    assert feed.count() == 1 and own.count() == 1
