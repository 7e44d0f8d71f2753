"""The gateway's own log lines: plain text or JSON lines, and the backend's state changes.

Access lines stay uvicorn's. The gateway logs what an operator must see without a dashboard:
the inference backend going away (with the cause) and coming back, once per change, not once
per failed request. With ``log_format="json"`` every line is one JSON object (``time``, ``level``,
``logger``, ``message`` and the event's fields), ready for a log shipper.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, UTC
from typing import Any

GATEWAY_LOGGER = "slsg_gateway"
_HANDLER_NAME = "slsg-gateway"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object a line; ``extra={"fields": {...}}`` adds the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str) -> None:
    """Give the gateway's loggers one handler on stderr (replacing an earlier one), text or JSON lines."""
    logger = logging.getLogger(GATEWAY_LOGGER)
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonLinesFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class BackendHealth:
    """Whether the backend answers, logged once per change: a warning with the cause, then "back"."""

    def __init__(self, backend: str, address: str, logger: logging.Logger) -> None:
        self.backend, self.address, self.log = backend, address, logger
        self.available: bool | None = None  # None: not known yet (nothing asked)
        self._lock = threading.Lock()

    def failed(self, cause: str) -> None:
        """A call did not reach the backend (refused, timed out, unavailable)."""
        if self._change(False):
            self.log.warning("%s at %s is unavailable: %s", self.backend, self.address, cause,
                             extra={"fields": self._fields("backend_unavailable", cause)})

    def answered(self) -> None:
        """A call reached the backend (whatever it answered)."""
        was = self.available
        if self._change(True) and was is False:
            self.log.info("%s at %s is available again", self.backend, self.address,
                             extra={"fields": self._fields("backend_available", None)})

    def _change(self, available: bool) -> bool:
        with self._lock:
            changed = self.available is not available
            self.available = available
            return changed

    def _fields(self, event: str, cause: str | None) -> dict[str, Any]:
        fields = {"event": event, "backend": self.backend, "address": self.address}
        if cause is not None:
            fields["cause"] = cause
        return fields
