"""Tasks: preprocessing, loss and metrics for each kind of fine-tuning, on the one shared trainer.

Every task module defines:
  HEAD          the model head it trains: 'sequence', 'token', 'qa', 'mlm', 'causal_lm' or 'seq2seq'.
  PROBLEM_TYPE  Hugging Face's config.problem_type for a sequence head's export (None otherwise).
  check(ds, split, data_cfg, task)            raises ValueError naming the first bad column or row.
  label_names(ds, data_cfg) -> list[str]      the classes (the export's id2label); [] when there are none.
  num_outputs(labels) -> int                  the head's width.
  featurize(ds, split, data_cfg, task, tokenizer, labels, *, training) -> Features   training or eval features
  loss_sums(outputs, batch, label_smoothing, task) -> (loss sum, weight sum)   inside the jitted train step
  eval_outputs(outputs, batch, task) -> dict of arrays                          inside the jitted eval step
  summarize(outputs, features, task) -> dict[str, float]                        on the host, after evaluation
Tasks that generate (causal_lm, seq2seq) also define
  generation_metrics(generate, features, tokenizer, limit) -> dict[str, float]   scores generated outputs
What `summarize` and `generation_metrics` report is listed in `jtune.config.TASK_METRICS` (train.best_metric
picks one).
"""

from jtune.tasks import (causal_lm, classification, mlm, multi_label, qa, regression, seq2seq,
                         token_classification)

TASKS = {
    'classification': classification,
    'regression': regression,
    'multi_label': multi_label,
    'token_classification': token_classification,
    'qa': qa,
    'causal_lm': causal_lm,
    'mlm': mlm,
    'seq2seq': seq2seq,
}
