"""Bad input ends a run with one line naming the bad value, and a non-zero exit status."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from jtune import checkpoint, config, fetch

# What bad input raises anywhere in jtune. Anything else is a bug and keeps its traceback.
USER_ERRORS = (config.ConfigError, fetch.FetchError, checkpoint.CheckpointError, ValueError,
               FileNotFoundError, NotADirectoryError, PermissionError)
EXIT_CODE = 2


@contextlib.contextmanager
def one_line() -> Iterator[None]:
  """Turns USER_ERRORS into `jtune: error: ...` on stderr and exit code 2 (JTUNE_TRACEBACK=1 re-raises)."""
  try:
    yield
  except USER_ERRORS as e:
    if os.environ.get('JTUNE_TRACEBACK'):
      raise
    message = ' '.join(str(e).split()) or type(e).__name__
    print(f'jtune: error: {message}', file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)
