"""`mlops batch`: cohort-scale segmentation on Ray Data, from a folder, an fsspec URL or a manifest to a volume table.

- ``sources``: what to segment: a local folder, any fsspec URL prefix (``gs://...``), or a CSV/Parquet manifest of
  paths (with optional subject and case ids); each input becomes a :class:`~mlops.batch.sources.Case`.
- ``sink``: where it goes, through fsspec: atomic writes of segmentations, one record per finished case (what makes
  a run resumable, even after a kill), and the cohort table ``volumes.parquet`` / ``volumes.csv``.
- ``worker``: the Ray Data stages: reading bytes (a light task) and :class:`~mlops.batch.worker.SegmentActor`, a
  stateful actor holding the same :class:`~mlops.inference.Segmenter` as `mlops predict`, loaded once per actor.
- ``run``: the pipeline and its Ray: a local Ray with this machine's cores, or an existing cluster by address.
"""

from mlops.batch.run import BatchSummary, run_batch

__all__ = ["BatchSummary", "run_batch"]
