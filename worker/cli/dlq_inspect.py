"""`dlq stats`, `dlq list` and `dlq show`: read the dead-letter queue and leave it as it was."""

from __future__ import annotations

import json

from rich.markup import escape

from worker import dlq, dlq_model
from worker.broker import connect
from worker.cli import dlq_view
from worker.cli.common import console, progress
from worker.exitcodes import EXIT_FAILED, EXIT_OK
from worker.settings import Settings


async def stats(settings: Settings, *, as_json: bool) -> int:
    """Print depth, a histogram of reasons, oldest and newest failure, per pool."""
    snapshot = await read(settings)
    summary = dlq_model.stats(snapshot)
    if as_json:
        print(json.dumps(dlq_view.stats_json(snapshot, summary)))
        return EXIT_OK
    dlq_view.caveats(snapshot, settings)
    dlq_view.print_stats(console(), snapshot.queue, summary)
    return EXIT_OK


async def list_letters(
    settings: Settings, flt: dlq_model.Filter, *, limit: int | None, as_json: bool
) -> int:
    """Print the dead letters `flt` matches, as a table or one JSON object per line."""
    snapshot = await read(settings, limit=limit)
    letters = snapshot.matching(flt)
    if as_json:
        for letter in letters:
            print(json.dumps(letter.envelope()))
        return EXIT_OK
    dlq_view.caveats(snapshot, settings)
    out = console()
    if letters:
        out.print(dlq_view.letters_table(letters, snapshot.read_at_ms))
    out.print(f"{len(letters)} of {len(snapshot.letters)} dead letter(s) match")
    return EXIT_OK


async def show(settings: Settings, letter_id: str, *, as_json: bool) -> int:
    """Print the dead letters with this id, or with the one id it is a prefix of."""
    snapshot = await read(settings)
    letters = [d for d in snapshot.letters if d.id == letter_id]
    if not letters:
        prefixed = {d.id for d in snapshot.letters if d.id.startswith(letter_id)}
        if len(prefixed) > 1:
            console(stderr=True).print(f"{letter_id!r} is a prefix of {len(prefixed)} ids")
            return EXIT_FAILED
        letters = [d for d in snapshot.letters if d.id in prefixed]
    if as_json:
        print(json.dumps([dlq_view.show_json(d) for d in letters]))
        return EXIT_OK if letters else EXIT_FAILED
    dlq_view.caveats(snapshot, settings)
    out = console()
    if not letters:
        out.print(f"no dead letter with id {escape(letter_id)!r}")
        return EXIT_FAILED
    for letter in letters:
        dlq_view.print_letter(out, letter, snapshot.read_at_ms)
    return EXIT_OK


async def read(settings: Settings, *, limit: int | None = None) -> dlq_model.Snapshot:
    """Read the dead-letter queue once, with a progress bar, and hand every message back."""
    queue = settings.rabbitmq.dead_letter_queue
    async with await connect(settings, purpose="dlq-read", robust=False) as connection:
        with progress(console(stderr=True), "reading", 0) as advance:
            return await dlq.read(connection, queue, limit=limit, on_progress=advance)
