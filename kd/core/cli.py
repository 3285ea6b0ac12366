"""How every entry point ends: a user error as one paragraph and a non-zero exit, a bug as a
traceback.

User errors are raised as ``SystemExit(message)`` where they are found (Python prints the message
alone and exits 1); a params.yaml problem is a :class:`~kd.core.params.ParamsError`, exit 2, so a
script can tell "fix params.yaml" from "fix the data or the machine". Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from kd.core.params import ParamsError

PARAMS_EXIT = 2


def first_line(err: BaseException) -> str:
    """A library exception's first line: enough to quote inside a one-paragraph message."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def run(main: Callable[[], object]) -> None:
    """Call a stage's ``main``, turning a ParamsError into its paragraph and exit status 2."""
    try:
        main()
    except ParamsError as err:
        print(err.message, file=sys.stderr)
        raise SystemExit(PARAMS_EXIT) from None
