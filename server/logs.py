"""Log lines for operators: a timestamp and a level on every line, one JSON object a line
with ``--log-format json`` (``[server] log_format``), and the request id of the HTTP request
a line belongs to.

onetag's loggers and uvicorn's (its access log included) go through one handler on stderr.
The request id travels in a context variable while a request is handled (so uvicorn's access
line carries it too) and explicitly where work leaves the request: the store's writer jobs
and the deliveries they plan (``deliveries.request_id``), which the forwarder logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import os
import random
import re
import time
from typing import Any

FORMATS = ("text", "json")
ENV_FORMAT = "ONETAG_LOG_FORMAT"  # passed on to the writer process
ENV_LEVEL = "ONETAG_LOG_LEVEL"

# The request being handled, if any. Set by the HTTP handlers; read by the formatters.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("onetag_request_id",
                                                                         default=None)
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 64
# A caller's id is kept when it is short and plain (a UUID, a proxy's hex or base64url id):
# nothing that could forge a log line or a header.
_WELL_FORMED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/=-]{0,63}")


def new_request_id() -> str:
    """16 hex characters: unique enough to find one request's lines, and cheap (~0.2 µs)."""
    return f"{random.getrandbits(64):016x}"


def request_id(given: str | bytes | None) -> str:
    """The caller's ``X-Request-Id`` when well formed, else a new one."""
    if given:
        if isinstance(given, bytes):
            given = given.decode("latin-1")
        if len(given) <= MAX_REQUEST_ID and _WELL_FORMED.fullmatch(given):
            return given
    return new_request_id()


# Formatting -----------------------------------------------------------------------------

# What every LogRecord has: anything else on a record came from ``extra=`` and is shown.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "color_message", "taskName"}


def timestamp(created: float) -> str:
    """ISO-8601 in UTC with milliseconds: ``2026-01-31T14:00:00.123Z``."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


# Query parameters whose values are secrets (Remarkety's ``remarkety_api_key``, a feed token):
# an access line shows them as [redacted].
_SECRET_PARAM = re.compile(r"(?i)(key|token|secret|signature|password)")
_QUERY_PAIR = re.compile(r"([^&=]*)=([^&]*)")


def redact_query(path: str) -> str:
    """``/x?remarkety_api_key=abc&code=A`` -> ``/x?remarkety_api_key=[redacted]&code=A``."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    return base + sep + _QUERY_PAIR.sub(
        lambda m: f"{m.group(1)}=[redacted]" if _SECRET_PARAM.search(m.group(1)) else m.group(0),
        query)


def _scrub(record: logging.LogRecord) -> None:
    """uvicorn's access line names the path with its query string: secrets out of it."""
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, http_version, status = record.args
        if isinstance(path, str) and "?" in path:
            record.args = (client, method, redact_query(path), http_version, status)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record's extra fields: ``extra=``, the request id, and uvicorn's access values."""
    extra = {key: value for key, value in vars(record).items() if key not in _STANDARD}
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, http_version, status = record.args
        extra.update(client=client, method=method, path=path, status=status)
    if extra.get("request_id") is None:
        current = REQUEST_ID.get()
        if current is not None:
            extra["request_id"] = current
        else:
            extra.pop("request_id", None)
    return extra


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        _scrub(record)
        line: dict[str, Any] = {"time": timestamp(record.created), "level": record.levelname,
                                "logger": record.name, "message": record.getMessage()}
        for key, value in fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-01-31T14:00:00.123Z INFO onetag.forwarder: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        _scrub(record)
        text = f"{timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        extra = fields(record)
        if record.name == "uvicorn.access":  # the message says it all but the request id
            extra = {"request_id": extra["request_id"]} if "request_id" in extra else {}
        if extra:
            text += " " + " ".join(f"{key}={_text_value(value)}" for key, value in extra.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in " \"=\n")) else text


# Configuration --------------------------------------------------------------------------


def config_dict(log_format: str = "text", level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for onetag's loggers and uvicorn's: uvicorn's
    ``log_config`` (``cli.cmd_serve``), and what ``configure`` applies."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"onetag": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "onetag",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        # uvicorn's loggers keep no handlers of their own: their lines go through the root's.
        "loggers": {
            **{name: {"handlers": [], "propagate": True, "level": level.upper()}
               for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            # httpx says every vendor request at info, URL and all: the forwarder's own lines
            # say what matters (retries, recoveries, dead letters) without the vendor's URL.
            **{name: {"level": "WARNING"} for name in ("httpx", "httpcore")},
        },
    }


def configure(log_format: str = "text", level: str = "info") -> dict[str, Any]:
    """Set up logging in this process, and for the writer process it starts (through the
    environment). Returns the dict, for uvicorn's ``log_config``."""
    config = config_dict(log_format, level)
    logging.config.dictConfig(config)
    os.environ[ENV_FORMAT] = log_format
    os.environ[ENV_LEVEL] = level
    return config


def configure_from_env() -> None:
    """The writer process: as its server said (text at info when started otherwise)."""
    log_format = os.environ.get(ENV_FORMAT, "text")
    level = os.environ.get(ENV_LEVEL, "info")
    try:
        logging.config.dictConfig(config_dict(log_format if log_format in FORMATS else "text",
                                              level))
    except ValueError:
        logging.config.dictConfig(config_dict("text", "info"))
