"""Prometheus metrics of the style worker (shared RPC/Kafka metrics live in libs/common/metrics.py).

The provider is a label on the inference metrics so a dashboard shows at once
whether a "GPU" pod is really running on the GPU.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

INFERENCE_SECONDS = Histogram(
    "stylerec_style_inference_seconds",
    "Time one (batched) network run took.",
    ["model", "provider", "mode"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "stylerec_style_batch_size",
    "Requests per network run, as formed by the dynamic batcher.",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
QUEUE_WAIT_SECONDS = Histogram(
    "stylerec_style_queue_wait_seconds",
    "Time a request waited in the dynamic batcher before its batch started.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("stylerec_style_queue_depth", "Requests waiting in the dynamic batcher.", ["model"])
JOBS = Counter(
    "stylerec_style_jobs_total",
    "Style jobs by kind and outcome (ok, duplicate, dead_letter).",
    ["kind", "outcome"],
)
JOB_SECONDS = Histogram(
    "stylerec_style_job_seconds",
    "Job time from consumption to stored result.",
    ["kind"],
    buckets=_LATENCY_BUCKETS,
)
IMAGES_REJECTED = Counter(
    "stylerec_style_images_rejected_total",
    "Images refused before or during decoding, by reason class.",
    ["reason", "source"],
)
PROVIDER_INFO = Gauge(
    "stylerec_style_provider_active",
    "1 for the execution provider the networks run on, 0 for probed providers that did not load.",
    ["provider"],
)
