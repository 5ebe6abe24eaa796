//! Querying the log for analysts: filters over `$all` or one ticket,
//! streamed page by page in constant memory.

use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use triage_domain::{CommandRejected, EventMetadata, Role, TicketId};
use triage_event_store::{
    AllStart, Direction, Error as StoreError, EventStore, Position, ReadAll, ReadStream, RecordedEvent, StreamName,
};
use uuid::Uuid;

/// Which events to read. Every set field must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventQuery {
    /// Only the ticket's events and its recorded refusals.
    pub ticket: Option<TicketId>,
    /// Only this stream.
    pub stream: Option<String>,
    /// Only these event types (any of them).
    pub event_types: Vec<String>,
    /// Only events sent by this agent id.
    pub agent: Option<String>,
    /// Only events sent in this role.
    pub role: Option<Role>,
    /// Only the events of this command.
    pub command_id: Option<Uuid>,
    /// Only events of this correlation id.
    pub correlation_id: Option<Uuid>,
    /// Only events recorded at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only events at or after this position.
    pub from_position: Option<Position>,
    /// Only events at or before this position.
    pub to_position: Option<Position>,
}

/// One event as analysts get it (JSON lines and CSV have these fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    /// Its place in the global log, as text (`42`, or `C:1/P:2`).
    pub position: String,
    /// Its stream.
    pub stream: String,
    /// The ticket it belongs to, if any.
    pub ticket_id: Option<TicketId>,
    /// Its revision in its stream.
    pub revision: u64,
    /// The event id.
    pub id: Uuid,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it was decided (the envelope's time), or stored.
    pub recorded_at: DateTime<Utc>,
    /// The payload (JSON, or a string when not JSON).
    pub data: serde_json::Value,
    /// The envelope metadata (JSON, or a string when not JSON).
    pub metadata: serde_json::Value,
}

/// The ticket a stream belongs to: `ticket-<id>` or `rejections-<id>`.
pub fn ticket_of(stream: &str) -> Option<TicketId> {
    TicketId::from_stream_name(stream).or_else(|| {
        stream
            .strip_prefix(CommandRejected::CATEGORY)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|uuid| Uuid::parse_str(uuid).ok())
            .map(TicketId)
    })
}

fn json_or_text(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The time an event counts as recorded at: the envelope's decision time
/// when the metadata has one, otherwise the store's.
fn recorded_at(record: &RecordedEvent, metadata: Option<&EventMetadata>) -> DateTime<Utc> {
    metadata.map_or_else(|| DateTime::<Utc>::from(record.recorded_at), |m| m.recorded_at)
}

/// The time a record counts as recorded at, as the time filters read it:
/// its envelope's decision time, or the store's time when its metadata
/// cannot be read.
pub fn decision_time(record: &RecordedEvent) -> DateTime<Utc> {
    recorded_at(record, EventMetadata::decode(&record.metadata).ok().as_ref())
}

impl EventRow {
    /// The analyst's view of a stored record.
    pub fn from_record(record: &RecordedEvent) -> EventRow {
        let metadata = EventMetadata::decode(&record.metadata).ok();
        EventRow {
            position: record.position.to_string(),
            stream: record.stream.to_string(),
            ticket_id: ticket_of(record.stream.as_str()),
            revision: record.revision,
            id: record.id,
            event_type: record.event_type.clone(),
            recorded_at: recorded_at(record, metadata.as_ref()),
            data: json_or_text(&record.data),
            metadata: json_or_text(&record.metadata),
        }
    }
}

impl EventQuery {
    /// Whether a record passes every filter.
    pub fn matches(&self, record: &RecordedEvent) -> bool {
        if self.from_position.is_some_and(|from| record.position < from)
            || self.to_position.is_some_and(|to| record.position > to)
        {
            return false;
        }
        if let Some(stream) = &self.stream
            && record.stream.as_str() != stream
        {
            return false;
        }
        if let Some(ticket) = self.ticket
            && ticket_of(record.stream.as_str()) != Some(ticket)
        {
            return false;
        }
        if !self.event_types.is_empty() && !self.event_types.contains(&record.event_type) {
            return false;
        }
        let needs_metadata = self.agent.is_some()
            || self.role.is_some()
            || self.command_id.is_some()
            || self.correlation_id.is_some()
            || self.since.is_some()
            || self.until.is_some();
        if !needs_metadata {
            return true;
        }
        let metadata = EventMetadata::decode(&record.metadata).ok();
        let at = recorded_at(record, metadata.as_ref());
        if self.since.is_some_and(|since| at < since) || self.until.is_some_and(|until| at >= until) {
            return false;
        }
        let wants_envelope =
            self.agent.is_some() || self.role.is_some() || self.command_id.is_some() || self.correlation_id.is_some();
        if !wants_envelope {
            return true;
        }
        let Some(metadata) = metadata else {
            return false;
        };
        self.agent.as_ref().is_none_or(|agent| *agent == metadata.agent.id)
            && self.role.is_none_or(|role| role == metadata.agent.role)
            && self.command_id.is_none_or(|id| id == metadata.command_id)
            && self.correlation_id.is_none_or(|id| id == metadata.correlation_id)
    }

    /// Streams every matching record, oldest first, to `sink` until it
    /// breaks; holds one page in memory at a time. Returns the last position
    /// read, for following live.
    pub async fn scan(
        &self,
        store: &dyn EventStore,
        page_size: usize,
        mut sink: impl FnMut(&RecordedEvent) -> ControlFlow<()>,
    ) -> Result<Option<Position>, StoreError> {
        // One ticket: its two streams, merged by position.
        if let Some(ticket) = self.ticket {
            let mut records = Vec::new();
            for name in [ticket.stream_name(), CommandRejected::stream_name(ticket)] {
                match store.read_stream(&StreamName::new(name)?, ReadStream::forwards()).await {
                    Ok(stream) => records.extend(stream),
                    Err(StoreError::StreamNotFound { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            records.sort_by_key(|record| record.position);
            let mut last = None;
            for record in &records {
                last = Some(record.position);
                if self.matches(record) && sink(record).is_break() {
                    break;
                }
            }
            return Ok(last);
        }
        let mut after = self.from_position.map(|from| (from, true));
        let mut last = None;
        loop {
            let from = after.map_or(AllStart::Boundary, |(position, _)| AllStart::Position(position));
            let page = store
                .read_all(ReadAll {
                    direction: Direction::Forwards,
                    from,
                    // One more than a page: a read from the last position
                    // read returns that record again.
                    max_count: page_size.max(1) + 1,
                })
                .await?;
            let mut fresh = 0;
            for record in &page {
                // A page starts at (and includes) the last position read,
                // except for the very first page of a --from-position read.
                if let Some((position, inclusive)) = after
                    && (record.position < position || (!inclusive && record.position == position))
                {
                    continue;
                }
                if self.to_position.is_some_and(|to| record.position > to) {
                    return Ok(last);
                }
                fresh += 1;
                last = Some(record.position);
                if self.matches(record) && sink(record).is_break() {
                    return Ok(last);
                }
            }
            match last {
                Some(position) if fresh > 0 => after = Some((position, false)),
                _ => return Ok(last),
            }
        }
    }
}
