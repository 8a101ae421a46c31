"""The ``files`` table (``migrations/0001_init.sql``; statements in ``sql.py``): a file's life is
``staged`` (uploaded, no session yet) -> ``attached`` (given a session) -> ``used`` (a turn
carried it). Only ``used`` files outlive the stale-upload sweep."""
from __future__ import annotations

STAGED = "staged"
ATTACHED = "attached"
USED = "used"
