//! The port itself: the [`EventStore`] trait.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::subscription::{SubscribeToAll, Subscription};
use crate::{AppendResult, EventData, ExpectedRevision, Position, ReadAll, ReadStream};
use crate::{RecordedEvent, Result, StreamName};

/// An append-only event store with EventStoreDB semantics.
///
/// One trait rather than separate read, append and subscribe traits, because
/// the CLI picks a backend by URL at run time and holds it as one
/// `Arc<dyn EventStore>`.
#[async_trait]
pub trait EventStore: Send + Sync + std::fmt::Debug + 'static {
    /// Appends `events` atomically to `stream` if the stream's last revision
    /// satisfies `expected`.
    ///
    /// Errors: [`crate::Error::WrongExpectedVersion`] on a mismatch, or when
    /// only some of the event ids are already stored right after `expected`.
    /// When all of them are, the original result is returned and nothing is
    /// written.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> Result<AppendResult>;

    /// Reads one stream. A stream with no events is
    /// [`crate::Error::StreamNotFound`], never an empty list.
    async fn read_stream(&self, stream: &StreamName, options: ReadStream) -> Result<Vec<RecordedEvent>>;

    /// Reads a page of the global log. The start position is included.
    async fn read_all(&self, options: ReadAll) -> Result<Vec<RecordedEvent>>;

    /// The position of the last event in the global log, if there is one.
    async fn head_position(&self) -> Result<Option<Position>>;

    /// Catches up from `options.from` (exclusive) and then stays live.
    ///
    /// Backends without a native subscription return
    /// [`Subscription::catch_up`] over their reads and head notifications.
    fn subscribe_to_all(self: Arc<Self>, options: SubscribeToAll) -> Subscription;

    /// The event with `event_id`, wherever it is stored; `Ok(None)` when
    /// none is. Stores that index event ids across streams
    /// ([`EventStore::enforces_unique_event_ids`]) answer from that index;
    /// KurrentDB, which keeps no such index, always answers `Ok(None)`, and
    /// callers fall back to what they have (a read model, say). The command
    /// handler derives event ids from command ids ([`crate::EventData`]
    /// ids are deterministic), so this finds the stream a command went to.
    async fn read_event(&self, event_id: Uuid) -> Result<Option<RecordedEvent>>;

    /// A short description of the backend for logs and `--help` output,
    /// such as `sqlite:///tmp/triage.db`.
    fn describe(&self) -> String;

    /// Whether an event id stored in one stream is refused in every other
    /// stream (a conflict). True for the embedded and SQL backends; false for
    /// KurrentDB, whose idempotency is per stream. The command handler's
    /// "command id reused on another ticket" answer relies on it; without it
    /// such a command is simply applied to the other ticket.
    fn enforces_unique_event_ids(&self) -> bool {
        true
    }

    /// Whether the store takes writes now, as far as it can tell without
    /// writing: a PostgreSQL standby, a database or role whose sessions
    /// are read-only, or a role without the privilege to append, does not.
    /// For readiness probes; an append is still what decides.
    async fn accepts_writes(&self) -> Result<bool> {
        Ok(true)
    }
}
