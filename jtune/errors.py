"""What every entry point (`python -m jtune.X`) shares with its user: bad input ends it with one line naming the
bad value and a non-zero exit status, and its log is jtune's own lines, not the libraries' chatter."""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
from typing import Iterator, NoReturn

from jtune import checkpoint, config, fetch, trainer

# What bad input raises anywhere in jtune. Anything else is a bug and keeps its traceback.
USER_ERRORS = (config.ConfigError, fetch.FetchError, checkpoint.CheckpointError, trainer.NonFiniteError,
               ValueError, OSError)  # OSError: missing files, not a folder, no permission, disk full
EXIT_CODE = 2


def _flatten(e: BaseException) -> str:
  text = str(e).replace('\\n', ' ').replace("\\'", "'")
  if len(text) > 1 and text[0] == text[-1] == "'":  # the repr that KeyError and ConfigDict wrap around
    text = text[1:-1]
  return ' '.join(text.split()) or type(e).__name__


def quiet_libraries() -> None:
  """For an entry point's main: jtune's own messages at INFO on stderr; Orbax and JAX chatter only with an
  explicit --verbosity."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  handler = py_logging.StreamHandler(sys.stderr)
  handler.setFormatter(py_logging.Formatter('%(asctime)s jtune: %(message)s', '%H:%M:%S'))
  log = py_logging.getLogger('jtune')
  log.setLevel(py_logging.INFO)
  log.addHandler(handler)
  log.propagate = False


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with its errors as one line: an unknown or bad flag, a config file that does not load,
  config overrides that name no field (lock_config)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  def fail(message: str) -> NoReturn:
    print(f'jtune: error: {message}', file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # what absl's own parser reports as 'FATAL Flags parsing error' (and --helpshort)
    text = str(e)
    if 'Traceback (most recent call last)' in text:  # ml_collections quotes a config file's whole traceback
      before, _, trace = text.partition('Traceback (most recent call last)')
      text = f'{before} {[line for line in trace.splitlines() if line.strip()][-1].strip()}'
    fail(f'{_flatten(Exception(text))} (--helpshort lists the flags)')
  except OSError as e:  # ml_collections: a --config file that is missing or unreadable
    fail(_flatten(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    fail(f'bad config override {" ".join(overrides)}: {_flatten(e)}')


@contextlib.contextmanager
def one_line() -> Iterator[None]:
  """Turns USER_ERRORS into `jtune: error: ...` on stderr and exit code 2 (JTUNE_TRACEBACK=1 re-raises)."""
  try:
    yield
  except USER_ERRORS as e:
    if os.environ.get('JTUNE_TRACEBACK'):
      raise
    sys.stdout.flush()
    sys.stderr.flush()
    # The error line is the last one: stderr is closed to everyone else first, since background threads
    # (Orbax's async writers, tensorstore callbacks) would print tracebacks of the same failure meanwhile and
    # during interpreter shutdown.
    real_stderr = os.dup(sys.stderr.fileno())
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    # Starts on a fresh line: a background thread may have been cut off mid-line.
    os.write(real_stderr, f'\njtune: error: {_flatten(e)}\n'.encode())
    os._exit(EXIT_CODE)
