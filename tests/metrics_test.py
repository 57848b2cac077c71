"""metrics.jsonl across a resume."""

import json

from jtune import metrics


def test_resume_drops_later_and_broken_records(tmp_path):
  lines = [json.dumps({'step': s, 'loss': 1.0 / s}) for s in (1, 2, 3, 4)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines[:3]) + '\n\n' + lines[3] + '\n{"step": 5, "lo')
  writer = metrics.MetricWriter(tmp_path, resume_step=2)  # a run killed mid-line, resumed from step 2
  writer.write(3, {'loss': 0.5})
  writer.close()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert records == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 0.5}, {'step': 3, 'loss': 0.5}]
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('metrics')] == ['metrics.jsonl']
