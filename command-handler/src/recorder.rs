//! Refusal records written after their refusals are answered, several to a
//! stream in one append.
//!
//! A refusal is recorded in its ticket's `rejections-<uuid>` stream, and on
//! a busy ticket refusals come in bursts: every agent that lost the race for
//! a claim is refused at about the same moment. One append per record made
//! that burst as many appends, each a pass through the store's write path
//! (a transaction and a stream lock on PostgreSQL). Here one writer task per
//! stream takes whatever records are waiting for it, writes them as one
//! append, and repeats until none is left, so a burst costs as many appends
//! as arrive while one is in flight, usually one or two, and a lone record
//! goes out at once. Records are never held back to wait for others.
//!
//! # Invariants
//! - Every record handed over is written or its failure logged: a writer
//!   leaves the map only when it found its stream's queue empty, under the
//!   same lock that queues a record, so a record is never queued for a
//!   stream without a writer.
//! - A record keeps its permit until it is written, so all permits back
//!   means nothing in flight ([`CommandHandler::rejections_recorded`]).
//! - A record's id is derived from its command, so a retried refusal has
//!   the id of the first. On a store that enforces unique event ids, an
//!   append of several records fails as a whole (a conflict) when only
//!   some of its ids are stored already; then each record is appended on
//!   its own, where a stored one is the harmless no-op it always was. A
//!   store without that index (KurrentDB) would store the whole batch,
//!   the retried record again, so there records are appended one by one.
//! - A writer that ends without finishing (a panic in the store, its
//!   runtime shut down) takes its stream out of the map and logs the
//!   records it leaves unwritten, so that later records get a writer and
//!   their permits come back.
//!
//! [`CommandHandler::rejections_recorded`]: crate::CommandHandler::rejections_recorded

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, Span, warn};
use triage_event_store::{Error as StoreError, EventData, EventStore, ExpectedRevision, StreamName};

/// Most records in one append: refusal records are a few hundred bytes, so
/// an append stays far below any store's payload limit.
const MAX_RECORDS_PER_APPEND: usize = 64;

/// A record waiting for its stream's writer.
struct Queued {
    data: EventData,
    /// Held until the record is written.
    _slot: OwnedSemaphorePermit,
    span: Span,
}

/// The background writer of refusal records. Cheap to share.
pub(crate) struct Recorder {
    store: Arc<dyn EventStore>,
    /// The streams with a writer, and the records waiting for it.
    waiting: Mutex<HashMap<StreamName, Vec<Queued>>>,
}

impl Recorder {
    pub(crate) fn new(store: Arc<dyn EventStore>) -> Arc<Self> {
        Arc::new(Recorder {
            store,
            waiting: Mutex::new(HashMap::new()),
        })
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<StreamName, Vec<Queued>>> {
        // A panic while the map was held left it whole: every operation on
        // it is a single insert, push, take or remove.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `data` for `stream`, starting the stream's writer if it has
    /// none. Must be called within a Tokio runtime.
    pub(crate) fn record(self: &Arc<Self>, stream: StreamName, data: EventData, slot: OwnedSemaphorePermit) {
        let queued = Queued {
            data,
            _slot: slot,
            span: Span::current(),
        };
        let mut waiting = self.waiting();
        if let Some(queue) = waiting.get_mut(&stream) {
            queue.push(queued);
            return;
        }
        waiting.insert(stream.clone(), vec![queued]);
        drop(waiting);
        let recorder = Arc::clone(self);
        tokio::spawn(async move { recorder.write_stream(stream).await });
    }

    /// Writes `stream`'s records until none is waiting, then leaves.
    async fn write_stream(&self, stream: StreamName) {
        let mut unfinished = Unfinished {
            recorder: self,
            stream: &stream,
            in_flight: Vec::new(),
            done: false,
        };
        let batch_size = if self.store.enforces_unique_event_ids() {
            MAX_RECORDS_PER_APPEND
        } else {
            1
        };
        loop {
            let batch = {
                let mut waiting = self.waiting();
                let Some(queue) = waiting.get_mut(&stream) else {
                    unfinished.done = true;
                    return;
                };
                if queue.is_empty() {
                    waiting.remove(&stream);
                    unfinished.done = true;
                    return;
                }
                let take = queue.len().min(batch_size);
                queue.drain(..take).collect::<Vec<_>>()
            };
            unfinished.in_flight = batch;
            self.write(&stream, &mut unfinished.in_flight).await;
            // Written: their permits go back.
            unfinished.in_flight.clear();
        }
    }

    async fn write(&self, stream: &StreamName, batch: &mut Vec<Queued>) {
        // Two copies of one refusal (a retry refused again before the first
        // was written) are one record.
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        batch.retain(|queued| seen.insert(queued.data.id));
        if let [queued] = &batch[..] {
            append(&*self.store, stream, vec![queued.data.clone()])
                .instrument(queued.span.clone())
                .await;
            return;
        }
        let events = batch.iter().map(|queued| queued.data.clone()).collect();
        match self.store.append(stream, ExpectedRevision::Any, events).await {
            Ok(_) => {}
            // One of them is stored already: each on its own, where that is
            // a no-op.
            Err(StoreError::WrongExpectedVersion { .. }) => {
                for queued in batch.iter() {
                    append(&*self.store, stream, vec![queued.data.clone()])
                        .instrument(queued.span.clone())
                        .await;
                }
            }
            // Not a question of ids (the store is down, say): one attempt
            // each is enough, or an outage would cost each record a timeout.
            Err(error) => {
                for queued in batch.iter() {
                    queued.span.in_scope(|| warn!(%error, "could not record the rejection"));
                }
            }
        }
    }
}

/// Takes a writer's stream out of the map if the writer ends without
/// finishing (a panic, its task dropped), logging what it leaves unwritten.
struct Unfinished<'a> {
    recorder: &'a Recorder,
    stream: &'a StreamName,
    /// The batch being written. Held here so that its permits go back only
    /// after the stream left the map (fields drop after `drop`): a record
    /// queued once `rejections_recorded` returned then gets a writer.
    in_flight: Vec<Queued>,
    done: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let left = self.recorder.waiting().remove(self.stream).unwrap_or_default();
        warn!(
            stream = %self.stream,
            unwritten = left.len() + self.in_flight.len(),
            "the writer of refusal records stopped; the records it was writing and those queued are not written"
        );
    }
}

/// Appends refusal records. Best effort: their callers have their answers
/// either way.
pub(crate) async fn append(store: &dyn EventStore, stream: &StreamName, records: Vec<EventData>) {
    if let Err(error) = store.append(stream, ExpectedRevision::Any, records).await {
        warn!(%error, "could not record the rejection");
    }
}
