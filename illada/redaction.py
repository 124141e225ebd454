"""No credential in a log line: a logging filter that masks them in every record.

With `illada -v`, botocore's DEBUG records print each request with its headers, and the
Authorization header names the S3 access key id (`Credential=AKIA.../...`). The filter,
installed on the handlers of the root logger by the CLI, masks in the formatted message:

- the values of Authorization and security-token headers, and SigV4 `Credential=` key ids;
- anything shaped like an AWS access key id (AKIA..., ASIA...);
- every secret this process knows: the AWS/MLflow secret environment variables and the S3
  key and secret of the config in use (`remember`, called by illada.storage.configure).
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
MIN_SECRET_CHARS = 8  # shorter values would mangle ordinary text

PATTERNS = (
    # 'Authorization': b'AWS4-HMAC-SHA256 Credential=...', Authorization: Bearer ..., X-Amz-Security-Token=...
    re.compile(r"(?i)((?:authorization|x-amz-security-token|x-amz-credential)['\"]?\s*[:=]\s*b?['\"]?)[^'\"\n]+"),
    re.compile(r"(Credential=)[^/\s,'\"&]+"),
    re.compile(r"\b((?:AKIA|ASIA))[A-Z0-9]{16}\b"),
)

_remembered: set[str] = set()


def remember(*secrets) -> None:
    """Mask these values from now on (str or pydantic SecretStr; None is ignored)."""
    for secret in secrets:
        value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
        if value and len(value) >= MIN_SECRET_CHARS:
            _remembered.add(value)


def redact(text: str) -> str:
    for pattern in PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    known = {v for v in (os.environ.get(n) for n in SECRET_ENV) if v and len(v) >= MIN_SECRET_CHARS} | _remembered
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Replaces a record's message by its redacted text (and its traceback's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (default: the root logger). A filter on
    a handler sees the records of every logger that propagates to it; one on a logger
    would not."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
