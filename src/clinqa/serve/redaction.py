"""Keeping question text and record content out of the service's logs."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Iterable, Sequence


class RedactingFilter(logging.Filter):
    """Keep question text and record content out of log output (a handler filter: it sees every record
    the handler emits, whichever logger made it).

    - exception info is reduced to the traceback's frames (file, line, function) and the exception
      *type*: messages of exceptions (ours, pydantic's, a tokenizer's) may quote their input;
    - strings registered for requests in flight (the question, the patient's rendered lines) are
      replaced by ``[withheld]`` wherever a message contains them.
    """

    _sensitive: dict[int, tuple[str, ...]] = {}
    _lock = threading.Lock()

    @classmethod
    def register(cls, token: int, strings: Iterable[str]) -> None:
        kept = tuple(s for s in strings if isinstance(s, str) and len(s) >= 4)
        with cls._lock:
            cls._sensitive[token] = kept

    @classmethod
    def unregister(cls, token: int) -> None:
        with cls._lock:
            cls._sensitive.pop(token, None)

    def filter(self, record: logging.LogRecord) -> bool:
        changed = False
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep only the template
            message = str(record.msg)
        if record.exc_info and record.exc_info[0] is not None:
            etype, _, tb = record.exc_info
            # frames without their source lines: a line of code may hold a literal, a message never reaches here
            frames = "".join(
                f'  File "{f.filename}", line {f.lineno}, in {f.name}\n'
                for f in (traceback.extract_tb(tb) if tb is not None else [])
            )
            message = f"{message}\nTraceback (exception message withheld):\n{frames}{etype.__name__}"
            record.exc_info = None
            record.exc_text = None
            changed = True
        with self._lock:
            groups = list(self._sensitive.values())
        for strings in groups:
            for s in strings:
                if s in message:
                    message = message.replace(s, "[withheld]")
                    changed = True
        if changed:
            record.msg, record.args = message, None
        return True


_FILTER = RedactingFilter()


def install_log_redaction(logger_names: Sequence[str] = ("", "uvicorn", "uvicorn.error", "uvicorn.access")) -> None:
    """Add the :class:`RedactingFilter` to every handler of these loggers (idempotent)."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(_FILTER)
