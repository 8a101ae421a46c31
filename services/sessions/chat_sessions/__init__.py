"""The sessions service: chat sessions, their ordered entries, prompts and running summaries,
each scoped to its owner, in PostgreSQL."""
