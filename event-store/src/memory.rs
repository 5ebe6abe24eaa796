//! The in-memory reference store: the model every backend is checked against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::idempotency::{AppendPlan, StoredEventRef, plan_append};
use crate::subscription::{SubscribeToAll, Subscription};
use crate::types::after_start;
use crate::{AllStart, AppendResult, Direction, Error, EventData, EventStore, ExpectedRevision};
use crate::{Position, ReadAll, ReadStream, RecordedEvent, Result, StreamName, StreamStart};

/// An event store held in memory. Positions are 1, 2, 3, … in append order.
#[derive(Debug)]
pub struct InMemoryEventStore {
    inner: Mutex<Inner>,
    head: watch::Sender<Option<Position>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The global log; the event at index `i` has position `i + 1`.
    log: Vec<RecordedEvent>,
    /// Each stream's events as indexes into `log`, in revision order.
    streams: HashMap<StreamName, Vec<usize>>,
    /// Every stored event id, as an index into `log`.
    ids: HashMap<Uuid, usize>,
}

impl Default for InMemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemoryEventStore {
            inner: Mutex::new(Inner::default()),
            head: watch::Sender::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written:
        // every append validates fully before its first mutation.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> Result<AppendResult> {
        crate::validate_append(stream, &events)?;
        let mut inner = self.lock();
        let current = inner.streams.get(stream).map(|indexes| indexes.len() as u64 - 1);
        let plan = plan_append(stream, expected, current, &events, |id| {
            Ok(inner.ids.get(&id).map(|&index| {
                let event = &inner.log[index];
                StoredEventRef {
                    stream: event.stream.clone(),
                    revision: event.revision,
                    position: event.position,
                }
            }))
        })?;
        let first_revision = match plan {
            AppendPlan::AlreadyAppended(result) => return Ok(result),
            AppendPlan::Write { first_revision } => first_revision,
        };
        // Mirrors the unique index on event ids in the durable backends.
        if events.iter().any(|event| inner.ids.contains_key(&event.id)) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
        let recorded_at = SystemTime::now();
        let mut last = None;
        for (offset, event) in events.into_iter().enumerate() {
            let index = inner.log.len();
            let position = Position::from_sequence(index as u64 + 1);
            let revision = first_revision + offset as u64;
            inner.ids.insert(event.id, index);
            inner.streams.entry(stream.clone()).or_default().push(index);
            inner.log.push(RecordedEvent {
                stream: stream.clone(),
                revision,
                position,
                id: event.id,
                event_type: event.event_type,
                data: event.data,
                metadata: event.metadata,
                recorded_at,
            });
            last = Some(AppendResult {
                current_revision: revision,
                position,
                replayed: false,
            });
        }
        let result = last.expect("validated appends carry at least one event");
        // Published while still holding the lock, so that two appends cannot
        // publish their heads in the wrong order.
        self.head.send_replace(Some(result.position));
        drop(inner);
        Ok(result)
    }

    async fn read_stream(&self, stream: &StreamName, options: ReadStream) -> Result<Vec<RecordedEvent>> {
        let inner = self.lock();
        let Some(indexes) = inner.streams.get(stream) else {
            return Err(Error::StreamNotFound { stream: stream.clone() });
        };
        let events = indexes.iter().map(|&index| &inner.log[index]);
        let selected: Vec<RecordedEvent> = match (options.direction, options.from) {
            (Direction::Forwards, StreamStart::Boundary) => events.take(options.max_count).cloned().collect(),
            (Direction::Forwards, StreamStart::Revision(from)) => events
                .filter(|event| event.revision >= from)
                .take(options.max_count)
                .cloned()
                .collect(),
            (Direction::Backwards, StreamStart::Boundary) => events.rev().take(options.max_count).cloned().collect(),
            (Direction::Backwards, StreamStart::Revision(from)) => events
                .rev()
                .filter(|event| event.revision <= from)
                .take(options.max_count)
                .cloned()
                .collect(),
        };
        Ok(selected)
    }

    async fn read_event(&self, event_id: Uuid) -> Result<Option<RecordedEvent>> {
        let inner = self.lock();
        Ok(inner.ids.get(&event_id).map(|&index| inner.log[index].clone()))
    }

    async fn read_all(&self, options: ReadAll) -> Result<Vec<RecordedEvent>> {
        let inner = self.lock();
        let in_range = |event: &&RecordedEvent| after_start(options.direction, options.from, event.position);
        let page = match options.direction {
            Direction::Forwards => {
                let start = match options.from {
                    AllStart::Boundary => 0,
                    AllStart::Position(position) => inner.log.partition_point(|event| event.position < position),
                };
                inner.log[start..]
                    .iter()
                    .filter(in_range)
                    .take(options.max_count)
                    .cloned()
                    .collect()
            }
            Direction::Backwards => inner
                .log
                .iter()
                .rev()
                .filter(in_range)
                .take(options.max_count)
                .cloned()
                .collect(),
        };
        Ok(page)
    }

    async fn head_position(&self) -> Result<Option<Position>> {
        Ok(*self.head.borrow())
    }

    fn subscribe_to_all(self: Arc<Self>, options: SubscribeToAll) -> Subscription {
        let head = self.head.subscribe();
        Subscription::catch_up(self, options, head)
    }

    fn describe(&self) -> String {
        "memory://".to_owned()
    }
}
