"""`memory-worker console` in a real browser: headless Chromium against a worker and a broker."""

from __future__ import annotations

import os
from typing import Any

import pytest
from aiohttp import web

try:
    from playwright.async_api import expect
except ImportError:  # a dev dependency: CI installs it, so only a local run may lack it
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)

from tests.browser.scenario import BROKEN, BROKEN_COUNT, REJECTED, SCRIPT, VALID, scene, until
from tests.integration.helpers import depth
from worker.console.server import ConsoleServer
from worker.testing import free_port

pytestmark = [pytest.mark.integration, pytest.mark.browser]

TIMEOUT_MS = 20_000


def row(reason: str) -> str:
    """The selector of a reason group's row on /dlq."""
    return f'tr[data-reason="{reason}"]'


async def counts(page: Any) -> dict[str, str]:
    """Each reason group's count as /dlq shows it."""
    rows = page.locator("#groups tbody tr")
    found = {}
    for n in range(await rows.count()):
        reason = await rows.nth(n).get_attribute("data-reason")
        found[reason] = await rows.nth(n).locator("td.count").inner_text()
    return found


async def test_operator_groups_opens_replays_and_purges(make_settings, connection, browser):
    """Groups count right; a message opens; a replayed group is stored; a typed count purges."""
    async with scene(make_settings, connection) as s:
        overview = await browser.new_page()
        await overview.goto(f"{s.console.url}/")
        dlq_ready = overview.locator('tr[data-role="dead letters"] td.ready')
        await expect(dlq_ready).to_have_text(str(REJECTED + BROKEN_COUNT))
        await expect(overview.locator("#workers")).to_contain_text("closed")
        page = await browser.new_page()
        await page.goto(f"{s.console.url}/dlq")
        expected = {reason: str(len(bodies)) for reason, bodies in BROKEN.items()}
        assert await counts(page) == {**expected, "rejected_by_sink": str(REJECTED)}

        await page.click(f"{row('invalid_encoding')} a")
        await page.click("#letters tbody a")
        await expect(page.locator("#body")).to_have_text("\\xff\\xfe broken bytes")
        await expect(page.locator("#envelope")).to_contain_text("invalid_encoding")

        s.standin.config.reject = 0.0
        await page.goto(f"{s.console.url}/dlq")
        await page.click(f"{row('rejected_by_sink')} form.replay button")
        await expect(page.locator("#job-state")).to_have_text("done", timeout=TIMEOUT_MS)
        await expect(page.locator("#job-done")).to_have_text(str(REJECTED))
        await until(lambda: s.standin.stats.stored == VALID + REJECTED)
        await page.click("text=Back to the dead letters")
        await expect(page.locator(row("rejected_by_sink"))).to_have_count(0)

        await page.fill(f"{row('invalid_json')} input[name=confirm]", "3")
        await page.click(f"{row('invalid_json')} form.purge button")
        await expect(page.locator("#error")).to_contain_text("type the number")
        await page.goto(f"{s.console.url}/dlq")
        await page.fill(f"{row('invalid_json')} input[name=confirm]", "2")
        await page.click(f"{row('invalid_json')} form.purge button")
        await expect(page.locator("#job-state")).to_have_text("done", timeout=TIMEOUT_MS)
        await page.click("text=Back to the dead letters")
        await expect(page.locator(row("invalid_json"))).to_have_count(0)
        assert await depth(connection, s.settings.rabbitmq.dead_letter_queue) == 2
        # The overview, open all along in another tab, has followed without a reload.
        await expect(dlq_ready).to_have_text("2", timeout=TIMEOUT_MS)
        await expect(overview.locator("#workers td.n").first).not_to_have_text("-")


async def test_console_is_safe_to_open(make_settings, connection, browser):
    """Content's script never runs; a cross-site post gets 403; read-only has no button, 405."""
    async with scene(make_settings, connection) as s:
        page = await browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        await page.goto(f"{s.console.url}/dlq/reason/rejected_by_sink")
        await page.click(f"#letters a:has-text('{s.rejected_keys[0][:23]}')")
        await expect(page.locator("#body")).to_contain_text("<script>window.__pwned = 1</script>")
        assert await page.evaluate("window.__pwned") is None and not dialogs
        assert SCRIPT.split('"')[0] in await page.locator("#body").inner_text()

        await _cross_site_post_is_refused(page, s.console.url)
        dlq = s.settings.rabbitmq.dead_letter_queue
        assert await depth(connection, dlq) == REJECTED + BROKEN_COUNT

        async with ConsoleServer(s.settings, "127.0.0.1", 0, read_only=True) as read_only:
            await page.goto(f"{read_only.url}/dlq")
            await expect(page.locator("#read-only")).to_be_visible()
            await expect(page.locator("#groups")).to_be_visible()
            assert await page.locator("main button, main form").count() == 0
            status = await page.evaluate(
                """async () => (await fetch('/actions/purge', {method: 'POST',
                     body: new URLSearchParams({scope: 'group', reason: 'schema', confirm: '1'})
                   })).status"""
            )
            assert status == 405


async def _cross_site_post_is_refused(page: Any, console_url: str) -> None:
    """A page on another site submits a purge form to the console: 403, nothing removed."""
    form = (
        f'<form method="post" action="{console_url}/actions/purge">'
        '<input type="hidden" name="scope" value="group">'
        '<input type="hidden" name="reason" value="schema">'
        '<input type="hidden" name="confirm" value="1">'
        '<button id="go" type="submit">win a prize</button></form>'
    )

    async def evil(_: web.Request) -> web.Response:
        return web.Response(text=form, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", evil)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "localhost", port).start()
        await page.goto(f"http://localhost:{port}/")
        async with page.expect_navigation() as navigation:
            await page.click("#go")
        answer = await navigation.value
        assert answer is not None and answer.status == 403
    finally:
        await runner.cleanup()
