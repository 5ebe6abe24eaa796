//! The event-store port of Triage: EventStoreDB semantics for every backend.
//!
//! Every backend (the embedded SQLite store, PostgreSQL, KurrentDB) implements
//! the one [`EventStore`] trait and passes the one conformance suite in
//! [`testing`] (feature `testing`). The port works on serialized records
//! ([`EventData`] in, [`RecordedEvent`] out), so backends never depend on the
//! ticket domain and the suite needs no domain either.
//!
//! # Layout
//! - [`types`](crate::StreamName): stream names, [`ExpectedRevision`],
//!   [`Position`], records and read options.
//! - [`Error`]: one error enum; conflicts stay typed as
//!   [`Error::WrongExpectedVersion`] all the way to the retry loop.
//! - [`plan_append`]: the expected-revision and idempotency rules, written
//!   once and shared by every backend.
//! - [`Subscription`]: catch-up-then-live subscriptions to `$all`, with
//!   filters and checkpoints.
//! - [`InMemoryEventStore`]: the reference model for tests.
//!
//! # Semantics (mirroring EventStoreDB)
//! - The first event of a stream is revision 0.
//! - Appends are atomic; a mismatch is `WrongExpectedVersion { expected,
//!   actual }` with `actual = None` when there is no stream.
//! - Appending event ids that are already stored, in order, right after the
//!   expected revision returns the original result; a partial match fails.
//! - Reading `$all` from a position includes it; subscribing from a position
//!   starts after it.
//! - Reading a missing stream is [`Error::StreamNotFound`].

mod error;
mod idempotency;
mod memory;
mod store;
mod subscription;
mod types;
pub mod url;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::{BoxError, Error, Result};
pub use idempotency::{AppendPlan, StoredEventRef, plan_append};
pub use memory::InMemoryEventStore;
pub use store::EventStore;
pub use subscription::{EventFilter, SubscribeToAll, Subscription, SubscriptionMessage};
pub use types::{
    AllStart, AppendResult, Direction, EventData, ExpectedRevision, MAX_APPEND_BYTES, MAX_EVENT_BYTES,
    MAX_STREAM_NAME_BYTES, Position, ReadAll, ReadStream, RecordedEvent, StreamName, StreamStart, validate_append,
};
