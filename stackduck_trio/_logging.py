"""Structured logs: human lines by default, one JSON object per line on request.

Lifecycle events pass their identifiers as ``extra`` fields (``job_id``,
``job_type``, ``worker_id``, ``lease_id``); the human format appends them as
``key=value``, the JSON format as keys.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Final

_CONTEXT_FIELDS: Final = (
    "job_id",
    "job_type",
    "status",
    "attempt",
    "worker_id",
    "lease_id",
    "stream_id",
    "peer",
)


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(
            f"{name}={getattr(record, name)}" for name in _CONTEXT_FIELDS if hasattr(record, name)
        )
        return f"{text} {extra}" if extra else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str = "human", level: str = "info", *, jobs: bool = False) -> None:
    """Send ``stackduck.*`` logs to stderr in the chosen format.

    ``jobs``: also every job lifecycle event (logger ``stackduck.jobs``, INFO).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    # psycopg's pool logs connection trouble itself: same handler and format.
    for name in ("stackduck", "psycopg"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper() if name == "stackduck" else "WARNING")
        logger.propagate = False
    logging.getLogger("stackduck.jobs").setLevel("INFO" if jobs else "WARNING")
