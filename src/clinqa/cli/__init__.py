"""The `clinqa` command: thin typer wrappers that parse, call one library function, print with rich.

One module per command group; importing them registers their commands on `app`."""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from clinqa.cli.app import app  # noqa: E402
from clinqa.cli.common import err  # noqa: E402
from clinqa.errors import ClinqaError  # noqa: E402
from clinqa.textsafe import safe  # noqa: E402

__all__ = ["app", "main"]

# importing a command module registers its commands on `app`, in the order `clinqa --help` lists them
for _module in ("evaluate_cmds", "adapt_cmds", "annotate_cmd", "records_cmds", "records_train_cmds", "serve_cmds"):
    importlib.import_module(f"clinqa.cli.{_module}")


INTERRUPTED = "interrupted: finished batches are saved; re-run the same command to resume"


def main() -> None:
    """Console entry point: user errors print one line, no traceback. Ctrl-C (SIGINT) and SIGTERM unwind
    normally (run folders release their locks) and print one line; typer would turn Ctrl-C into a
    silent exit 130, so the signal is noted here."""
    import signal

    signals: list[int] = []

    def stop(signum, frame):
        signals.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        app()
    except ClinqaError as exc:
        err.print(f"[bold red]error:[/bold red] {safe(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print(INTERRUPTED, markup=False, highlight=False)
        sys.exit(130)
    except SystemExit:
        if signals:
            err.print(INTERRUPTED, markup=False, highlight=False)
            sys.exit(130 if signals[0] == signal.SIGINT else 143)
        raise


if __name__ == "__main__":
    main()
