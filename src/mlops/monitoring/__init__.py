"""Model health without labels: what the model sees, what it answers, and whether either moved since training.

- ``stats``: per-case input statistics: raw intensities, intensities after nnU-Net's own normalisation (what the
  network sees), and geometry (shape, spacing, orientation code).
- ``signals``: output signals of one prediction from the engine's logits: label volumes, max-softmax confidence,
  foreground entropy, and agreement between mirrored passes (or folds) as pairwise Dice.
- ``profile``: the reference profile written into the model folder (training inputs + validation outputs), and the
  model key (checkpoint hash) that ties live records to it.
- ``store``: request records (statistics and a random id, no file names) through fsspec, one file per instance/day.
- ``compare``: the drift verdict (K-S per statistic, Benjamini-Hochberg, minimum sample size, outliers).
- ``report``: the self-contained HTML report of a comparison (log-scaled plots, no scripts, no CDN).
"""
