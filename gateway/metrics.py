"""Prometheus metrics. No module-level metric objects: each :class:`Metrics` owns its
registry, so every test gets fresh counters.

Labels come only from closed sets: restore outcomes, store operations, error
kinds and protocol error codes. Never a session ID, caller or tenant.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.core.agent import AGENT_ERRORS
from gateway.core.auth import REASONS
from gateway.core.protocol import ERRORS
from gateway.core.resume import Outcome
from gateway.exceptions import StoreConflict, StoreError, StoreTimeout, StoreUnavailable

__all__ = ["SHARED_DIR_ENV", "Metrics"]

SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set by ``--workers`` for each worker: the directory where prometheus-client's
multiprocess mode keeps every worker's values, so that one scrape sums them."""

_STORE_OPS = ("restore", "write_turn", "push", "end", "touch", "notify", "ping")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def error_kind(exc: StoreError) -> str:
    """Return the closed-set label for a store error."""
    if isinstance(exc, StoreTimeout):
        return "timeout"
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    if isinstance(exc, StoreConflict):
        return "conflict"
    return "other"


class Metrics:
    """Every metric the gateway exports.

    Args:
        registry: Where to register; a fresh one by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, tenants: int = 100) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._tenants = tenants
        self._tenant_labels: set[str] = set()
        self.restores = Counter(
            "restores",
            "Hellos by what the store held for the caller key.",
            ["outcome"],
            namespace="hangon",
            subsystem="session",
            registry=r,
        )
        self.turns = Counter(
            "turns",
            "Turns answered: applied, duplicate (a re-sent turn, acknowledged again) or nacked"
            " (not stored for want of the store; the client sends it again).",
            ["outcome"],
            namespace="hangon",
            subsystem="session",
            registry=r,
        )
        self.sessions_active = Gauge(
            "active",
            "Sessions with a connected client on this instance.",
            namespace="hangon",
            subsystem="session",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections_active = Gauge(
            "active",
            "Open WebSocket connections, before and after hello.",
            namespace="hangon",
            subsystem="connection",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.protocol_errors = Counter(
            "errors",
            "Connections closed for bad input or a failure, by error code.",
            ["code"],
            namespace="hangon",
            subsystem="protocol",
            registry=r,
        )
        self.store_seconds = Histogram(
            "op_seconds",
            "Store operation latency, retries included; write_turn is the per-turn snapshot write.",
            ["op"],
            namespace="hangon",
            subsystem="store",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.store_errors = Counter(
            "errors",
            "Store operation failures (each attempt), by operation and kind.",
            ["op", "kind"],
            namespace="hangon",
            subsystem="store",
            registry=r,
        )
        self.store_round_trips = Counter(
            "round_trips",
            "Round trips to Redis: one per pipeline or single command sent (on a cluster,"
            " one per node a pipeline went to).",
            namespace="hangon",
            subsystem="store",
            registry=r,
        )
        self.store_pipeline_ops = Histogram(
            "pipeline_ops",
            "Script calls carried by each round trip to Redis that carried any.",
            namespace="hangon",
            subsystem="store",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.agent_connects = Counter(
            "connects",
            "Connection attempts to the voice agent, by outcome (ok or error).",
            ["outcome"],
            namespace="hangon",
            subsystem="agent",
            registry=r,
        )
        self.agent_links_active = Gauge(
            "links_active",
            "Open connections to the voice agent.",
            namespace="hangon",
            subsystem="agent",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.agent_cuts = Counter(
            "links_cut",
            "Agent connections the gateway dropped: the agent did not read (slow_consumer), or"
            " the link failed unexpectedly (error, logged with its session).",
            ["reason"],
            namespace="hangon",
            subsystem="agent",
            registry=r,
        )
        self.agent_errors = Counter(
            "frames_rejected",
            "Frames from the voice agent rejected and not relayed, by error code.",
            ["code"],
            namespace="hangon",
            subsystem="agent",
            registry=r,
        )
        self.messages = Counter(
            "messages",
            "Agent messages: stored for replay, relayed live to a client, replayed on resume, or"
            " dropped (a resuming client missed them: the replay window had moved past them).",
            ["how"],
            namespace="hangon",
            subsystem="relay",
            registry=r,
        )
        self.replays = Counter(
            "resumes",
            "Welcomes by replay completeness: full, or partial when the window overran.",
            ["replay"],
            namespace="hangon",
            subsystem="relay",
            registry=r,
        )
        self.takeovers = Counter(
            "takeovers",
            "Sessions moved between connections: local (a newer connection on this instance),"
            " remote (taken from another live instance, which is told), lost (taken from here).",
            ["kind"],
            namespace="hangon",
            subsystem="session",
            registry=r,
        )
        self.media = Counter(
            "media_frames",
            "A phone stream's audio, marks and clears, by direction (to_agent, to_caller) and"
            " outcome (relayed; dropped: no link or stream, or too many waiting).",
            ["direction", "outcome"],
            namespace="hangon",
            subsystem="relay",
            registry=r,
        )
        self.auth_failures = Counter(
            "failures",
            "Connections refused for their credentials, by reason: a token's (missing_token,"
            " expired_token, wrong_tenant, ...), origin (upgrade from an Origin not allowed),"
            " twilio_signature (upgrade without Twilio's signature).",
            ["reason"],
            namespace="hangon",
            subsystem="auth",
            registry=r,
        )
        self.shed = Counter(
            "shed",
            "Connections refused because too many hellos already wait for a restore, by"
            " stage: upgrade (HTTP 503 before the WebSocket opens) or hello (close 1013).",
            ["stage"],
            namespace="hangon",
            subsystem="admission",
            registry=r,
        )
        self.upgrade_timeouts = Counter(
            "upgrade_timeouts",
            "TCP connections reset for not finishing their upgrade (or HTTP request) within"
            " --handshake-timeout.",
            namespace="hangon",
            registry=r,
        )
        self.admission_waiting = Gauge(
            "waiting",
            "Hellos waiting for a restore slot.",
            namespace="hangon",
            subsystem="admission",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.admission_restoring = Gauge(
            "restoring",
            "Hellos restoring now (at most --max-restores).",
            namespace="hangon",
            subsystem="admission",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.tenant_connections = Gauge(
            "sessions",
            "Active sessions by tenant: connections that said hello (their session open or"
            " opening), the first --metrics-tenants tenants under their own name, the rest"
            " together as other.",
            ["tenant"],
            namespace="hangon",
            subsystem="tenant",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.draining = Gauge(
            "draining",
            "1 while this instance drains for a shutdown: /readyz fails, clients get 1012.",
            namespace="hangon",
            subsystem="server",
            multiprocess_mode="livemax",
            registry=r,
        )
        # Pre-create children so that dashboards see zeros, not gaps.
        for kind in ("local", "remote", "lost"):
            self.takeovers.labels(kind)
        for outcome in Outcome:
            self.restores.labels(outcome.value)
        self.restores.labels("error")
        self.restores.labels("degraded")
        for turn in ("applied", "duplicate", "nacked"):
            self.turns.labels(turn)
        for code in ERRORS:
            self.protocol_errors.labels(code)
        for op in _STORE_OPS:
            self.store_seconds.labels(op)
        for result in ("ok", "error"):
            self.agent_connects.labels(result)
        for agent_code in AGENT_ERRORS:
            self.agent_errors.labels(agent_code)
        for reason in ("slow_consumer", "error"):
            self.agent_cuts.labels(reason)
        for how in ("stored", "relayed", "replayed", "dropped"):
            self.messages.labels(how)
        for replay in ("full", "partial"):
            self.replays.labels(replay)
        for direction in ("to_agent", "to_caller"):
            for relayed in ("relayed", "dropped"):
                self.media.labels(direction, relayed)
        for reason in (*REASONS, "resume_token_replayed", "origin", "twilio_signature"):
            self.auth_failures.labels(reason)
        for stage in ("upgrade", "hello"):
            self.shed.labels(stage)

        # Children resolved once: labels() costs a lock and a dict lookup per call, on the
        # path of every turn.
        self.store_op_seconds = {op: self.store_seconds.labels(op) for op in _STORE_OPS}
        self.turns_applied = self.turns.labels("applied")
        self.turns_duplicate = self.turns.labels("duplicate")
        self.messages_stored = self.messages.labels("stored")
        self.messages_relayed = self.messages.labels("relayed")
        self.media_frames = {
            (direction, fate): self.media.labels(direction, fate)
            for direction in ("to_agent", "to_caller")
            for fate in ("relayed", "dropped")
        }
        """Each audio frame counts once: the children, by (direction, relayed or dropped)."""

    def tenant(self, tenant: str) -> str:
        """The label of ``tenant`` in per-tenant metrics: its name, or ``other`` once the
        first ``tenants`` names are taken (bounded cardinality)."""
        labels = self._tenant_labels
        if tenant in labels:
            return tenant
        if len(labels) < self._tenants:
            labels.add(tenant)
            return tenant
        return "other"

    def store_error(self, exc: StoreError) -> None:
        """Count one failed store attempt."""
        self.store_errors.labels(exc.op, error_kind(exc)).inc()

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text format: under ``--workers``, every
        worker's (counters and histograms summed over live and dead workers, so a restart
        neither resets nor doubles them; gauges summed over the live ones, ``draining`` their
        maximum)."""
        shared = os.environ.get(SHARED_DIR_ENV)
        if not shared:
            return bytes(generate_latest(self.registry))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=shared)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
