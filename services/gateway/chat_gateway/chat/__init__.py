"""The chat turn and what it needs: the session-name rule, the Redis context cache and the
per-session lock."""
