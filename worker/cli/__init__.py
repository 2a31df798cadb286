"""The `memory-worker` command line.

`app` builds the parser and holds `main`; each subcommand family has its own module (`run`,
`check`, `demo`, `publish`, and `dlq` with `dlq_inspect`, `dlq_change` and `dlq_view`);
`common` holds what they share: settings flags, argument types, the event-loop runner, output.
Exit codes are in `worker.exitcodes`.
"""

from worker.cli.app import main

__all__ = ["main"]
