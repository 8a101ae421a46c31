"""Names and sizes the services agree on, written once."""
from __future__ import annotations

import re

# The session_id a client sends (protocol types 3 and the upload form) to have one made.
NEW_SESSION = "NEW"

# The names the files service gives uploads: 32 hex digits and the extension it checked.
# Matched whole (fullmatch): anything else is no file this system issued.
ISSUED_FILE_NAME = re.compile(r"[0-9a-f]{32}\.[a-z0-9]{1,10}")

# How much of a file's start the files service reads to tell its type (magic numbers, text).
TYPE_HEAD_BYTES = 8192
