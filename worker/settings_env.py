"""Settings as `MAHAVISHNU_*` environment variables, for starting a worker process on them."""

from __future__ import annotations

import json

from worker.settings import Settings

ENV_PREFIX = "MAHAVISHNU_"


def settings_env(settings: Settings) -> dict[str, str]:
    """The variables that make `memory-worker run` use `settings`' broker, sink and limits.

    Only what a test or a load test varies per run: broker names, sink URL, concurrency, retry
    tiers, grace period and logging. Everything else comes from the worker's own YAML.
    """
    mq, pools, worker = settings.rabbitmq, settings.pools, settings.worker
    values = {
        "RABBITMQ__URL": mq.url.get_secret_value(),
        "RABBITMQ__EXCHANGE": mq.exchange,
        "RABBITMQ__QUEUE": mq.queue,
        "RABBITMQ__DEAD_LETTER_QUEUE": mq.dead_letter_queue,
        "RABBITMQ__QUEUE_TYPE": mq.queue_type,
        "RABBITMQ__STARTUP_WAIT_S": str(mq.startup_wait_s),
        "POOLS__SESSION_BUDDY_URL": str(pools.session_buddy_url),
        "POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS": str(settings.concurrency),
        "POOLS__ADAPTIVE_CONCURRENCY": str(pools.adaptive_concurrency).lower(),
        "RETRY__TIERS_S": json.dumps(settings.retry.tiers_s),
        "WORKER__GRACE_S": str(worker.grace_s),
        "WORKER__OPS_PORT": str(worker.ops_port),
        "WORKER__LOG_FORMAT": worker.log_format,
        "WORKER__LOG_LEVEL": worker.log_level,
    }
    return {ENV_PREFIX + name: value for name, value in values.items()}
