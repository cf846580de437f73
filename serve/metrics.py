"""The server's Prometheus metrics (one registry per app, so several apps can share a process).

singlepass_requests_total{endpoint, outcome}      outcome: ok, blocked, invalid, unauthorized,
                                                  not_found, too_large, queue_full, timeout,
                                                  cancelled, unavailable, error
singlepass_queue_depth                            requests waiting for a batch row
singlepass_running_sequences                      rows in the running batch
singlepass_time_to_first_token_seconds            arrival -> first token (or refusal/labels)
singlepass_request_latency_seconds{endpoint}      arrival -> response complete
singlepass_prompt_tokens_total / singlepass_generated_tokens_total
singlepass_labels_total{probe, label}             each served prompt's label per probe
singlepass_blocks_total{probe}                    prompts refused by the label policy (probe
                                                  "guard": by the --guard classifier)
singlepass_response_stops_total{probe}            responses stopped by a response probe's rule
singlepass_guard_seconds                          --guard: queued + scored, per prompt
singlepass_decode_batch_rows                      rows per decode pass
singlepass_engine_seconds_total{phase}            engine loop time: prefill, join, decode, tidy
singlepass_engine_tokens_total{phase}             prompt tokens prefilled / tokens decoded
"""

from __future__ import annotations

from singlepass.serve.engine import Job, Observer, Out

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics(Observer):
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "singlepass_requests", "HTTP requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.queue_depth = Gauge("singlepass_queue_depth", "requests waiting for a batch row", registry=r)
        self.running = Gauge("singlepass_running_sequences", "sequences in the running batch", registry=r)
        self.ttft = Histogram(
            "singlepass_time_to_first_token_seconds",
            "arrival to the first token (prefill done: labels, first token or refusal)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "singlepass_request_latency_seconds",
            "arrival to the response's end",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("singlepass_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("singlepass_generated_tokens", "tokens generated", registry=r)
        self.labels = Counter("singlepass_labels", "labels given to served prompts", ["probe", "label"], registry=r)
        self.blocks = Counter("singlepass_blocks", "prompts refused by the label policy", ["probe"], registry=r)
        self.stops = Counter(
            "singlepass_response_stops", "responses stopped by a response probe's rule", ["probe"], registry=r
        )
        self.guard_seconds = Histogram(
            "singlepass_guard_seconds", "--guard: a prompt queued and scored", buckets=LATENCY_BUCKETS, registry=r
        )
        self.engine_seconds = Counter("singlepass_engine_seconds", "engine loop time by phase", ["phase"], registry=r)
        self.engine_tokens = Counter(
            "singlepass_engine_tokens", "tokens by engine phase (prefill: prompt, decode: new)", ["phase"], registry=r
        )
        self.batch_rows = Histogram(
            "singlepass_decode_batch_rows", "rows per decode pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )

    # -- the engine's Observer
    def queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def first(self, job: Job, out: Out, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(len(job.ids))
        for name, lb in (out.labels or {}).items():
            self.labels.labels(name, lb.label).inc()
        if out.blocked_by:
            self.blocks.labels(out.blocked_by).inc()

    def generated(self, n: int) -> None:
        if n:
            self.generated_tokens.inc(n)

    def batch(self, rows: int) -> None:
        self.batch_rows.observe(rows)

    def stopped(self, job: Job, probe: str) -> None:
        self.stops.labels(probe).inc()

    def phase(self, name: str, seconds: float, tokens: int = 0) -> None:
        self.engine_seconds.labels(name).inc(seconds)
        if tokens:
            self.engine_tokens.labels(name).inc(tokens)

    # -- the --guard stage
    def guarded(self, label: str, seconds: float, flagged: bool) -> None:
        self.guard_seconds.observe(seconds)
        self.labels.labels("guard", label).inc()
        if flagged:
            self.blocks.labels("guard").inc()

    # -- HTTP
    def request(self, endpoint: str, outcome: str, seconds: float | None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        if seconds is not None:
            self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
