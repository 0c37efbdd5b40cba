"""The one exception type that memgen raises for bad user input, and the CLI wrapper."""

import logging
import sys
from typing import Callable

logger = logging.getLogger(__name__)

# Exit status of a stage script that rejected its input.
USAGE_EXIT_CODE = 2


class MemgenError(Exception):
    """Invalid input or state that the user can fix.

    The message says what was wrong, with the value, and what to do. Entry scripts print
    it without a traceback and exit with status 2.
    """


def run_cli(main: Callable[[], object]) -> None:
    """Call `main()` and turn a MemgenError into one error line and exit status 2."""
    try:
        main()
    except MemgenError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
