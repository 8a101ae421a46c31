"""Prometheus figures of the files service, served on /metrics by the service plugin."""
from prometheus_client import Counter

UPLOADED_BYTES = Counter("files_uploaded_bytes_total", "Bytes stored by completed uploads")
UPLOADED_FILES = Counter("files_uploaded_total", "Completed uploads, by content type", ["content_type"])
