# GPU training image: `docker run --gpus all --ipc=host IMAGE --fold 0 dataset.id=4` runs `mlops train` on a GPU.
# Build from the repository root: docker build -f dockerfiles/train.dockerfile -t mlops-train .
# A slim Python base is enough: PyPI's torch wheel carries its own CUDA and cuDNN libraries (the nvidia-* wheels);
# the host (or Vertex AI) provides only the driver. nnU-Net's augmentation workers share batches through /dev/shm:
# run with --ipc=host or --shm-size=8g (Docker's default 64 MB kills them).
# The data root (nnUNet_raw/preprocessed/results beneath it) is a volume or, on Vertex AI, a GCS FUSE mount.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# Same pins as `make install` (requirements.txt pins torch==2.13.0; on PyPI that is the CUDA build). The same image
# runs `mlops batch` on a KubeRay cluster (deploy/kuberay/): ray[default] adds the dashboard agent, through which
# KubeRay submits a RayJob and probes the nodes.
COPY requirements.txt pyproject.toml README.md ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -r requirements.txt "ray[default]==2.60.0"
COPY src/ src/
COPY configs/ configs/
RUN /opt/venv/bin/python -m pip install --no-deps --no-build-isolation . \
 && useradd --create-home --uid 1000 mlops && mkdir -p /data && chown mlops /data

ENV PATH=/opt/venv/bin:$PATH MLOPS_CONFIG_DIR=/app/configs MLOPS_DATA_DIR=/data nnUNet_n_proc_DA=8 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
ENTRYPOINT ["mlops", "train"]
CMD ["--fold", "0", "--device", "cuda"]
