//! The writer thread: the only code that writes to the file, with group commit.
//!
//! Appends arrive over a channel. The thread blocks for one, drains whatever
//! else is queued (up to `max_batch`), and runs them all in one
//! `BEGIN IMMEDIATE` transaction with one fsync at `COMMIT`. Every append is
//! checked against the state left by the appends before it in the same
//! batch. Replies are sent only after `COMMIT` returned: an acknowledged
//! append is durable (with `synchronous=FULL`).
//!
//! A batch is first run optimistically: an append whose expected revision
//! holds is inserted at once, without looking its event ids up and without
//! a savepoint, since an event id already stored (a retry) then shows as
//! the insert's unique violation. (One whose expected revision does not
//! hold writes nothing: its lookups tell a retry from a conflict.) Only
//! when an insert fails is the whole transaction rolled back, since that
//! append's inserts must be undone alone, and the batch run again
//! carefully: each append's first event id looked up before
//! deciding (see `plan_append`), and each append that writes inside its own
//! savepoint, so an append that fails on insert is rolled back alone. Both
//! runs give every append the same answer; the optimistic one saves three
//! of the five statements per append, and the writer thread, which every
//! append goes through, spends that much less on it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::SystemTime;

use rusqlite::{Connection, ErrorCode, OptionalExtension, ffi};
use tokio::sync::{oneshot, watch};
use triage_event_store::{AppendPlan, AppendResult, Error, EventData, ExpectedRevision, Position, StoredEventRef};
use triage_event_store::{StreamName, plan_append};
use uuid::Uuid;

use crate::checkpoint::{CHECKPOINT_EVERY_EVENTS, Checkpointer};
use crate::reader::{decode_stream, to_micros};

/// One append waiting for the writer.
#[derive(Debug)]
pub(crate) struct AppendRequest {
    pub(crate) stream: StreamName,
    pub(crate) expected: ExpectedRevision,
    /// Already checked by `validate_append`.
    pub(crate) events: Vec<EventData>,
    pub(crate) reply: oneshot::Sender<triage_event_store::Result<AppendResult>>,
}

/// Counters the writer keeps; read through [`crate::SqliteEventStore::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) submitted: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) transactions: AtomicU64,
    pub(crate) events_written: AtomicU64,
    pub(crate) largest_batch: AtomicU64,
    /// Batches whose optimistic run was rolled back and run carefully.
    pub(crate) careful_reruns: AtomicU64,
}

/// A failure inside one append that ends the whole batch. Conflicts never
/// end up here; they are answers to one append.
type Fatal = rusqlite::Error;

/// Why a whole batch failed: the transaction is rolled back and every append
/// in it fails with [`Error::Backend`].
#[derive(Debug, thiserror::Error)]
enum BatchFailure {
    /// Before `COMMIT`: nothing of the batch was stored.
    #[error(transparent)]
    BeforeCommit(#[from] Fatal),
    /// `COMMIT` itself failed. Its frames may already be in the WAL (a failed
    /// fsync, say), so the batch may reappear when the file is next opened.
    #[error("COMMIT failed: {0}")]
    AtCommit(Fatal),
    /// A bug panicked while the batch ran. Caught so that one bad append
    /// fails its batch instead of killing the writer, which would refuse
    /// every later append of the process.
    #[error("the writer panicked: {0}")]
    Panicked(String),
}

impl BatchFailure {
    fn caller_message(&self) -> &'static str {
        match self {
            BatchFailure::BeforeCommit(_) | BatchFailure::Panicked(_) => {
                "the write transaction failed; nothing of this append was stored"
            }
            BatchFailure::AtCommit(_) => {
                "committing the write transaction failed; this append may or may not have been stored: read the \
                 stream, or retry it with the same event ids"
            }
        }
    }
}

/// Runs `batch_work`, turning a panic into [`BatchFailure::Panicked`].
fn catch_panic<T>(batch_work: impl FnOnce() -> Result<T, BatchFailure>) -> Result<T, BatchFailure> {
    // Unwind safety: after a panic the caller rolls the transaction back,
    // and the writer's other state is counters and channels that a half-run
    // batch leaves consistent.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(batch_work)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|message| (*message).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text panic".to_owned());
        Err(BatchFailure::Panicked(message))
    })
}

/// What one append produced inside the batch transaction.
struct Applied {
    answer: triage_event_store::Result<AppendResult>,
    /// The position of the last event written, if the append wrote any.
    written: Option<(Position, u64)>,
}

pub(crate) struct Writer {
    pub(crate) conn: Connection,
    pub(crate) checkpointer: Checkpointer,
    /// Events written since the last checkpoint request.
    pub(crate) events_since_checkpoint: u64,
    pub(crate) batch_limit: usize,
    pub(crate) head: Arc<watch::Sender<Option<Position>>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) streams: RefCell<StreamStates>,
}

/// The most streams [`StreamStates`] remembers; past that it starts over.
const REMEMBERED_STREAMS: usize = 16_384;

/// Streams' ids and current revisions as the writer's own commits left
/// them, so that an optimistic append needs no read of its stream.
///
/// Valid only while no other connection has committed: checked at the
/// start of every batch with `PRAGMA data_version`, which changes exactly
/// when another connection (another process on the file) committed, and
/// forgotten when it changed or a batch failed. Even a stale entry could
/// not corrupt the log: an insert at a revision taken already fails on the
/// `(stream_id, revision)` index, and the careful run reads every stream.
#[derive(Debug, Default)]
pub(crate) struct StreamStates {
    data_version: Option<i64>,
    committed: HashMap<StreamName, (i64, u64)>,
    /// What the open transaction wrote; committed with it.
    pending: HashMap<StreamName, (i64, u64)>,
}

impl StreamStates {
    fn get(&self, stream: &StreamName) -> Option<(i64, u64)> {
        self.pending.get(stream).or_else(|| self.committed.get(stream)).copied()
    }

    fn forget(&mut self) {
        self.data_version = None;
        self.committed.clear();
        self.pending.clear();
    }

    fn commit(&mut self) {
        if self.committed.len() + self.pending.len() > REMEMBERED_STREAMS {
            self.committed.clear();
        }
        self.committed.extend(self.pending.drain());
    }
}

impl Writer {
    /// Serves appends until every sender is gone, then closes the connection
    /// (which checkpoints the WAL into the main file).
    pub(crate) fn run(mut self, requests: Receiver<AppendRequest>) {
        let mut batch = Vec::with_capacity(self.batch_limit);
        while let Ok(first) = requests.recv() {
            batch.push(first);
            while batch.len() < self.batch_limit {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
        }
        // The writer's connection must be the last one open, so that closing
        // it removes the WAL.
        self.checkpointer.stop();
        if let Err(error) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(%error, "final WAL checkpoint failed; the next open recovers from the WAL");
        }
    }

    /// Runs `batch` in one transaction and answers every append in it.
    fn commit_batch(&mut self, batch: &mut Vec<AppendRequest>) {
        let size = batch.len() as u64;
        let outcome = catch_panic(|| self.run_batch(batch));
        // Counted before the replies go out, so that a caller holding its
        // answer sees it counted.
        self.counters.answered.fetch_add(size, Ordering::Relaxed);
        match outcome {
            Ok(applied) => {
                self.streams.get_mut().commit();
                self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                self.counters.largest_batch.fetch_max(size, Ordering::Relaxed);
                let mut head = None;
                let mut events_written = 0;
                for written in applied.iter().filter_map(|applied| applied.written) {
                    head = head.max(Some(written.0));
                    events_written += written.1;
                }
                self.counters
                    .events_written
                    .fetch_add(events_written, Ordering::Relaxed);
                self.events_since_checkpoint += events_written;
                if self.events_since_checkpoint >= CHECKPOINT_EVERY_EVENTS {
                    self.events_since_checkpoint = 0;
                    self.checkpointer.request();
                }
                // The head moves before anyone hears of the commit, so a
                // caller that subscribes after its append was acknowledged
                // sees a head at or past its own events.
                if head.is_some() {
                    self.head.send_replace(head);
                }
                for (request, applied) in batch.drain(..).zip(applied) {
                    // A caller that stopped waiting still had its append committed.
                    let _ = request.reply.send(applied.answer);
                }
            }
            Err(error) => {
                self.streams.get_mut().forget();
                if !self.conn.is_autocommit()
                    && let Err(rollback) = self.conn.execute_batch("ROLLBACK")
                {
                    tracing::error!(%rollback, "rolling back a failed batch failed");
                }
                tracing::error!(%error, appends = batch.len(), "a group commit failed; every append in it failed");
                let mut message = error.caller_message().to_owned();
                // Nothing was stored, and a retry would meet the same file.
                let refused = matches!(&error, BatchFailure::BeforeCommit(fatal) if crate::is_refusal(fatal, false));
                let damaged = matches!(&error, BatchFailure::BeforeCommit(fatal) if crate::is_damage(fatal));
                if damaged {
                    let path = std::path::PathBuf::from(self.conn.path().unwrap_or("the store file"));
                    message = crate::damage_message(&path, &message);
                }
                let error = Arc::new(error);
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(if refused || damaged {
                        Error::refused(message.clone(), Arc::clone(&error))
                    } else {
                        Error::backend(message.clone(), Arc::clone(&error))
                    }));
                }
            }
        }
    }

    fn run_batch(&mut self, batch: &[AppendRequest]) -> Result<Vec<Applied>, BatchFailure> {
        let recorded_at = to_micros(SystemTime::now());
        self.begin_batch()?;
        let optimistic: Result<Vec<Applied>, Interrupted> = batch
            .iter()
            .map(|request| self.apply_optimistically(request, recorded_at))
            .collect();
        let applied = match optimistic {
            Ok(applied) => applied,
            Err(Interrupted::Fatal(error)) => return Err(error.into()),
            Err(Interrupted::NeedsCare) => {
                // Nothing of the optimistic run may stay: its partial
                // inserts were made without savepoints.
                self.counters.careful_reruns.fetch_add(1, Ordering::Relaxed);
                self.conn.prepare_cached("ROLLBACK")?.execute([])?;
                self.begin_batch()?;
                batch
                    .iter()
                    .map(|request| self.apply(request, recorded_at))
                    .collect::<Result<Vec<Applied>, Fatal>>()?
            }
        };
        self.conn
            .prepare_cached("COMMIT")
            .and_then(|mut commit| commit.execute([]))
            .map_err(BatchFailure::AtCommit)?;
        Ok(applied)
    }

    /// Opens the batch transaction, and forgets the remembered streams if
    /// another connection committed since this writer last looked.
    fn begin_batch(&self) -> Result<(), Fatal> {
        // BEGIN IMMEDIATE takes SQLite's single write lock now, so that no
        // other connection (another process on the same file) can commit
        // between our reads of current revisions and our inserts.
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let data_version: i64 = self
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |row| row.get(0))?;
        let mut streams = self.streams.borrow_mut();
        if streams.data_version != Some(data_version) {
            streams.forget();
            streams.data_version = Some(data_version);
        }
        streams.pending.clear();
        Ok(())
    }

    /// The stream's id and current revision, if it exists, as this
    /// writer's own commits and this transaction left it, or else read.
    fn remembered_stream_state(&self, stream: &StreamName) -> Result<Option<(i64, Option<u64>)>, Fatal> {
        if let Some((stream_id, revision)) = self.streams.borrow().get(stream) {
            return Ok(Some((stream_id, Some(revision))));
        }
        let state = self.stream_state(stream)?;
        // Not written in this transaction (else it were pending), so this
        // is committed state, which only this writer changes now.
        if let Some((stream_id, Some(revision))) = state {
            self.streams
                .borrow_mut()
                .committed
                .insert(stream.clone(), (stream_id, revision));
        }
        Ok(state)
    }

    /// The stream's id and current revision, if it exists: read.
    fn stream_state(&self, stream: &StreamName) -> Result<Option<(i64, Option<u64>)>, Fatal> {
        self.conn
            .prepare_cached(
                "SELECT stream_id, (SELECT max(revision) FROM events WHERE events.stream_id = streams.stream_id) \
                 FROM streams WHERE name = ?1",
            )?
            .query_row([stream.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()
    }

    /// Decides and writes one append without looking its event ids up and
    /// without a savepoint: answers it when its expected revision holds
    /// and its inserts succeed, and otherwise asks for the careful run,
    /// which gives the answer [`Writer::apply`] gives.
    fn apply_optimistically(&self, request: &AppendRequest, recorded_at: i64) -> Result<Applied, Interrupted> {
        let AppendRequest {
            stream,
            expected,
            events,
            ..
        } = request;
        let existing = self.remembered_stream_state(stream)?;
        let current = existing.and_then(|(_, revision)| revision);
        // Whether the expected revision holds, as `plan_append` decides it
        // when none of the event ids is stored. When it does not hold, the
        // append is a conflict or a retry of one stored already (answered
        // with the original), which the lookups tell apart; either way
        // nothing is written.
        if !expected.is_satisfied_by(current) {
            return match self.plan(request, current)? {
                Err(conflict) => Ok(Applied::answer(Err(conflict))),
                Ok(AppendPlan::AlreadyAppended(original)) => Ok(Applied::answer(Ok(original))),
                // Not reached: with the expected revision not holding,
                // `plan_append` writes nothing.
                Ok(AppendPlan::Write { .. }) => Err(Interrupted::NeedsCare),
            };
        }
        let first_revision = current.map_or(0, |revision| revision + 1);
        let stream_id = existing.map(|(stream_id, _)| stream_id);
        match self.insert(stream, stream_id, first_revision, events, recorded_at) {
            Ok(written) => Ok(self.wrote(stream, written, events.len())),
            // An event id stored already: a retry, or a conflict, which
            // the careful run tells apart.
            Err(error) if is_unique_violation(&error) => Err(Interrupted::NeedsCare),
            Err(error) => Err(Interrupted::Fatal(error)),
        }
    }

    /// `plan_append` for `request` on a stream at `current`, looking event
    /// ids up in the store.
    fn plan(
        &self,
        request: &AppendRequest,
        current: Option<u64>,
    ) -> Result<triage_event_store::Result<AppendPlan>, Fatal> {
        let mut fatal = None;
        let plan = plan_append(&request.stream, request.expected, current, &request.events, |id| {
            self.lookup(id).map_err(|error| {
                let message = error.to_string();
                fatal = Some(error);
                Error::backend("looking up an event id", message)
            })
        });
        match fatal {
            Some(error) => Err(error),
            None => Ok(plan),
        }
    }

    /// Decides and writes one append inside the batch transaction: looks
    /// its first event id up, and writes inside a savepoint.
    fn apply(&self, request: &AppendRequest, recorded_at: i64) -> Result<Applied, Fatal> {
        let AppendRequest {
            stream,
            expected,
            events,
            ..
        } = request;
        let existing = self.stream_state(stream)?;
        let current = existing.and_then(|(_, revision)| revision);
        let first_revision = match self.plan(request, current)? {
            Err(conflict) => return Ok(Applied::answer(Err(conflict))),
            Ok(AppendPlan::AlreadyAppended(original)) => return Ok(Applied::answer(Ok(original))),
            Ok(AppendPlan::Write { first_revision }) => first_revision,
        };

        self.conn.prepare_cached("SAVEPOINT append")?.execute([])?;
        let stream_id = existing.map(|(stream_id, _)| stream_id);
        match self.insert(stream, stream_id, first_revision, events, recorded_at) {
            Ok(written) => {
                self.conn.prepare_cached("RELEASE append")?.execute([])?;
                Ok(self.wrote(stream, written, events.len()))
            }
            Err(error) => {
                // Undo this append's inserts only; the batch goes on. If even
                // that fails, the transaction is lost and the batch with it.
                let undo = self
                    .conn
                    .prepare_cached("ROLLBACK TO append")
                    .and_then(|mut rollback| rollback.execute([]))
                    .and_then(|_| self.conn.prepare_cached("RELEASE append")?.execute([]));
                if undo.is_err() {
                    return Err(error);
                }
                if is_unique_violation(&error) {
                    // A later event id of this append is already stored (the
                    // first one was checked by plan_append): a conflict.
                    Ok(Applied::answer(Err(Error::WrongExpectedVersion {
                        stream: stream.clone(),
                        expected: *expected,
                        actual: current,
                    })))
                } else {
                    Err(error)
                }
            }
        }
    }

    fn insert(
        &self,
        stream: &StreamName,
        stream_id: Option<i64>,
        first_revision: u64,
        events: &[EventData],
        recorded_at: i64,
    ) -> rusqlite::Result<Written> {
        // A new stream's row is created inside the append's savepoint, so a
        // failed first append leaves no empty stream behind.
        let stream_id = match stream_id {
            Some(stream_id) => stream_id,
            None => {
                self.conn
                    .prepare_cached("INSERT INTO streams (name) VALUES (?1)")?
                    .execute([stream.as_str()])?;
                self.conn.last_insert_rowid()
            }
        };
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO events (stream_id, revision, event_id, event_type, data, metadata, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut last = None;
        for (offset, event) in events.iter().enumerate() {
            let revision = first_revision + offset as u64;
            insert.execute((
                stream_id,
                revision,
                event.id.as_bytes().as_slice(),
                event.event_type.as_str(),
                event.data.as_slice(),
                event.metadata.as_slice(),
                recorded_at,
            ))?;
            // Invariant: positions are rowids, assigned as max(rowid) + 1
            // while this connection holds the only write lock (BEGIN
            // IMMEDIATE; WAL admits one writer). Rowids therefore increase in
            // commit order, and a reader whose snapshot holds position p holds
            // every position below p: subscribers that read forward from
            // their last position never skip an event.
            let position = Position::from_sequence(self.conn.last_insert_rowid() as u64);
            last = Some(AppendResult {
                current_revision: revision,
                position,
                replayed: false,
            });
        }
        // validate_append guarantees at least one event.
        let result = last.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
        Ok(Written { stream_id, result })
    }

    /// Answers an append whose inserts succeeded (and are kept), and
    /// remembers its stream's new revision with the transaction.
    fn wrote(&self, stream: &StreamName, written: Written, events: usize) -> Applied {
        let Written { stream_id, result } = written;
        self.streams
            .borrow_mut()
            .pending
            .insert(stream.clone(), (stream_id, result.current_revision));
        Applied {
            answer: Ok(result),
            written: Some((result.position, events as u64)),
        }
    }

    fn lookup(&self, id: Uuid) -> rusqlite::Result<Option<StoredEventRef>> {
        self.conn
            .prepare_cached(
                "SELECT s.name, e.revision, e.position FROM events e JOIN streams s ON s.stream_id = e.stream_id \
                 WHERE e.event_id = ?1",
            )?
            .query_row([id.as_bytes().as_slice()], |row| {
                Ok(StoredEventRef {
                    stream: decode_stream(row.get(0)?, 0)?,
                    revision: row.get(1)?,
                    position: Position::from_sequence(row.get(2)?),
                })
            })
            .optional()
    }
}

/// What one append's inserts did.
#[derive(Clone, Copy, Debug)]
struct Written {
    stream_id: i64,
    result: AppendResult,
}

/// Why deciding a batch stopped before `COMMIT`.
#[derive(Debug)]
enum Interrupted {
    /// The whole batch fails.
    Fatal(Fatal),
    /// The optimistic run met an append it cannot answer: roll back and
    /// run the batch carefully.
    NeedsCare,
}

impl From<Fatal> for Interrupted {
    fn from(error: Fatal) -> Self {
        Interrupted::Fatal(error)
    }
}

impl Applied {
    fn answer(answer: triage_event_store::Result<AppendResult>) -> Self {
        Applied { answer, written: None }
    }
}

/// A duplicate `event_id` or `(stream, revision)`, told by SQLite's typed
/// result codes, never by its message text.
fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.code == ErrorCode::ConstraintViolation
                && matches!(failure.extended_code, ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_batch_becomes_a_failure_the_writer_survives() {
        let failure = catch_panic::<()>(|| panic!("bad append")).unwrap_err();
        assert!(
            matches!(&failure, BatchFailure::Panicked(message) if message == "bad append"),
            "{failure:?}"
        );
        assert_eq!(
            failure.caller_message(),
            "the write transaction failed; nothing of this append was stored"
        );
        let owned = catch_panic::<()>(|| panic!("{} appends", 3)).unwrap_err();
        assert!(
            matches!(&owned, BatchFailure::Panicked(message) if message == "3 appends"),
            "{owned:?}"
        );
        assert_eq!(catch_panic(|| Ok(7)).unwrap(), 7);
    }

    #[test]
    fn only_a_failed_commit_leaves_the_outcome_open() {
        let busy = || rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_BUSY), None);
        assert!(
            BatchFailure::AtCommit(busy())
                .caller_message()
                .contains("may or may not")
        );
        assert!(
            !BatchFailure::BeforeCommit(busy())
                .caller_message()
                .contains("may or may not")
        );
    }
}
