"""`make console-screenshots`: the README's pictures of the console, taken from the real thing.

Plays the browser tests' scene (stand-in, worker, valid and broken items) on the machine's
broker under fresh queue names, lets the overview gather a minute of readings, and writes
docs/console-overview.png and docs/console-group.png. The queues are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from tests.browser.conftest import chromium_path
from tests.browser.scenario import scene
from tests.integration.helpers import item
from worker.publisher import Publisher
from worker.settings import Settings, load_settings
from worker.topology import Topology

DOCS = Path(__file__).resolve().parents[2] / "docs"
URL = "amqp://guest:guest@127.0.0.1:5672/"
VIEWPORT = {"width": 1280, "height": 820}
#: Readings the overview gathers before its picture, so the graph has a line to draw.
WARMUP_S = 20
TRAFFIC_PER_S = 20


def _settings_factory(prefix: str) -> Any:
    def build(**sections: dict[str, Any]) -> Settings:
        base: dict[str, dict[str, Any]] = {
            "rabbitmq": {
                "url": URL,
                "exchange": prefix,
                "queue": f"{prefix}.items",
                "dead_letter_queue": f"{prefix}.items.dlq",
            },
            "retry": {"tiers_s": [1, 5, 30]},
            "worker": {"log_level": "warning"},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        return load_settings(base)

    return build


async def _traffic(connection: Any, settings: Settings, seconds: float) -> None:
    """Valid items at a steady pace, so the overview has rates and latencies to show."""
    topology = Topology.from_settings(settings)
    async with Publisher(connection, topology) as publisher:
        for n in range(int(seconds * TRAFFIC_PER_S)):
            await publisher.publish_item(item(1000 + n, pool="pool-a"))
            await asyncio.sleep(1 / TRAFFIC_PER_S)


async def main() -> int:
    """Take both pictures; 1 when Chromium is missing."""
    from playwright.async_api import async_playwright  # noqa: PLC0415 - a dev dependency

    path = chromium_path()
    if not path.exists():
        print(f"no Chromium at {path}: run tests/browser/prepare.sh", file=sys.stderr)
        return 1
    make_settings = _settings_factory(f"screenshot-{uuid.uuid4().hex[:6]}")
    connection = await aio_pika.connect_robust(URL)
    async with connection, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(path), args=["--no-sandbox"])
        try:
            async with scene(make_settings, connection) as s:
                # The sink accepts again, at a plausible latency, while the overview watches.
                s.standin.config.reject = 0.0
                s.standin.config.latency_s, s.standin.config.latency_sigma = 0.02, 0.5
                page = await browser.new_page(viewport=VIEWPORT)
                await page.goto(f"{s.console.url}/")
                await _traffic(connection, s.settings, WARMUP_S)
                await page.screenshot(path=str(DOCS / "console-overview.png"), full_page=True)
                await page.goto(f"{s.console.url}/dlq/reason/rejected_by_sink")
                await page.screenshot(path=str(DOCS / "console-group.png"), full_page=True)
                await page.goto(f"{s.console.url}/dlq")
                await page.screenshot(path=str(DOCS / "console-dead-letters.png"), full_page=True)
        finally:
            await browser.close()
            await Topology.from_settings(make_settings()).delete(connection)
    print(f"wrote {DOCS}/console-overview.png, console-group.png, console-dead-letters.png")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
