//! The port's one error type.

use uuid::Uuid;

use crate::{ExpectedRevision, StreamName};

/// A boxed driver error kept as the source of [`Error::Backend`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything an event store can answer instead of a result.
///
/// Conflicts stay typed ([`Error::WrongExpectedVersion`]) so that the command
/// handler's retry loop can tell them from failures; only driver failures are
/// boxed, in [`Error::Backend`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream's last revision did not match the expected revision.
    /// `actual` is `None` when the stream does not exist.
    #[error("wrong expected version on {stream}: expected {expected}, actual {}", actual.map_or_else(|| "no stream".to_owned(), |r| format!("revision {r}")))]
    WrongExpectedVersion {
        /// The stream appended to.
        stream: StreamName,
        /// What the writer expected.
        expected: ExpectedRevision,
        /// The stream's last revision, or `None` if it does not exist.
        actual: Option<u64>,
    },

    /// The stream has no events.
    #[error("stream {stream} not found")]
    StreamNotFound {
        /// The stream read.
        stream: StreamName,
    },

    /// A stream name failed validation.
    #[error("invalid stream name {name:?}: {reason}")]
    InvalidStreamName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },

    /// An event type was empty, too long, or held a control character
    /// (PostgreSQL cannot store U+0000 in text).
    #[error("invalid event type {event_type:?} on event {id}")]
    InvalidEventType {
        /// The event carrying it.
        id: Uuid,
        /// The rejected type.
        event_type: String,
    },

    /// An append carried no events.
    #[error("an append to {stream} must carry at least one event")]
    EmptyAppend {
        /// The stream appended to.
        stream: StreamName,
    },

    /// One event's data and metadata exceed the limit.
    #[error("event {id} is {size} bytes, more than the {max}-byte limit")]
    EventTooLarge {
        /// The event.
        id: Uuid,
        /// Its data plus metadata size.
        size: usize,
        /// The limit.
        max: usize,
    },

    /// The events of one append together exceed the limit.
    #[error("append to {stream} is {size} bytes, more than the {max}-byte limit")]
    AppendTooLarge {
        /// The stream appended to.
        stream: StreamName,
        /// The total size.
        size: usize,
        /// The limit.
        max: usize,
    },

    /// The same event id appears twice in one append.
    #[error("event id {id} appears twice in one append")]
    DuplicateEventIdInAppend {
        /// The repeated id.
        id: Uuid,
    },

    /// The store file or database is not a Triage event store, is damaged,
    /// or was written by a newer version of Triage. Nothing was modified.
    #[error("{0}")]
    Incompatible(String),

    /// The store was shut down or its writer stopped.
    #[error("the event store is closed")]
    Closed,

    /// The backend failed or did not answer; the source carries the
    /// driver's error. The operation may or may not have taken effect, and
    /// the same call (an append with the same event ids) may well succeed
    /// later.
    #[error("event store backend error: {message}")]
    Backend {
        /// What was being done.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The backend refused the operation for a reason that retrying does
    /// not change: a missing privilege, a missing table, a read-only
    /// database. Nothing was written; the store's setup must be fixed.
    #[error("the event store refused: {message}")]
    Refused {
        /// What was being done and what is wrong.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// A backend failure while doing `message`.
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A refusal that retrying does not change, while doing `message`.
    pub fn refused(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Refused {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Whether the store did not answer or failed as a whole (closed, or a
    /// backend error such as a lost connection), rather than refusing this
    /// request: the request may or may not have taken effect, and a retry
    /// (an append with the same event ids) is how to find out.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Closed | Error::Backend { .. })
    }

    /// Whether this error is an expected-revision conflict.
    pub fn is_wrong_expected_version(&self) -> bool {
        matches!(self, Error::WrongExpectedVersion { .. })
    }
}

/// The port's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
