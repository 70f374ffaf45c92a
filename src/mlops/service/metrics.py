"""The service's Prometheus metrics (``GET /metrics``): requests, latency, errors, in flight, inference time, the
output signals of each prediction and the drift gauges; one registry per app, so tests and workers never share one."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
PROBABILITY_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
ENTROPY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
VOLUME_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 50, 100, 500, 1000, 5000)


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one process, e.g. in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlops_http_requests_total", "HTTP requests", ["method", "path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mlops_http_request_duration_seconds", "Request latency", ["path"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter("mlops_http_errors_total", "Error responses", ["status"], registry=self.registry)
        self.in_flight = Gauge("mlops_predict_in_flight", "Predictions being served", registry=self.registry)
        self.inference = Histogram(
            "mlops_inference_duration_seconds", "Model time per prediction", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        # Output signals of every prediction (mlops.monitoring.signals): no labels needed to watch them.
        self.confidence = Histogram(
            "mlops_prediction_confidence", "Mean max-softmax probability of a prediction", ["region"],
            buckets=PROBABILITY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        for region in ("foreground", "overall"):
            self.confidence.labels(region)
        self.entropy = Histogram(
            "mlops_prediction_entropy", "Mean normalised softmax entropy over the predicted foreground",
            buckets=ENTROPY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.agreement = Histogram(
            "mlops_prediction_agreement_dice", "Mean pairwise foreground Dice between mirrored passes or folds",
            buckets=PROBABILITY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.volume = Histogram(
            "mlops_prediction_volume_ml", "Predicted volume of each label (mL)", ["label"], buckets=VOLUME_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.drift_share = Gauge(
            "mlops_drift_share", "Share of drifted statistics at the last drift comparison (0 without a verdict)",
            registry=self.registry,
        )  # fmt: skip
        self.drift_samples = Gauge(
            "mlops_drift_current_samples", "Current cases in the last drift comparison",
            registry=self.registry,
        )  # fmt: skip
        self.drift_out_of_range = Gauge(
            "mlops_drift_cases_out_of_range",
            "Current cases outside the reference's range (monitor.range_margin) at the last drift comparison",
            registry=self.registry,
        )  # fmt: skip

    def set_drift(self, summary: Any) -> None:
        """The gauges of a drift comparison (from /monitoring/drift or the periodic refresh)."""
        self.drift_share.set(summary.drift_share)
        self.drift_samples.set(summary.current_rows)
        self.drift_out_of_range.set(len(summary.cases_out_of_range))

    def observe_signals(self, signals: dict[str, Any]) -> None:
        for region in ("foreground", "overall"):
            value = signals.get(f"confidence_{region}")
            if value is not None:
                self.confidence.labels(region).observe(value)
        if signals.get("entropy_foreground") is not None:
            self.entropy.observe(signals["entropy_foreground"])
        if signals.get("agreement_dice_mean") is not None:
            self.agreement.observe(signals["agreement_dice_mean"])
        for key, value in signals.items():
            if key.startswith("volume_ml_"):
                self.volume.labels(key.removeprefix("volume_ml_")).observe(value)
