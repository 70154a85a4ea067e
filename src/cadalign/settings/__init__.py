"""Settings that several stages share, in one place: stages never import each other.

- :mod:`cadalign.settings.rounds`: the rounds of the study (``rounds:``), from which every
  per-round and aggregate stage takes its list;
- :mod:`cadalign.settings.train`: the ``train`` section (read by initialize, train, analyze);
- :mod:`cadalign.settings.realign`: the ``realign`` section (read by realign, and by train
  for ``train.cascade``).

One submodule per section keeps a stage's code dependencies (dvc.yaml deps) to what it reads.
"""
