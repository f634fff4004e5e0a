"""Keep secrets from the environment out of everything budgetlab writes.

A secret is the value of any environment variable whose name contains TOKEN, KEY, SECRET or
PASSWORD (HF_TOKEN, WANDB_API_KEY, ...). Logs, error records and ledger rows pass through
`redact`; the worker also wraps its stdout/stderr so a library that prints a token by
mistake does not leak it into a job log.
"""

from __future__ import annotations

import io
import os

_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
_MIN_LEN = 4  # shorter values ("1", "yes") would mask ordinary text
MASK = "***"


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(w in upper for w in _WORDS)


def secret_values(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_LEN}
    return sorted(vals, key=len, reverse=True)  # longest first: no partial masks left


def redact(text, environ=None):
    """`text` with every secret value replaced by ***; non-strings pass through."""
    if not isinstance(text, str) or not text:
        return text
    for v in secret_values(environ):
        if v in text:
            text = text.replace(v, MASK)
    return text


def safe_environ(environ=None) -> dict:
    """The environment without secret variables (for records of what a job ran with)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not is_secret_name(k)}


class RedactingStream(io.TextIOBase):
    """A text stream that masks secrets line by line before writing to `inner`."""

    def __init__(self, inner):
        self.inner = inner
        self._buf = ""
        self._secrets = secret_values()

    def write(self, s: str) -> int:
        if not self._secrets:
            return self.inner.write(s)
        self._buf += s
        if "\n" in self._buf:
            done, self._buf = self._buf.rsplit("\n", 1)
            self.inner.write(self._mask(done) + "\n")
        return len(s)

    def _mask(self, text: str) -> str:
        for v in self._secrets:
            text = text.replace(v, MASK)
        return text

    def flush(self) -> None:
        if self._buf:
            self.inner.write(self._mask(self._buf))
            self._buf = ""
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def encoding(self):
        return getattr(self.inner, "encoding", "utf-8")
