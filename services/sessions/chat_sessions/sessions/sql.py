"""Every statement the service sends, as constants: asyncpg prepares each once per connection
(its statement cache is keyed by the text) and then only binds and executes it, one round trip.
Tables and functions are found through the connection's search_path (the service schema).

Each constant is one statement, run outside an explicit transaction (so it is its own): the
writes that must be atomic together are PL/pgSQL functions (migration 0002).
"""
from __future__ import annotations

_SESSION_COLUMNS = (
    "id, user_id, name, model_name, prompt, summary, summarized_upto, entry_count, created_at, updated_at"
)

CREATE_SESSION = f"""
INSERT INTO sessions (id, user_id, name, model_name, prompt, idempotency_key, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp(), clock_timestamp())
ON CONFLICT DO NOTHING
RETURNING {_SESSION_COLUMNS}
"""

SESSION_BY_KEY = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND idempotency_key = $2"

SESSION_BY_ID_ANY_OWNER = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = $1"

GET_SESSION = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = $1 AND user_id = $2"

# The total and the page in one statement (one snapshot); the count comes from its own subquery
# so an offset past the end still reports it. A page with no rows is one row of NULLs.
LIST_SESSIONS = """
SELECT c.total, s.id, s.user_id, s.name, s.model_name, s.prompt, s.summary, s.summarized_upto,
       s.entry_count, s.created_at, s.updated_at
  FROM (SELECT count(*) AS total FROM sessions WHERE user_id = $1) AS c
  LEFT JOIN LATERAL (
        SELECT * FROM sessions WHERE user_id = $1
         ORDER BY created_at DESC, id DESC
         LIMIT $2 OFFSET $3
  ) AS s ON true
"""

# The session and its last $3 entries (bounded by the entry_count of the same row version, so
# a turn committed meanwhile is never half counted): one statement, one snapshot. The entries
# come as parallel arrays (NULL when there are none).
SESSION_WITH_ENTRIES = """
SELECT s.id, s.user_id, s.name, s.model_name, s.prompt, s.summary, s.summarized_upto,
       s.entry_count, s.created_at, s.updated_at,
       e.seqs, e.roles, e.contents, e.turn_ids, e.times
  FROM sessions AS s
  CROSS JOIN LATERAL (
        SELECT array_agg(x.seq ORDER BY x.seq) AS seqs,
               array_agg(x.role ORDER BY x.seq) AS roles,
               array_agg(x.content ORDER BY x.seq) AS contents,
               array_agg(x.turn_id ORDER BY x.seq) AS turn_ids,
               array_agg(x.created_at ORDER BY x.seq) AS times
          FROM entries AS x
         WHERE x.session_id = s.id AND x.seq >= s.entry_count - $3 AND x.seq < s.entry_count
  ) AS e
 WHERE s.id = $1 AND s.user_id = $2
"""

APPEND_TURN = """
SELECT o_status, o_first_seq, o_count, o_entry_count
  FROM append_turn($1, $2, $3, $4::text[], $5::text[], $6, $7, $8, $9, $10, $11, $12::jsonb, $13::text[])
"""

# $9: the receipt's details for the outbox row, JSON text (migrations 0007, 0010)
STORE_SUMMARY = f"SELECT {_SESSION_COLUMNS} FROM store_summary($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)"

GET_TURN = """
SELECT t.first_seq, t.count
  FROM turns AS t JOIN sessions AS s ON s.id = t.session_id
 WHERE t.session_id = $1 AND t.turn_id = $2 AND s.user_id = $3
"""

# Entries and turns go with the session (ON DELETE CASCADE); outbox rows stay.
DELETE_SESSION = "DELETE FROM sessions WHERE id = $1 AND user_id = $2"

OUTBOX_PAGE = """
SELECT id, key, kind, user_id, session_id, turn_id, cost_nanos, reservation_id, model_name, receipt::text
  FROM outbox
 WHERE created_at <= now() - make_interval(secs => $1)
 ORDER BY created_at, id
 LIMIT $2
"""

OUTBOX_ACK = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"

PING = "SELECT 1"

# Full-text search over the owner's 'user' and 'assistant' entries (migration 0003's
# search_entries, planned for the words it is given): $1 user, $2 plain text, $3 limit; best
# first. The headline is made here, only for the rows returned (it re-parses the text, the
# costly part), with the same configuration as the column's ('english'). The snippet is plain
# text (no highlight markup: a client showing it as HTML must not meet tags, and the entry's
# own text may hold some).
SEARCH_ENTRIES = """
SELECT h.session_id, h.session_name, h.seq, h.role,
       ts_headline('english'::regconfig, left(h.content, 100000), plainto_tsquery('english'::regconfig, $2),
                   'StartSel="", StopSel="", MaxWords=35, MinWords=15, ShortWord=3'),
       h.created_at
  FROM search_entries($1, $2, $3) AS h
 ORDER BY h.rank DESC, h.created_at DESC, h.session_id, h.seq
"""

# Retention (migration 0004). Remove up to $2 sessions whose last activity is older than $1
# seconds, with their entries and turns (ON DELETE CASCADE), and record each in
# expired_sessions in the same statement, for the files to be removed. SKIP LOCKED: a session
# another sweeper (or an append) holds is left to it; an append that commits first refreshes
# updated_at, and the row is then re-checked and kept.
EXPIRE_SESSIONS = """
WITH gone AS (
    DELETE FROM sessions
     WHERE id IN (SELECT id FROM sessions
                   WHERE updated_at < clock_timestamp() - make_interval(secs => $1)
                   ORDER BY updated_at
                   LIMIT $2
                   FOR UPDATE SKIP LOCKED)
       AND updated_at < clock_timestamp() - make_interval(secs => $1)
    RETURNING id, user_id
)
INSERT INTO expired_sessions (session_id, user_id)
SELECT id, user_id FROM gone
ON CONFLICT (session_id) DO NOTHING
RETURNING session_id, user_id
"""

# Removed sessions whose files were not confirmed gone after $1 seconds (a sweeper died).
EXPIRED_PAGE = """
SELECT session_id, user_id FROM expired_sessions
 WHERE removed_at <= now() - make_interval(secs => $1)
 ORDER BY removed_at, session_id
 LIMIT $2
"""

EXPIRED_ACK = "DELETE FROM expired_sessions WHERE session_id = ANY($1::uuid[])"
