"""Prometheus metrics of the WebSocket protocol and the chat turn (default registry, served at
``/metrics`` by the service plugin)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CHAT_TURNS = Counter("chat_turns_total", "Chat turns (type 3) by outcome", ["outcome"])
CHAT_ERRORS = Counter("chat_errors_total", "Error replies sent on /ws by protocol code", ["code"])
CHAT_TURN_SECONDS = Histogram(
    "chat_turn_seconds",
    "Duration of a chat turn, from validation to reply",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CHAT_AI_SECONDS = Histogram(
    "chat_ai_seconds",
    "Duration of calls to the AI service",
    ["rpc"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CHAT_OPEN_SOCKETS = Gauge("chat_open_sockets", "Open /ws sockets")
CHAT_SOCKETS_REFUSED = Counter(
    "chat_sockets_refused_total", "Sockets refused or closed by a security check", ["reason"]
)
CHAT_RATE_LIMITED = Counter("chat_rate_limited_total", "Frames refused by the per-user rate limit")
