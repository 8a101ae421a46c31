"""Every statement of the files service, prebuilt (asyncpg; the table is migrations/0001_init.sql,
found through the connection's search_path). Parameters are always ``$n``, never text."""
from __future__ import annotations

COLUMNS = (
    "file_name, user_id, session_id, original_name, content_type, size, sha256, object_key, status, turn_id, "
    "created_at, attached_at, used_at"
)

GET = f"SELECT {COLUMNS} FROM files WHERE file_name = $1"
GET_FOR_UPDATE = f"{GET} FOR UPDATE"
SESSION_FILES = f"SELECT {COLUMNS} FROM files WHERE session_id = $1 AND user_id = $2 ORDER BY created_at, file_name"
USAGE = "SELECT coalesce(sum(size), 0)::bigint, count(*) FROM files WHERE user_id = $1"
# Serialises the quota decisions of one user across requests and replicas ($1 'files-quota:<user>').
LOCK_USER = "SELECT pg_advisory_xact_lock(hashtext($1))"

INSERT = f"""
INSERT INTO files (file_name, user_id, session_id, original_name, content_type, size, sha256, object_key, status,
                   created_at, attached_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
RETURNING {COLUMNS}
"""
DELETE_ROW = "DELETE FROM files WHERE file_name = $1"
ATTACH = f"""
UPDATE files SET user_id = $2, session_id = $3, status = $4, attached_at = now()
 WHERE file_name = $1
RETURNING {COLUMNS}
"""
MARK_USED = f"""
UPDATE files SET session_id = $2, status = 'used', turn_id = $3, used_at = now(),
                 attached_at = coalesce(attached_at, now())
 WHERE file_name = $1
RETURNING {COLUMNS}
"""
# The owner's file, or a staged upload nobody owns yet; $2 NULL: only the latter.
DELETE_OWNED = """
DELETE FROM files
 WHERE file_name = $1 AND ((user_id IS NULL AND status = 'staged') OR user_id = $2)
RETURNING object_key
"""
DELETE_SESSION_FILES = "DELETE FROM files WHERE session_id = $1 AND user_id = $2 RETURNING object_key"
# Never used and older than $1, up to $2 at a time; SKIP LOCKED: another sweeper's are its own.
SWEEP_STALE = """
DELETE FROM files
 WHERE file_name IN (SELECT file_name FROM files WHERE status <> 'used' AND created_at < $1
                      LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING object_key
"""
KNOWN_KEYS = "SELECT object_key FROM files WHERE object_key = ANY($1::text[])"
PING = "SELECT 1"

# Per-user administration (admin.py)
USER_FILES = f"SELECT {COLUMNS} FROM files WHERE user_id = $1 ORDER BY created_at, file_name"
OWNER = "SELECT user_id FROM files WHERE file_name = $1"
IMPORT = """
INSERT INTO files (file_name, user_id, session_id, original_name, content_type, size, sha256, object_key, status,
                   turn_id, created_at, attached_at, used_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
"""
USER_KEYS = "SELECT object_key FROM files WHERE user_id = $1"
ERASE_USER = "DELETE FROM files WHERE user_id = $1"
# the planner's statistics must not keep sampled values of erased rows
ANALYZE = "ANALYZE files"
