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
pub(crate) const LATEST_VERSION: i32 = 2;

/// First key of the advisory locks, "TRIA" in ASCII; the second key is the
/// hash of the schema name, so stores in different schemas never wait for
/// each other.
pub(crate) const APPEND_LOCK_CLASS: i32 = 0x5452_4941;
/// First key of the migration lock, "TRIM".
const MIGRATION_LOCK_CLASS: i32 = 0x5452_494D;

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
        _ => None,
    }
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

/// Brings the store in the target's schema to [`LATEST_VERSION`], creating
/// it if the schema has no Triage tables.
///
/// Everything happens in one transaction holding a transaction-scoped
/// advisory lock on the schema: two processes starting at once run the
/// migrations one after the other, and the second finds them done. A store
/// from a newer Triage is refused before anything is written.
pub(crate) async fn migrate(client: &mut Client, target: &Target) -> Result<(), Error> {
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
        if error.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            return Err(failed("cannot read the events table", error));
        }
        return Err(Error::Incompatible(format!(
            "{} is a damaged Triage event store: triage_events does not have the schema-{LATEST_VERSION} shape ({error}); nothing was modified",
            target.describe()
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
    }

    #[test]
    fn channels_fit_in_an_identifier() {
        let longest = "a".repeat(crate::options::MAX_SCHEMA_BYTES);
        assert!(channel(&longest).len() <= 63);
    }
}
