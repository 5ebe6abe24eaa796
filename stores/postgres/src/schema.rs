//! The database format and its versioned migrations, applied on connect
//! under a schema-level advisory lock.
//!
//! `triage_schema` holds one row with the version of everything else. A
//! store whose version is newer than [`LATEST_VERSION`] is refused with
//! [`Error::Incompatible`] before anything is written; an older one is
//! migrated step by step, each step and the new version in the same
//! transaction.

use deadpool_postgres::Client;
use tokio_postgres::error::SqlState;
use triage_event_store::Error;

use crate::Target;

/// The newest schema version this build knows: the number of migrations.
pub(crate) const LATEST_VERSION: i32 = 5;

/// First key of the advisory locks, "TRIA" in ASCII; the second key is the
/// hash of the schema name, so stores in different schemas never wait for
/// each other.
pub(crate) const APPEND_LOCK_CLASS: i32 = 0x5452_4941;
/// First key of the migration lock, "TRIM".
const MIGRATION_LOCK_CLASS: i32 = 0x5452_494D;
/// First key of the per-stream append locks, "TRIS"; the second key is the
/// hash of the schema and stream names.
pub(crate) const STREAM_LOCK_CLASS: i32 = 0x5452_4953;

/// `p_expected` of `triage_append` for a stream that must not exist.
pub(crate) const EXPECT_NO_STREAM: i64 = -1;
/// `p_expected` of `triage_append` for a stream that must exist, at any
/// revision.
pub(crate) const EXPECT_STREAM_EXISTS: i64 = -2;

/// The SQL of migration `version` (1-based) for the store in `schema`.
fn migration(schema: &str, version: i32) -> Option<String> {
    let s = schema;
    match version {
        1 => Some(format!(
            r#"
CREATE TABLE "{s}".triage_events (
    position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The top-level transaction that wrote the event: the watermark's key.
    tx_id       xid8        NOT NULL,
    stream      text        NOT NULL CHECK (octet_length(stream) BETWEEN 1 AND 255),
    revision    bigint      NOT NULL CHECK (revision >= 0),
    event_id    uuid        NOT NULL,
    event_type  text        NOT NULL,
    data        bytea       NOT NULL,
    metadata    bytea       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    -- Expected revisions are enforced by these two, not by locks.
    CONSTRAINT triage_events_stream_revision UNIQUE (stream, revision),
    CONSTRAINT triage_events_event_id UNIQUE (event_id)
);
-- Finds the highest position below the watermark in O(log n): positions
-- increase with tx_id (see triage_append).
CREATE INDEX triage_events_tx_id ON "{s}".triage_events (tx_id, position);

-- Appends one batch and returns the position of its last event.
--
-- Invariant: among the transactions that append to this schema, the order
-- of their transaction ids is the order of their positions. The session
-- advisory lock makes taking the transaction id and the positions one step
-- that no other append interleaves with; it is held only for the INSERT,
-- not until commit, so commits still run in parallel. Readers rely on the
-- invariant: every event with tx_id below a snapshot's xmin has a lower
-- position than every event that is still in flight, so the events below
-- the watermark are a gap-free prefix of the log.
--
-- Hence the function must be the first write of its transaction, and run
-- once per transaction: a transaction id taken earlier would be older than
-- positions handed out in between.
CREATE FUNCTION "{s}".triage_append(
    p_stream text, p_first_revision bigint, p_ids uuid[], p_types text[], p_data bytea[], p_metadata bytea[]
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_locked boolean := false;
    v_last bigint;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'triage_append must be the first write of its transaction'
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    BEGIN
        PERFORM pg_advisory_lock({APPEND_LOCK_CLASS}, hashtext('{s}'));
        v_locked := true;
        PERFORM pg_current_xact_id();
        WITH inserted AS (
            INSERT INTO "{s}".triage_events (tx_id, stream, revision, event_id, event_type, data, metadata)
            SELECT pg_current_xact_id(), p_stream, p_first_revision + e.ord - 1, e.id, e.t, e.d, e.m
            FROM unnest(p_ids, p_types, p_data, p_metadata) WITH ORDINALITY AS e (id, t, d, m, ord)
            ORDER BY e.ord
            RETURNING position
        )
        SELECT max(position) INTO v_last FROM inserted;
        PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        -- Session locks survive a rollback: release it before re-raising
        -- the error unchanged (SQLSTATE and constraint name included).
        IF v_locked THEN
            PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
        END IF;
        RAISE;
    END;
    -- Delivered at commit, and only if the transaction commits.
    PERFORM pg_notify('{channel}', v_last::text);
    RETURN v_last;
END
$fn$;
"#,
            channel = channel(s),
        )),
        // Version 2: triage_append no longer calls pg_notify. A transaction
        // that notified takes PostgreSQL's cluster-wide NOTIFY lock at commit
        // and holds it through its WAL flush, so every append committed and
        // flushed alone (no group commit). The store now announces its
        // appends after they commit, from a connection of its own (see
        // `notify.rs`); notifications are only wake-ups, and the polling
        // fallback finds whatever one of them misses.
        2 => Some(format!(
            r#"
-- The same function as in version 1 (see the invariant there), without
-- pg_notify.
CREATE OR REPLACE FUNCTION "{s}".triage_append(
    p_stream text, p_first_revision bigint, p_ids uuid[], p_types text[], p_data bytea[], p_metadata bytea[]
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_locked boolean := false;
    v_last bigint;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'triage_append must be the first write of its transaction'
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    BEGIN
        PERFORM pg_advisory_lock({APPEND_LOCK_CLASS}, hashtext('{s}'));
        v_locked := true;
        PERFORM pg_current_xact_id();
        WITH inserted AS (
            INSERT INTO "{s}".triage_events (tx_id, stream, revision, event_id, event_type, data, metadata)
            SELECT pg_current_xact_id(), p_stream, p_first_revision + e.ord - 1, e.id, e.t, e.d, e.m
            FROM unnest(p_ids, p_types, p_data, p_metadata) WITH ORDINALITY AS e (id, t, d, m, ord)
            ORDER BY e.ord
            RETURNING position
        )
        SELECT max(position) INTO v_last FROM inserted;
        PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        IF v_locked THEN
            PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
        END IF;
        RAISE;
    END;
    RETURN v_last;
END
$fn$;
"#
        )),
        // Version 3: `triage_append` takes a batch of appends to different
        // streams and checks each one's expected revision itself, under a
        // transaction-scoped lock per stream. The store groups the appends
        // of concurrent callers into one transaction (see `batcher.rs`):
        // one round trip, one pass through the append lock and one WAL
        // flush for many appends. Version 2's lock was taken by every append
        // and convoyed under load; and an append that lost a race waited,
        // holding it, for the winner's commit in a unique index.
        3 => Some(format!(
            r#"
DROP FUNCTION IF EXISTS "{s}".triage_append(text, bigint, uuid[], text[], bytea[], bytea[]);

-- Appends a batch of appends, one row per append in `p_streams`' order.
--
-- Append i writes to `p_streams[i]` if the stream is where `p_expected[i]`
-- says: its last revision (>= 0), {EXPECT_NO_STREAM} for "no stream",
-- {EXPECT_STREAM_EXISTS} for "exists, at any revision", NULL for "anything".
-- Its events are those whose `p_event_append` is i, in order, with
-- `p_event_index` their 0-based index in the append. The batch means
-- what running its appends one after the other means. Append i's row
-- holds, when it was written, the first revision and the last position;
-- otherwise NULLs there and either
-- - `conflict` true and `actual_revision` the stream's last revision
--   (NULL: no stream): the stream is not where the append expects it and
--   none of its ids is stored, a conflict as the port defines it; or
-- - `conflict` false: one of its ids is stored already, or is in an
--   earlier append of the batch, and the caller reads and decides (the
--   original result of a retry, or a conflict).
-- Appends that write are written together, in one INSERT.
--
-- Two kinds of locks, always in this order:
-- - Each stream's lock, in the order of their keys (so two batches never
--   wait for each other crosswise), held until the transaction ends:
--   every append takes it, so no other append to the stream is in flight
--   while this one reads the last revision and writes after it.
-- - The append lock of the schema, a session lock held only around taking
--   the transaction id and the positions, not until commit, so commits
--   still share WAL flushes. Invariant: among the transactions that
--   append to this schema, the order of their transaction ids is the
--   order of their positions. Readers rely on it: every event with tx_id
--   below a snapshot's xmin has a lower position than every event still
--   in flight, so the events below the watermark are a gap-free prefix
--   of the log. Hence the function must be the first write of its
--   transaction, and run once per transaction.
{function}"#,
            function = batch_append(s, ""),
        )),
        // Version 4: the same function, with a path of its own for a batch
        // of one append, the usual batch: the same answers in fewer
        // statements. Each statement of a PL/pgSQL function is a pass
        // through the executor with a snapshot of its own; the general path
        // runs about a dozen for one append.
        4 => Some(batch_append(s, &single_append(s))),
        // Version 5: the same function, which now counts the append lock as
        // taken before asking for it. Until version 4 a cancel that arrived
        // just after the grant left the session holding the lock (see
        // `batch_append`). Migrations 3 and 4 create the corrected function
        // too; this one brings it to stores already at version 4.
        5 => Some(batch_append(s, &single_append(s))),
        _ => None,
    }
}

/// `triage_append` for batches (version 3 on; see migration 3 for what it
/// does and the locks it takes), with `fast_path` run right after the
/// first-write check: SQL statements that answer some batches on their own
/// and return, or fall through to the general path.
fn batch_append(s: &str, fast_path: &str) -> String {
    format!(
        r#"CREATE OR REPLACE FUNCTION "{s}".triage_append(
    p_streams text[], p_expected bigint[], p_event_append int[], p_event_index int[],
    p_ids uuid[], p_types text[], p_data bytea[], p_metadata bytea[]
) RETURNS TABLE (first_revision bigint, last_position bigint, conflict boolean, actual_revision bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_first bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_streams)]);
    v_conflict boolean[] := array_fill(false, ARRAY[cardinality(p_streams)]);
    v_actual bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_streams)]);
    v_counts int[] := array_fill(0, ARRAY[cardinality(p_streams)]);
    -- The streams seen so far in the batch, and each one's last revision
    -- after the appends of the batch written before (NULL: no stream).
    v_seen text[] := '{{}}';
    v_seen_last bigint[] := '{{}}';
    v_seen_at int;
    v_stored int[];
    v_current bigint;
    v_expected bigint;
    v_key int;
    v_append int;
    v_locked boolean := false;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'triage_append must be the first write of its transaction'
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
{fast_path}    FOR v_key IN SELECT DISTINCT hashtext('{s}/' || stream_name) AS k FROM unnest(p_streams) AS stream_name ORDER BY k LOOP
        PERFORM pg_advisory_xact_lock({STREAM_LOCK_CLASS}, v_key);
    END LOOP;
    -- Statements of their own, so snapshots taken after the locks: they see
    -- every append to these streams that finished before.
    -- The appends with an id that is stored already (the ids through the
    -- unique index, then which appends they belong to, in memory), or
    -- that an earlier append of the batch has too (a retry that raced its
    -- original into one batch: it is stored by the time its caller reads).
    -- Looked for only when there is one: the usual batch has neither, and
    -- the full query costs more than the rest of the function.
    IF EXISTS (SELECT 1 FROM "{s}".triage_events WHERE event_id = ANY (p_ids))
        OR (SELECT count(DISTINCT id) FROM unnest(p_ids) AS id) < cardinality(p_ids) THEN
        SELECT array_agg(DISTINCT t.a) INTO v_stored
        FROM (
            SELECT u.id, u.a, min(u.a) OVER (PARTITION BY u.id) AS first_append
            FROM unnest(p_ids, p_event_append) AS u (id, a)
        ) AS t
        WHERE t.a > t.first_append
           OR t.id = ANY (ARRAY(SELECT event_id FROM "{s}".triage_events WHERE event_id = ANY (p_ids)));
    END IF;
    FOREACH v_append IN ARRAY p_event_append LOOP
        v_counts[v_append] := v_counts[v_append] + 1;
    END LOOP;
    -- As if the appends ran one after the other, in the batch's order.
    FOR i IN 1 .. cardinality(p_streams) LOOP
        v_seen_at := array_position(v_seen, p_streams[i]);
        IF v_seen_at IS NULL THEN
            SELECT max(revision) INTO v_current FROM "{s}".triage_events WHERE stream = p_streams[i];
            v_seen := v_seen || p_streams[i];
            v_seen_last := v_seen_last || v_current;
            v_seen_at := cardinality(v_seen);
        END IF;
        CONTINUE WHEN i = ANY (v_stored);
        v_current := v_seen_last[v_seen_at];
        v_expected := p_expected[i];
        -- NULL (anything) fails neither test.
        IF (v_expected = {EXPECT_STREAM_EXISTS} AND v_current IS NULL)
            OR (v_expected >= {EXPECT_NO_STREAM} AND v_current IS DISTINCT FROM nullif(v_expected, {EXPECT_NO_STREAM})) THEN
            v_conflict[i] := true;
            v_actual[i] := v_current;
            CONTINUE;
        END IF;
        v_first[i] := coalesce(v_current + 1, 0);
        v_seen_last[v_seen_at] := v_first[i] + v_counts[i] - 1;
    END LOOP;
    IF cardinality(array_remove(v_first, NULL)) = 0 THEN
        -- Nothing to write: no transaction id, no append lock.
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, v_conflict[n], v_actual[n]
            FROM generate_subscripts(p_streams, 1) AS n ORDER BY n;
        RETURN;
    END IF;
    BEGIN
        -- Set before the lock is asked for: a cancel (statement_timeout,
        -- lock_timeout, pg_cancel_backend) can arrive right after the grant,
        -- before the next statement, and a session lock that the handler
        -- does not release stays with the pooled connection and stops every
        -- append of every process. Unlocking a lock the session does not
        -- hold is only a warning.
        v_locked := true;
        PERFORM pg_advisory_lock({APPEND_LOCK_CLASS}, hashtext('{s}'));
        PERFORM pg_current_xact_id();
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO "{s}".triage_events (tx_id, stream, revision, event_id, event_type, data, metadata)
            SELECT pg_current_xact_id(), p_streams[e.a], v_first[e.a] + e.x, e.id, e.t, e.d, e.m
            FROM unnest(p_event_append, p_event_index, p_ids, p_types, p_data, p_metadata)
                WITH ORDINALITY AS e (a, x, id, t, d, m, ord)
            WHERE v_first[e.a] IS NOT NULL
            ORDER BY e.ord
            RETURNING stream, revision, position
        )
        SELECT v_first[n], w.position, v_conflict[n], v_actual[n]
        FROM generate_subscripts(p_streams, 1) AS n
        LEFT JOIN inserted AS w
            ON w.stream = p_streams[n] AND w.revision = v_first[n] + v_counts[n] - 1
        ORDER BY n;
        PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        -- Session locks survive a rollback: release it before re-raising
        -- the error unchanged (SQLSTATE and constraint name included).
        IF v_locked THEN
            PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
        END IF;
        RAISE;
    END;
END
$fn$
-- Index lookups only, whatever the statistics: PL/pgSQL keeps a plan made
-- while the table was empty (a sequential scan, cheapest then) for as long
-- as the connection lives, and it would then read the whole log per call.
SET enable_seqscan = off;
"#
    )
}

/// The fast path of `triage_append` since version 4: a batch of one append.
///
/// Its answers are the general path's for one append: an id stored already
/// means "read and decide" (NULLs, no conflict), checked first; a stream
/// elsewhere than expected is a conflict with its last revision; otherwise
/// the events are written after the stream's last revision. Duplicate ids
/// within the append reach the INSERT and fail on the unique index, as
/// there. The locks are the same, taken in the same order.
fn single_append(s: &str) -> String {
    format!(
        r#"    IF cardinality(p_streams) = 1 THEN
        DECLARE
            v_one_first bigint;
            v_one_last bigint;
        BEGIN
            PERFORM pg_advisory_xact_lock({STREAM_LOCK_CLASS}, hashtext('{s}/' || p_streams[1]));
            IF EXISTS (SELECT 1 FROM "{s}".triage_events WHERE event_id = ANY (p_ids)) THEN
                RETURN QUERY SELECT NULL::bigint, NULL::bigint, false, NULL::bigint;
                RETURN;
            END IF;
            SELECT max(revision) INTO v_current FROM "{s}".triage_events WHERE stream = p_streams[1];
            v_expected := p_expected[1];
            IF (v_expected = {EXPECT_STREAM_EXISTS} AND v_current IS NULL)
                OR (v_expected >= {EXPECT_NO_STREAM} AND v_current IS DISTINCT FROM nullif(v_expected, {EXPECT_NO_STREAM})) THEN
                RETURN QUERY SELECT NULL::bigint, NULL::bigint, true, v_current;
                RETURN;
            END IF;
            v_one_first := coalesce(v_current + 1, 0);
            BEGIN
                -- Before the lock, as in the general path below.
                v_locked := true;
                PERFORM pg_advisory_lock({APPEND_LOCK_CLASS}, hashtext('{s}'));
                PERFORM pg_current_xact_id();
                WITH inserted AS (
                    INSERT INTO "{s}".triage_events (tx_id, stream, revision, event_id, event_type, data, metadata)
                    SELECT pg_current_xact_id(), p_streams[1], v_one_first + e.x, e.id, e.t, e.d, e.m
                    FROM unnest(p_event_index, p_ids, p_types, p_data, p_metadata)
                        WITH ORDINALITY AS e (x, id, t, d, m, ord)
                    ORDER BY e.ord
                    RETURNING position
                )
                SELECT max(position) INTO v_one_last FROM inserted;
                PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
            EXCEPTION WHEN OTHERS OR query_canceled THEN
                IF v_locked THEN
                    PERFORM pg_advisory_unlock({APPEND_LOCK_CLASS}, hashtext('{s}'));
                END IF;
                RAISE;
            END;
            RETURN QUERY SELECT v_one_first, v_one_last, false, NULL::bigint;
            RETURN;
        END;
    END IF;
"#
    )
}

/// The LISTEN/NOTIFY channel of the store in `schema`. Since version 2 the
/// store itself notifies it after its appends commit (`notify.rs`).
pub(crate) fn channel(schema: &str) -> String {
    format!("triage_events_{schema}")
}

/// Checks every column the store reads; fails to prepare if one is missing.
fn probe(schema: &str) -> String {
    format!(
        r#"SELECT position, tx_id, stream, revision, event_id, event_type, data, metadata, recorded_at
           FROM "{schema}".triage_events LIMIT 0"#
    )
}

/// Whether a failure to prepare [`probe`] means the table lacks a column
/// or has one of another type: the SQLSTATEs of a missing or mistyped
/// relation or column.
fn is_shape_error(code: &SqlState) -> bool {
    [
        SqlState::UNDEFINED_COLUMN,
        SqlState::UNDEFINED_TABLE,
        SqlState::WRONG_OBJECT_TYPE,
        SqlState::DATATYPE_MISMATCH,
        SqlState::AMBIGUOUS_COLUMN,
    ]
    .contains(code)
}

/// Brings the store in the target's schema to [`LATEST_VERSION`], creating
/// it if the schema has no Triage tables.
///
/// Everything happens in one transaction holding a transaction-scoped
/// advisory lock on the schema: two processes starting at once run the
/// migrations one after the other, and the second finds them done. A store
/// from a newer Triage is refused before anything is written.
pub(crate) async fn migrate(client: &mut Client, target: &Target, create_if_missing: bool) -> Result<(), Error> {
    let schema = target.schema.as_str();
    let failed = |what: &str, error: tokio_postgres::Error| target.db_error(what, error);
    let tx = client
        .transaction()
        .await
        .map_err(|e| failed("cannot start the migration transaction", e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&MIGRATION_LOCK_CLASS, &schema],
    )
    .await
    .map_err(|e| failed("cannot take the migration lock", e))?;
    let found = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
                    to_regclass(format('%I.triage_schema', $1::text)) IS NOT NULL,
                    to_regclass(format('%I.triage_events', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(|e| failed("cannot inspect the schema", e))?;
    let (schema_exists, has_version_table, has_events): (bool, bool, bool) = (found.get(0), found.get(1), found.get(2));

    let current = if has_version_table {
        let rows = tx
            .query(&format!(r#"SELECT version FROM "{schema}".triage_schema"#), &[])
            .await
            .map_err(|e| failed("cannot read the schema version", e))?;
        match rows.as_slice() {
            [row] => row
                .try_get::<_, i32>(0)
                .map_err(|e| failed("cannot read the schema version", e))?,
            _ => {
                return Err(Error::Incompatible(format!(
                    "{} is a damaged Triage event store: triage_schema holds {} rows instead of one; nothing was modified",
                    target.describe(),
                    rows.len()
                )));
            }
        }
    } else if has_events {
        return Err(Error::Incompatible(format!(
            "{} is not a Triage event store: it has a triage_events table but no triage_schema table; nothing was modified",
            target.describe()
        )));
    } else {
        0
    };
    if current > LATEST_VERSION {
        // Dropping `tx` rolls back: the lock goes and nothing was written.
        return Err(Error::Incompatible(format!(
            "{} was written by a newer Triage (schema version {current}, this build knows up to {LATEST_VERSION}); upgrade Triage to use it; nothing was modified",
            target.describe()
        )));
    }
    if current < 1 && has_version_table {
        return Err(Error::Incompatible(format!(
            "{} is a damaged Triage event store (invalid schema version {current}); nothing was modified",
            target.describe()
        )));
    }

    if current == 0 && !create_if_missing {
        // Dropping `tx` rolls back: nothing was written.
        return Err(Error::Incompatible(format!(
            "there is no Triage event store in {}; nothing was created (opening a ticket creates one)",
            target.describe()
        )));
    }
    if current < LATEST_VERSION {
        if !schema_exists {
            // Checked first: CREATE SCHEMA IF NOT EXISTS would demand the
            // CREATE privilege on the database even for a schema that exists.
            tx.batch_execute(&format!(r#"CREATE SCHEMA "{schema}""#))
                .await
                .map_err(|e| failed("cannot create the schema", e))?;
        }
        if current == 0 {
            tx.batch_execute(&format!(
                r#"CREATE TABLE "{schema}".triage_schema (
                       only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                       version    integer NOT NULL,
                       updated_at timestamptz NOT NULL DEFAULT now()
                   );
                   INSERT INTO "{schema}".triage_schema (version) VALUES (0);"#
            ))
            .await
            .map_err(|e| failed("cannot create the schema version table", e))?;
        }
        for version in current + 1..=LATEST_VERSION {
            let sql = migration(schema, version).expect("every version up to LATEST_VERSION has a migration");
            tx.batch_execute(&sql)
                .await
                .map_err(|e| failed(&format!("cannot apply migration {version}"), e))?;
            tx.execute(
                &format!(r#"UPDATE "{schema}".triage_schema SET version = $1, updated_at = now()"#),
                &[&version],
            )
            .await
            .map_err(|e| failed("cannot record the schema version", e))?;
        }
    }
    if let Err(error) = tx.prepare(&probe(schema)).await {
        // Only an answer about the table's shape says it is damaged; a
        // lock timeout, a lost connection or a shutdown says nothing about
        // the store.
        let Some(db) = error.as_db_error().filter(|db| is_shape_error(db.code())) else {
            return Err(failed("cannot check the events table", error));
        };
        return Err(Error::Incompatible(format!(
            "{} is a damaged Triage event store: triage_events does not have the schema-{LATEST_VERSION} shape ({}); nothing was modified",
            target.describe(),
            db.message()
        )));
    }
    tx.commit()
        .await
        .map_err(|e| failed("cannot commit the migrations", e))?;
    if current < LATEST_VERSION {
        tracing::info!(store = %target.describe(), from = current, to = LATEST_VERSION, "migrated the Triage event store");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_has_a_migration() {
        for version in 1..=LATEST_VERSION {
            assert!(migration("s", version).is_some(), "migration {version} is missing");
        }
        assert!(migration("s", LATEST_VERSION + 1).is_none());
    }

    #[test]
    fn lock_classes_spell_their_names() {
        assert_eq!(&APPEND_LOCK_CLASS.to_be_bytes(), b"TRIA");
        assert_eq!(&MIGRATION_LOCK_CLASS.to_be_bytes(), b"TRIM");
        assert_eq!(&STREAM_LOCK_CLASS.to_be_bytes(), b"TRIS");
    }

    #[test]
    fn channels_fit_in_an_identifier() {
        let longest = "a".repeat(crate::options::MAX_SCHEMA_BYTES);
        assert!(channel(&longest).len() <= 63);
    }
}
