"""Locust load test of POST /predict against a local server (loopback only).

    mlops serve &   # then:
    locust -f benchmarks/locustfile.py --headless -u 4 -r 4 -t 30s --host http://127.0.0.1:8000

The case uploaded is $MLOPS_LOCUST_CASE (default: the first synthetic test case under data/synthetic).
503 answers (the service's in-flight bound) count as expected back-pressure, not as failures.
"""

from __future__ import annotations

import os
from pathlib import Path

from locust import HttpUser, between, task

CASE = Path(os.environ.get("MLOPS_LOCUST_CASE", "data/synthetic/Task500_Synthetic/imagesTs/synth_016.nii.gz"))
BODY = CASE.read_bytes()


class Segmenter(HttpUser):
    wait_time = between(0.0, 0.1)

    @task
    def predict(self) -> None:
        with self.client.post(
            "/predict?tta=false", files={"file": (CASE.name, BODY)}, catch_response=True, name="/predict"
        ) as resp:
            if resp.status_code == 503:
                resp.success()  # back-pressure by design
            elif resp.status_code != 200 or not resp.content.startswith(b"\x1f\x8b"):
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
