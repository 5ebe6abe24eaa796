//! Group commit: the appends of concurrent callers go to PostgreSQL
//! together, in one call of `triage_append` (one transaction), so that many
//! appends share one round trip, one pass through the append lock and one
//! WAL flush.
//!
//! A few writer tasks take turns at one queue: a writer takes whatever is
//! waiting (up to [`MAX_BATCH_APPENDS`] appends, and no more once the batch
//! holds [`MAX_BATCH_BYTES`] of payload), sends it, and answers each
//! caller. While one batch is on its way, the next one gathers, so batches
//! grow with the load and a lone append goes out at once. Each append is
//! still checked on its own against its expected revision, by
//! `triage_append` under its stream's lock: an append that does not hold
//! there is answered [`Written::Conflict`] with the stream's last revision,
//! and one with an id that is stored already [`Written::No`], after which
//! its caller reads and decides (see `PostgresEventStore::append`). An
//! append is acknowledged only after the transaction that holds it
//! committed, as without batching.
//!
//! A batch that was sent and failed as a whole (an id written meanwhile by
//! another process, a lost connection, no answer in time) answers every
//! caller [`Written::Unknown`] (one that got no connection, or that the server refused with an ERROR, which rolled it back, [`Written::No`]): each then goes the single-append way, which
//! reports its own error or, when the batch committed after all, finds its
//! events and answers with the original result.

use std::sync::Arc;

use deadpool_postgres::{Client, Pool};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::AbortHandle;
use triage_event_store::{EventData, ExpectedRevision, StreamName};

use crate::reader::{self, Sql};
use crate::{Target, schema};

/// Writers taking turns at the queue: batches in flight at once. Two, not
/// more: measured with 8 and 32 agents, four writers made batches small
/// and ran at 0.7 to 0.85 times the rate of two; one writer ran like two
/// but leaves every append waiting behind a batch that waits for a stream
/// lock held by another process's transaction.
pub(crate) const WRITERS: usize = 2;
/// Most appends in one batch. `triage_append` takes one transaction-level
/// advisory lock per stream of the batch, and those live in the server's
/// shared lock table (`max_locks_per_transaction` × `max_connections`
/// entries, 6,400 by default) with every other session's locks. At 256, a
/// dozen busy processes (two writers each) could fill it and fail other
/// sessions' transactions with "out of shared memory"; at 64 that takes
/// fifty. The benchmark's batches stay under 64 at 32 agents, so the cap
/// costs them nothing.
pub(crate) const MAX_BATCH_APPENDS: usize = 64;
/// Payload bytes after which a batch takes no more appends.
pub(crate) const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One append, as `triage_append` takes it.
#[derive(Debug)]
pub(crate) struct Append {
    pub(crate) stream: StreamName,
    /// `p_expected`; see [`expectation`].
    pub(crate) expected: Option<i64>,
    pub(crate) events: Arc<Vec<EventData>>,
}

/// What became of one append of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Written: its first revision and its last position.
    Yes { first_revision: u64, last_position: i64 },
    /// Not written: the stream is not where the append expects it (its
    /// last revision is `actual`), and none of its ids is stored.
    Conflict { actual: Option<u64> },
    /// Not written; the caller reads and decides.
    No,
    /// The batch was sent and failed as a whole, perhaps after it
    /// committed: the caller reads and decides, and if that fails too, must
    /// not say the append was not stored. (A batch that never got a
    /// connection answers `No`.)
    Unknown,
}

#[derive(Debug)]
struct Pending {
    append: Append,
    reply: oneshot::Sender<Written>,
}

/// The queue of appends and the writers that empty it.
#[derive(Debug)]
pub(crate) struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
}

/// `p_expected` of `triage_append` for an expected revision.
pub(crate) fn expectation(expected: ExpectedRevision) -> Option<i64> {
    match expected {
        ExpectedRevision::Any => None,
        ExpectedRevision::NoStream => Some(schema::EXPECT_NO_STREAM),
        ExpectedRevision::StreamExists => Some(schema::EXPECT_STREAM_EXISTS),
        ExpectedRevision::Exact(revision) => Some(reader::to_sql_int(revision)),
    }
}

impl Batcher {
    /// Starts the writers; the store aborts them when it is dropped.
    pub(crate) fn start(target: Arc<Target>, pool: Pool, sql: Arc<Sql>) -> (Self, Vec<AbortHandle>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        let writers = (0..WRITERS)
            .map(|_| {
                tokio::spawn(write_forever(
                    Arc::clone(&target),
                    pool.clone(),
                    Arc::clone(&sql),
                    Arc::clone(&receiver),
                ))
                .abort_handle()
            })
            .collect();
        (Batcher { queue }, writers)
    }

    /// Appends with the next batch. [`Written::No`] also when the writers
    /// are gone (the store is closing): the caller's own attempt then
    /// reports why.
    pub(crate) async fn append(&self, append: Append) -> Written {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Pending { append, reply }).is_err() {
            return Written::No;
        }
        answer.await.unwrap_or(Written::No)
    }
}

async fn write_forever(
    target: Arc<Target>,
    pool: Pool,
    sql: Arc<Sql>,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Pending>>>,
) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut bytes = payload(&first.append);
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_APPENDS && bytes < MAX_BATCH_BYTES {
                match receiver.try_recv() {
                    Ok(next) => {
                        bytes += payload(&next.append);
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let appends: Vec<&Append> = batch.iter().map(|pending| &pending.append).collect();
        // Not sent at all: the callers' own attempts decide, and nothing of
        // theirs can have been stored (`No`). Sent and failed: `Unknown`.
        // Whether the batch may have been stored though it failed: only
        // once sent, and not when the server answered with an ERROR (the
        // statement and its implicit transaction were rolled back). A
        // FATAL one (the session ended) may follow a commit.
        let mut outcome_unknown = false;
        let written = match pool.get().await {
            Ok(client) => {
                // Bounded: a connection that stopped answering would hold
                // this writer, and every batch behind it, for hours.
                let written = match tokio::time::timeout(target.query_timeout, write(&client, &sql, &appends)).await {
                    Ok(written) => written.map_err(|error| {
                        outcome_unknown = !rolled_back(&error);
                        target.db_error("cannot append", error)
                    }),
                    Err(_elapsed) => {
                        outcome_unknown = true;
                        Err(target.unanswered("appending a batch", true))
                    }
                };
                if written.is_err() {
                    // The connection may be dead (its session ended mid-batch)
                    // without the pool's quick check seeing it yet: back in
                    // the pool it would be handed straight to the callers'
                    // single-append fallback. A failed batch is rare, so
                    // the connection is dropped rather than judged.
                    drop(deadpool_postgres::Object::take(client));
                }
                written
            }
            Err(error) => Err(crate::pool_error(&target, error)),
        };
        let answers = match written {
            Ok(answers) => answers,
            Err(error) => {
                tracing::debug!(%error, appends = batch.len(), "a batch of appends failed; each is tried alone");
                let answer = if outcome_unknown { Written::Unknown } else { Written::No };
                vec![answer; batch.len()]
            }
        };
        for (pending, answer) in batch.into_iter().zip(answers) {
            // A caller that went away has nothing to be told.
            let _ = pending.reply.send(answer);
        }
    }
}

/// Whether the server refused the statement with an ERROR, which rolls
/// back its transaction: nothing of it was stored.
pub(crate) fn rolled_back(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| db.parsed_severity() == Some(tokio_postgres::error::Severity::Error))
}

fn payload(append: &Append) -> usize {
    append.events.iter().map(EventData::payload_len).sum()
}

/// Calls `triage_append` once for `appends`; one answer per append, in
/// order.
pub(crate) async fn write(
    client: &Client,
    sql: &Sql,
    appends: &[&Append],
) -> Result<Vec<Written>, tokio_postgres::Error> {
    let events = appends.iter().map(|append| append.events.len()).sum();
    let mut streams = Vec::with_capacity(appends.len());
    let mut expected = Vec::with_capacity(appends.len());
    let mut event_append = Vec::with_capacity(events);
    let mut event_index = Vec::with_capacity(events);
    let mut ids = Vec::with_capacity(events);
    let mut types = Vec::with_capacity(events);
    let mut data = Vec::with_capacity(events);
    let mut metadata = Vec::with_capacity(events);
    for (number, append) in (1..).zip(appends) {
        streams.push(append.stream.as_str());
        expected.push(append.expected);
        for (index, event) in (0..).zip(append.events.iter()) {
            event_append.push(number);
            event_index.push(index);
            ids.push(event.id);
            types.push(event.event_type.as_str());
            data.push(event.data.as_slice());
            metadata.push(event.metadata.as_slice());
        }
    }
    let statement = client.prepare_cached(&sql.append).await?;
    let rows = client
        .query(
            &statement,
            &[
                &streams,
                &expected,
                &event_append,
                &event_index,
                &ids,
                &types,
                &data,
                &metadata,
            ],
        )
        .await?;
    // One row per append, in order (`ORDER BY` in the function); a missing
    // row would only mean "read and decide".
    let mut answers = vec![Written::No; appends.len()];
    for (answer, row) in answers.iter_mut().zip(&rows) {
        let written = (row.try_get::<_, Option<i64>>(0)?, row.try_get::<_, Option<i64>>(1)?);
        let (conflict, actual) = (row.try_get::<_, bool>(2)?, row.try_get::<_, Option<i64>>(3)?);
        *answer = match written {
            (Some(first), Some(last_position)) => Written::Yes {
                first_revision: reader::from_sql_int(first),
                last_position,
            },
            _ if conflict => Written::Conflict {
                actual: actual.map(reader::from_sql_int),
            },
            _ => Written::No,
        };
    }
    Ok(answers)
}
