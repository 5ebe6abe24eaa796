//! The value types of the port: stream names, revisions, positions and records.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Error;

/// Largest accepted size of one event's `data` plus `metadata`, in bytes.
///
/// KurrentDB accepts 16 MiB per event from v25.1 but only 1 MiB per append
/// request before that; Triage takes the smaller figure so that a payload
/// accepted by one backend is accepted by every backend.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Largest accepted total size of one append request, in bytes.
pub const MAX_APPEND_BYTES: usize = 1024 * 1024;

/// Largest accepted stream name, in bytes.
pub const MAX_STREAM_NAME_BYTES: usize = 255;

/// The name of a stream, such as `ticket-5f0c…`.
///
/// The category of a stream is the part before its first `-`, as in
/// EventStoreDB's `$ce-<category>` system projection.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamName(String);

impl StreamName {
    /// Validates a stream name: non-empty, at most [`MAX_STREAM_NAME_BYTES`],
    /// no control characters and not starting with `$` (reserved for system
    /// streams by EventStoreDB).
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_STREAM_NAME_BYTES {
            Some("it is longer than 255 bytes")
        } else if name.starts_with('$') {
            Some("names starting with '$' are reserved for system streams")
        } else if name.chars().any(char::is_control) {
            Some("it contains control characters")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidStreamName {
                name,
                reason: reason.to_owned(),
            }),
            None => Ok(Self(name)),
        }
    }

    /// The stream name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The category: everything before the first `-`, or the whole name.
    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or(&self.0, |(category, _)| category)
    }
}

impl TryFrom<String> for StreamName {
    type Error = Error;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<StreamName> for String {
    fn from(value: StreamName) -> Self {
        value.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What the writer believes about a stream before it appends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedRevision {
    /// Append whatever the stream holds. Idempotency is weak in this mode on
    /// EventStoreDB, so ticket streams never use it.
    Any,
    /// The stream must not exist.
    NoStream,
    /// The stream must exist.
    StreamExists,
    /// The last event of the stream must have exactly this revision.
    Exact(u64),
}

impl ExpectedRevision {
    /// Whether a stream whose last revision is `actual` satisfies this
    /// expectation.
    pub fn is_satisfied_by(self, actual: Option<u64>) -> bool {
        match self {
            ExpectedRevision::Any => true,
            ExpectedRevision::NoStream => actual.is_none(),
            ExpectedRevision::StreamExists => actual.is_some(),
            ExpectedRevision::Exact(n) => actual == Some(n),
        }
    }
}

impl fmt::Display for ExpectedRevision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedRevision::Any => f.write_str("any"),
            ExpectedRevision::NoStream => f.write_str("no stream"),
            ExpectedRevision::StreamExists => f.write_str("stream exists"),
            ExpectedRevision::Exact(n) => write!(f, "revision {n}"),
        }
    }
}

/// A place in the global log (`$all`), ordered by commit, then prepare.
///
/// Positions strictly increase in commit order. Backends with a single
/// sequence use the same number for both parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// The commit position.
    pub commit: u64,
    /// The prepare position.
    pub prepare: u64,
}

impl Position {
    /// Before every event: reading from here reads the whole log.
    pub const START: Position = Position { commit: 0, prepare: 0 };

    /// A position whose two parts are the same sequence number.
    pub const fn from_sequence(sequence: u64) -> Self {
        Position {
            commit: sequence,
            prepare: sequence,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.commit == self.prepare {
            write!(f, "{}", self.commit)
        } else {
            write!(f, "C:{}/P:{}", self.commit, self.prepare)
        }
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    /// Parses what `Display` prints, `42` or `C:1/P:2`, and `1/2`, as the
    /// HTTP API writes a position (`commit/prepare`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || format!("{s:?} is not a position (expected a number such as 42, or C:1/P:2 or 1/2)");
        let parts = match s.strip_prefix("C:") {
            Some(rest) => Some(rest.split_once("/P:").ok_or_else(invalid)?),
            None => s.split_once('/'),
        };
        if let Some((commit, prepare)) = parts {
            return Ok(Position {
                commit: commit.parse().map_err(|_| invalid())?,
                prepare: prepare.parse().map_err(|_| invalid())?,
            });
        }
        s.parse().map(Position::from_sequence).map_err(|_| invalid())
    }
}

/// An event to append: already serialized, so that backends never see the
/// domain's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventData {
    /// The event id. Appending the same ids again right after the expected
    /// revision is an idempotent no-op.
    pub id: Uuid,
    /// The event type, such as `TicketClassified`.
    pub event_type: String,
    /// The payload, usually JSON.
    pub data: Vec<u8>,
    /// The envelope metadata, usually JSON.
    pub metadata: Vec<u8>,
}

impl EventData {
    /// The size that counts against [`MAX_EVENT_BYTES`].
    pub fn payload_len(&self) -> usize {
        self.data.len() + self.metadata.len()
    }
}

/// An event as the store recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The stream it belongs to.
    pub stream: StreamName,
    /// Its revision in that stream, from 0.
    pub revision: u64,
    /// Its place in the global log.
    pub position: Position,
    /// The event id given at append time.
    pub id: Uuid,
    /// The event type given at append time.
    pub event_type: String,
    /// The payload given at append time.
    pub data: Vec<u8>,
    /// The metadata given at append time.
    pub metadata: Vec<u8>,
    /// When the store recorded it.
    pub recorded_at: SystemTime,
}

/// The result of a successful append, or of an idempotent retry of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    /// The revision of the last event written: the next `Exact` to expect.
    pub current_revision: u64,
    /// The global position of the last event written.
    pub position: Position,
    /// True when the events were already stored right after the expected
    /// revision (an idempotent retry): the result is the original one and
    /// nothing was written. A backend that cannot tell must say `true`, so
    /// that callers re-read instead of trusting their own copy.
    pub replayed: bool,
}

/// The direction of a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forwards,
    /// Newest first.
    Backwards,
}

/// Where a stream read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StreamStart {
    /// The first event (forwards) or the last event (backwards).
    #[default]
    Boundary,
    /// This revision, inclusive.
    Revision(u64),
}

/// Options of [`crate::EventStore::read_stream`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadStream {
    /// Oldest or newest first.
    pub direction: Direction,
    /// Where to start, inclusive.
    pub from: StreamStart,
    /// How many events at most.
    pub max_count: usize,
}

impl ReadStream {
    /// The whole stream, oldest first.
    pub fn forwards() -> Self {
        ReadStream {
            direction: Direction::Forwards,
            from: StreamStart::Boundary,
            max_count: usize::MAX,
        }
    }

    /// The whole stream, newest first.
    pub fn backwards() -> Self {
        ReadStream {
            direction: Direction::Backwards,
            ..Self::forwards()
        }
    }

    /// Starts at `revision`, inclusive.
    pub fn from_revision(self, revision: u64) -> Self {
        ReadStream {
            from: StreamStart::Revision(revision),
            ..self
        }
    }

    /// Reads at most `max_count` events.
    pub fn limit(self, max_count: usize) -> Self {
        ReadStream { max_count, ..self }
    }
}

/// Where a read of the global log starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AllStart {
    /// The first event (forwards) or the last event (backwards).
    #[default]
    Boundary,
    /// This position, inclusive.
    Position(Position),
}

/// Options of [`crate::EventStore::read_all`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadAll {
    /// Oldest or newest first.
    pub direction: Direction,
    /// Where to start, inclusive.
    pub from: AllStart,
    /// How many events at most.
    pub max_count: usize,
}

impl ReadAll {
    /// The global log, oldest first, at most `max_count` events.
    pub fn forwards(max_count: usize) -> Self {
        ReadAll {
            direction: Direction::Forwards,
            from: AllStart::Boundary,
            max_count,
        }
    }

    /// The global log, newest first, at most `max_count` events.
    pub fn backwards(max_count: usize) -> Self {
        ReadAll {
            direction: Direction::Backwards,
            ..Self::forwards(max_count)
        }
    }

    /// Starts at `position`, inclusive.
    pub fn from_position(self, position: Position) -> Self {
        ReadAll {
            from: AllStart::Position(position),
            ..self
        }
    }
}

/// Whether a position falls inside a read that starts at `from`.
pub(crate) fn after_start(direction: Direction, from: AllStart, position: Position) -> bool {
    match (direction, from) {
        (_, AllStart::Boundary) => true,
        (Direction::Forwards, AllStart::Position(start)) => position >= start,
        (Direction::Backwards, AllStart::Position(start)) => position <= start,
    }
}

/// Checks the limits that every backend enforces before it writes.
pub fn validate_append(stream: &StreamName, events: &[EventData]) -> Result<(), Error> {
    if events.is_empty() {
        return Err(Error::EmptyAppend { stream: stream.clone() });
    }
    let mut total = 0;
    for event in events {
        let size = event.payload_len();
        if size > MAX_EVENT_BYTES {
            return Err(Error::EventTooLarge {
                id: event.id,
                size,
                max: MAX_EVENT_BYTES,
            });
        }
        if event.event_type.is_empty()
            || event.event_type.len() > MAX_STREAM_NAME_BYTES
            || event.event_type.chars().any(char::is_control)
        {
            return Err(Error::InvalidEventType {
                id: event.id,
                event_type: event.event_type.clone(),
            });
        }
        total += size;
    }
    if total > MAX_APPEND_BYTES {
        return Err(Error::AppendTooLarge {
            stream: stream.clone(),
            size: total,
            max: MAX_APPEND_BYTES,
        });
    }
    for (index, event) in events.iter().enumerate() {
        if events[..index].iter().any(|earlier| earlier.id == event.id) {
            return Err(Error::DuplicateEventIdInAppend { id: event.id });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_validated() {
        assert!(StreamName::new("ticket-1").is_ok());
        for bad in ["", "$all", "a\nb"] {
            assert!(
                matches!(StreamName::new(bad), Err(Error::InvalidStreamName { .. })),
                "{bad:?} was accepted"
            );
        }
        assert!(StreamName::new("x".repeat(256)).is_err());
    }

    #[test]
    fn category_is_the_part_before_the_first_dash() {
        assert_eq!(StreamName::new("ticket-a-b").unwrap().category(), "ticket");
        assert_eq!(StreamName::new("plain").unwrap().category(), "plain");
    }

    #[test]
    fn expected_revision_semantics() {
        use ExpectedRevision::*;
        assert!(Any.is_satisfied_by(None) && Any.is_satisfied_by(Some(3)));
        assert!(NoStream.is_satisfied_by(None) && !NoStream.is_satisfied_by(Some(0)));
        assert!(!StreamExists.is_satisfied_by(None) && StreamExists.is_satisfied_by(Some(0)));
        assert!(Exact(2).is_satisfied_by(Some(2)) && !Exact(2).is_satisfied_by(Some(3)));
        assert!(!Exact(0).is_satisfied_by(None));
    }

    #[test]
    fn positions_order_by_commit_then_prepare() {
        let a = Position { commit: 1, prepare: 9 };
        let b = Position { commit: 2, prepare: 0 };
        assert!(a < b && Position::START < a);
        assert_eq!(Position::from_sequence(7).to_string(), "7");
        assert_eq!(a.to_string(), "C:1/P:9");
        assert_eq!("C:1/P:9".parse::<Position>().unwrap(), a);
        assert_eq!("7".parse::<Position>().unwrap(), Position::from_sequence(7));
        assert!("seven".parse::<Position>().is_err() && "C:1".parse::<Position>().is_err());
        // As the HTTP API writes it.
        assert_eq!("1/9".parse::<Position>().unwrap(), a);
        assert_eq!("8/8".parse::<Position>().unwrap(), Position::from_sequence(8));
        for bad in ["1/", "/9", "1/P:9", "C:1/9", "1/9/3"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }

    #[test]
    fn appends_are_validated() {
        let stream = StreamName::new("s-1").unwrap();
        let event = |id: u128, size: usize| EventData {
            id: Uuid::from_u128(id),
            event_type: "E".into(),
            data: vec![b'x'; size],
            metadata: vec![],
        };
        assert!(matches!(validate_append(&stream, &[]), Err(Error::EmptyAppend { .. })));
        assert!(matches!(
            validate_append(&stream, &[event(1, MAX_EVENT_BYTES + 1)]),
            Err(Error::EventTooLarge { .. })
        ));
        assert!(matches!(
            validate_append(&stream, &[event(1, 700_000), event(2, 700_000)]),
            Err(Error::AppendTooLarge { .. })
        ));
        assert!(matches!(
            validate_append(&stream, &[event(1, 1), event(1, 1)]),
            Err(Error::DuplicateEventIdInAppend { .. })
        ));
        assert!(validate_append(&stream, &[event(1, 1), event(2, 1)]).is_ok());
    }
}
