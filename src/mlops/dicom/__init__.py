"""DICOM in and out, for hospitals: a series read as the volume the model segments, its segmentation written as a
DICOM Segmentation (SEG), and a DICOMweb client for a PACS.

- :mod:`mlops.dicom.series`: a series from a folder, a ``.zip`` or a DICOMweb response: chosen (by
  SeriesInstanceUID when several), checked (one orientation, uniform spacing, no missing slices, no tilt, bounded
  size) and decoded into a NIfTI image in memory, so the model sees it as it sees the same scan as NIfTI.
- :mod:`mlops.dicom.seg`: labels on that grid -> a highdicom Segmentation that references the source series.
- :mod:`mlops.dicom.web`: ``dicomweb://`` URLs, WADO-RS retrieve, STOW-RS store, QIDO-RS search.
- :mod:`mlops.dicom.convert`: a NIfTI scan written as a DICOM series (to try the workflow, and for tests).

This is the I/O layer: it imports nothing above :mod:`mlops.volumes`, and nothing here logs a patient's data.
"""
