"""memory-worker: consume memory items from RabbitMQ and store them in Session-Buddy."""

__version__ = "0.1.0"
