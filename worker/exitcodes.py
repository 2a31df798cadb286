"""The exit codes of `memory-worker`, defined once; above 2 they follow BSD's sysexits.h."""

#: Everything asked for was done: a clean stop after SIGTERM, both services answered `check`,
#: every item published was confirmed, every dead letter chosen was replayed or removed.
EXIT_OK = 0
#: Something asked for was not done: a service `check` could not reach, an unconfirmed
#: publish, a replay that stopped, a declined purge, an id not found, a missing DLQ.
EXIT_FAILED = 1
#: The command line is wrong (argparse exits with it too), or `publish` cannot read its file.
EXIT_USAGE = 2
#: EX_DATAERR: `publish` found invalid lines and published nothing (no --skip-invalid).
EXIT_DATAERR = 65
#: EX_UNAVAILABLE: no broker answered (for `run`, within `rabbitmq.startup_wait_s`).
EXIT_UNAVAILABLE = 69
#: EX_SOFTWARE: the worker stopped itself after an internal failure (`steering_crashed`: the loop
#: that keeps the consumer behind the breaker raised); in-flight inserts were drained first.
EXIT_SOFTWARE = 70
#: EX_CONFIG: invalid settings, a refused preflight, a queue or exchange declared with other
#: arguments, or a sink that lacks the tool or refuses the credentials.
EXIT_CONFIG = 78
#: 128 + SIGINT: a second SIGTERM or SIGINT while the worker stops, or Ctrl-C in a command that
#: does not handle it itself; the broker requeues whatever was unacked.
EXIT_FORCED = 130
