"""mlops: Medical Segmentation Decathlon tasks to deployed nnU-Net v2 models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlops")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
