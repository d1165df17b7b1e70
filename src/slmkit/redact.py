"""Secrets never reach a log or an error message: environment secrets and hub tokens become ***."""

from __future__ import annotations

import logging
import os
import re

# Environment variables whose values never go into a log or an error message.
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# Hugging Face user/org tokens, wherever they come from.
SECRET_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with the values of secret-looking environment variables and hub tokens replaced by ***."""
    for name, value in os.environ.items():
        if len(value) >= 8 and SECRET_ENV.search(name) and value in text:
            text = text.replace(value, REDACTED)
    return SECRET_PATTERN.sub(REDACTED, text)


class RedactFilter(logging.Filter):
    """Redact secrets from every record a handler writes (ours and the libraries' alike)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_all_handlers() -> None:
    """Put RedactFilter on every handler that exists now: the root's and those libraries attach to their loggers."""
    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactFilter) for f in handler.filters):
                handler.addFilter(RedactFilter())
