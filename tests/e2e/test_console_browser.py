"""The operator console in a real browser: Debian's Chromium (headless, through Playwright) against a
real pipeline (redis-server, MongoDB test server, listener, a Celery worker, SMTP sink, and the
console as its own process, `changeflow console`).

A user without an email makes send_welcome_email fail permanently: a dead letter. The operator signs
in, sees it with its reason, opens it (error, traceback, event), fixes the user, replays it with
refresh, and the SMTP sink receives the email. A wrong password gets 401.

Screenshots go to run/screenshots/ (git-ignored); docs/console-*.png are copies made by hand when the
pages change. Chromium comes from scripts/install.sh (apt): when it is missing this test fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from changeflow.worker.dead_letters import COLLECTION
from harness.pipeline import LocalPipeline, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "run" / "screenshots"
WELCOME = "tasks.send_welcome_email"
VIEWPORT = {"width": 1200, "height": 760}


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: scripts/install.sh installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"console-{name}.png"), full_page=True)


def test_an_operator_replays_a_dead_letter_and_the_email_arrives(browser: Browser) -> None:
    with LocalPipeline(workers=1, worker_concurrency=1, console=True) as pipeline:
        assert pipeline.sink is not None
        db = pipeline.db
        user_id = db.users.insert_one({"name": "Grace Hopper"}).inserted_id  # no email: permanent failure
        assert wait_until(lambda: db[COLLECTION].count_documents({"task": WELCOME}) == 1, timeout=30), (
            pipeline.logs()
        )

        intruder = browser.new_context(http_credentials={"username": "admin", "password": "guess"})
        refused = intruder.new_page().goto(pipeline.console_url + "/dead-letters")
        assert refused is not None and refused.status == 401
        intruder.close()

        context = browser.new_context(
            viewport=VIEWPORT,  # type: ignore[arg-type]
            http_credentials={"username": "admin", "password": pipeline.console_password},
        )
        page = context.new_page()
        response = page.goto(pipeline.console_url)
        assert response is not None and response.status == 200
        expect(page.locator("#listener-health")).to_have_text("healthy", timeout=10_000)
        expect(page.locator("#dead-letter-count")).to_have_text("1")
        shot(page, "status")

        page.get_by_role("link", name="Dead letters").first.click()
        row = page.locator("#letters tbody tr")
        expect(row).to_have_count(1)
        expect(row.first).to_contain_text(WELCOME)
        expect(row.first.locator(".reason")).to_have_text("permanent")
        expect(row.first).to_contain_text("no valid email address")
        shot(page, "dead-letters")

        row.first.get_by_role("link", name=WELCOME).click()
        expect(page.locator("#traceback")).to_contain_text("PermanentTaskError")
        expect(page.locator("#event")).to_contain_text("Grace Hopper")

        # Replaying the stored event fails again (it has no email); the fix needs a refresh.
        db.users.update_one({"_id": user_id}, {"$set": {"email": "grace@example.com"}})
        page.get_by_role("button", name="Replay with refresh").click()
        expect(page.locator("#result")).to_have_text("replayed 1, skipped 0")
        [mail] = pipeline.sink.wait_for(1, timeout=30)
        assert "grace@example.com" in str(mail["To"])
        shot(page, "replayed")

        # The letter stays (a replay never deletes); it records the replay. The page says so.
        page.goto(pipeline.console_url + "/dead-letters?reason=permanent")
        expect(page.locator("#letters tbody tr").first.locator("td").last).to_have_text("1")
        page.locator("#letters tbody tr").first.get_by_role("link").click()
        shot(page, "letter")
        context.close()
        letter = db[COLLECTION].find_one({"task": WELCOME})
        assert letter is not None and letter["replay_count"] == 1
        assert pipeline.sink.count_by_message_id() == {f"<{letter['_id']}@changeflow>": 1}
