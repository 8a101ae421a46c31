"""JSON logs to stdout, with the request and turn ids of the current task in every line."""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
turn_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("turn_id", default="")

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

# Credentials that may ride in a line someone else writes: uvicorn logs each WebSocket
# handshake with its query string, where browsers' links and sockets carry `token=`.
_SECRET_PATTERNS = (
    (re.compile(r"(?i)([?&;](?:token|access_token|id_token|jwt|api_key|apikey)=)[^&\s\"'#]+"), r"\1[redacted]"),
    (re.compile(r"(?i)(bearer[\s,]+)[A-Za-z0-9\-_.~+/]{8,}=*"), r"\1[redacted]"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),
)
_SECRET_HINTS = ("token=", "jwt=", "key=", "earer", "eyJ")


def redact(text: str) -> str:
    """``text`` with anything that looks like a bearer credential replaced."""
    if not any(hint in text for hint in _SECRET_HINTS):
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if request_id := request_id_var.get():
            entry["request_id"] = request_id
        if turn_id := turn_id_var.get():
            entry["turn_id"] = turn_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ValueError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got {level!r}")
    root.setLevel(level.upper())
    # uvicorn installs its own handlers; route them through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel("WARNING")
    # One line per internal HTTP call drowns the useful lines and costs throughput.
    for chatty in ("httpx", "httpcore", "aiohttp"):
        logging.getLogger(chatty).setLevel("WARNING")
