"""The server's Prometheus metrics (``GET /metrics``)."""
from __future__ import annotations

__all__ = ["Metrics", "route_label"]


class Metrics:
    """Prometheus metrics through ``prometheus_client`` (its registry and text format, which
    escapes label values), one registry per application. Requests are labelled by route
    template (``/v1/completions``; ``unmatched`` for any path no route serves), never by the
    raw path, so the label set stays fixed whatever clients send."""

    def __init__(self, buckets, state):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("fastlm_requests", "HTTP requests by route template and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("fastlm_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("fastlm_generation_tokens", "generated tokens", registry=r)
        Gauge("fastlm_queue_depth", "sequences waiting for a batch row", registry=r).set_function(
            lambda: state.engine.queue_depth if state.engine else 0)
        Gauge("fastlm_running_sequences", "sequences in the running batch", registry=r).set_function(
            lambda: state.engine.n_running if state.engine else 0)
        self.ttft = Histogram("fastlm_time_to_first_token_seconds", "time from request arrival to its first token",
                              buckets=buckets, registry=r)
        self.tpot = Histogram("fastlm_time_per_output_token_seconds", "time between consecutive tokens of a sequence",
                              buckets=buckets, registry=r)
        self.e2e = Histogram("fastlm_request_duration_seconds", "time from request arrival to its last token",
                             buckets=tuple(buckets) + (30.0, 60.0, 120.0, 300.0), registry=r)

    def request(self, route: str, status: int):
        self.requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_label(request) -> str:
    """The template of the route that matched ``request`` (``unmatched`` when none did)."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"
