"""`memory-worker console`: the dead letters and the workers in a browser.

Read in this order: `groups` (pure grouping), `snapshot` (the DLQ as last read), `jobs`
(replay and purge through `worker.dlq_edit`), `queues` and `workers` (what the overview
reads) polled by `monitor`, then `state`, `pages`, `actions` and `app` (the aiohttp side and
its guard), and `server`, which opens all of it in order.
"""

from worker.console.server import ConsoleServer, bind_refusal

__all__ = ["ConsoleServer", "bind_refusal"]
