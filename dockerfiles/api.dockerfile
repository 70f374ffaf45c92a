# Segmentation API for Cloud Run: CPU torch, non-root, model baked in or fetched from GCS at start-up.
# Build from the repository root:
#   docker build -f dockerfiles/api.dockerfile -t mlops-api .                                 # fetch model at start-up
#   docker build -f dockerfiles/api.dockerfile --build-arg MODEL_DIR=path/to/model -t mlops-api .   # bake it in
# Run: docker run -p 8080:8080 -e MODEL_URI=gs://YOUR_BUCKET/models/nnUNetTrainer__nnUNetPlans__3d_fullres mlops-api
# MODEL_DIR must lie inside the build context: .dockerignore sends data/nnUNet_results but not the rest of data/.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# Same pins as `make install`; CPU torch comes from PyTorch's CPU index (Cloud Run has no GPU by default).
COPY requirements.txt pyproject.toml README.md ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY src/ src/
COPY configs/ configs/
RUN /opt/venv/bin/python -m pip install --no-deps --no-build-isolation .

# Optional baked-in model: an nnU-Net results folder (plans.json, dataset.json, fold_N/checkpoint_final.pth).
ARG MODEL_DIR=""
COPY ${MODEL_DIR:-configs}/ /models/baked/
RUN if [ -n "$MODEL_DIR" ]; then echo "model baked in"; else rm -rf /models/baked; fi \
 && useradd --create-home --uid 1000 mlops && mkdir -p /data && chown -R mlops /data

ENV PATH=/opt/venv/bin:$PATH MLOPS_CONFIG_DIR=/app/configs MLOPS_DATA_DIR=/data PORT=8080
USER 1000:1000
EXPOSE 8080
# Cloud Run sets PORT; the model comes from /models/baked, or from serve.model_uri (gs://...) via MODEL_URI.
# MONITOR_STORE=gs://bucket/monitoring keeps request records beyond the instance (monitor.store).
# MLOPS_HOST (default 0.0.0.0, every interface of the container) lets a test run this exact line on 127.0.0.1.
CMD ["sh", "-c", "exec mlops serve serve.host=${MLOPS_HOST:-0.0.0.0} predict.device=cpu ${MODEL_URI:+serve.model_uri=$MODEL_URI} ${MAX_IN_FLIGHT:+serve.max_in_flight=$MAX_IN_FLIGHT} ${MONITOR_STORE:+monitor.store=$MONITOR_STORE monitor.flush_s=30} $( [ -d /models/baked ] && echo predict.model_dir=/models/baked )"]
