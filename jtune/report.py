"""An evaluation report on disk: report.json, a markdown summary and the confusion matrix as a PNG."""

from __future__ import annotations

import json
import os
import pathlib

from jtune.hf import io as hf_io

METRICS = ('accuracy', 'f1', 'precision', 'recall', 'loss')


def markdown(result: dict) -> str:
  ens, labels = result['ensemble'], result['labels']
  lines = [f'# {result["dataset"]}, split {result["split"]}: {ens["count"]} examples', '',
           '| model | ' + ' | '.join(METRICS) + ' |', '|---' * (len(METRICS) + 1) + '|']
  rows = [(m['model'], m) for m in result['members']]
  if len(rows) > 1:
    rows.append((f'ensemble of {len(rows)} (mean probabilities)', ens))
  lines += [f'| {name} | ' + ' | '.join(f'{m[k]:.4f}' for k in METRICS) + ' |' for name, m in rows]
  per = ens['per_class']
  lines += ['', '| class | precision | recall | f1 | support |', '|---|---|---|---|---|']
  lines += [f'| {name} | {per["precision"][i]:.4f} | {per["recall"][i]:.4f} | {per["f1"][i]:.4f} | '
            f'{int(per["support"][i])} |' for i, name in enumerate(labels)]
  lines += ['', 'Confusion matrix (rows: true class, columns: predicted class):', '',
            '| | ' + ' | '.join(labels) + ' |', '|---' * (len(labels) + 1) + '|']
  lines += [f'| {name} | ' + ' | '.join(str(v) for v in row) + ' |' for name, row in zip(labels, ens['confusion'])]
  return '\n'.join(lines) + '\n'


def confusion_png(confusion: list[list[int]], labels: list[str], title: str, path: os.PathLike) -> None:
  """Counts in every cell, rows the true class; matplotlib's Agg backend (no display needed)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise OSError("the confusion matrix plot needs matplotlib: install jtune's eval extra, jtune[eval]") from e
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  size = max(4.0, 0.6 * len(labels) + 2.0)
  fig, ax = plt.subplots(figsize=(size, size))
  image = ax.imshow(confusion, cmap='Blues')
  fig.colorbar(image, ax=ax, fraction=0.046)
  ticks = range(len(labels))
  ax.set_xticks(ticks, labels, rotation=45, ha='right')
  ax.set_yticks(ticks, labels)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title)
  top = max(max(row) for row in confusion) or 1
  for i, row in enumerate(confusion):
    for j, value in enumerate(row):
      ax.text(j, i, str(value), ha='center', va='center', color='white' if value > top / 2 else 'black')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _earlier_report(folder) -> bool:
  """A folder of report.json, report.md and confusion.png alone: what `write` leaves."""
  return {e.name for e in folder.iterdir()} <= {'report.json', 'report.md', 'confusion.png'}


def write(result: dict, out_dir: str | os.PathLike) -> pathlib.Path:
  """Writes report.json, report.md and confusion.png as one folder that replaces `out_dir` whole."""
  title = f'{result["dataset"]} {result["split"]}: accuracy {result["ensemble"]["accuracy"]:.3f}'

  def files(staging: pathlib.Path) -> None:
    (staging / 'report.json').write_text(json.dumps(result, indent=2) + '\n')
    (staging / 'report.md').write_text(markdown(result))
    confusion_png(result['ensemble']['confusion'], result['labels'], title, staging / 'confusion.png')
  return hf_io.write_folder(out_dir, files, _earlier_report, 'evaluation report')
