"""The one protobuf timestamp helper: the gateway stamps its requests to the AI service and the
AI service stamps its replies with it."""
from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp_now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
