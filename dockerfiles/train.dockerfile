# GPU training image: `docker run --gpus all IMAGE --fold 0 dataset.id=4` runs `mlops train` on a CUDA GPU.
# Build from the repository root: docker build -f dockerfiles/train.dockerfile -t mlops-train .
# The data root (nnUNet_raw/preprocessed/results beneath it) is a volume or, on Vertex AI, a GCS FUSE mount.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Same install as `make install` (requirements.txt pins torch==2.13.0; on PyPI that is the CUDA build).
COPY requirements.txt pyproject.toml README.md ./
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --upgrade pip \
 && /opt/venv/bin/python -m pip install -r requirements.txt
COPY src/ src/
COPY configs/ configs/
RUN /opt/venv/bin/python -m pip install --no-deps --no-build-isolation . \
 && useradd --create-home --uid 1000 mlops && mkdir -p /data && chown mlops /data

ENV PATH=/opt/venv/bin:$PATH MLOPS_CONFIG_DIR=/app/configs MLOPS_DATA_DIR=/data nnUNet_n_proc_DA=8
USER mlops
ENTRYPOINT ["mlops", "train"]
CMD ["--fold", "0", "--device", "cuda"]
