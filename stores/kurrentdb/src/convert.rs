//! Conversions between the port's records and the client's.

use std::time::{Duration, SystemTime};

use kurrentdb::StreamState;
use serde_json::value::RawValue;
use triage_event_store::{Error, EventData, ExpectedRevision, Position, RecordedEvent, Result, StreamName};

pub(crate) fn to_client_state(expected: ExpectedRevision) -> StreamState {
    match expected {
        ExpectedRevision::Any => StreamState::Any,
        ExpectedRevision::NoStream => StreamState::NoStream,
        ExpectedRevision::StreamExists => StreamState::StreamExists,
        ExpectedRevision::Exact(revision) => StreamState::StreamRevision(revision),
    }
}

pub(crate) fn to_client_position(position: Position) -> kurrentdb::Position {
    kurrentdb::Position {
        commit: position.commit,
        prepare: position.prepare,
    }
}

pub(crate) fn from_client_position(position: kurrentdb::Position) -> Position {
    Position {
        commit: position.commit,
        prepare: position.prepare,
    }
}

/// The event as the client sends it. A payload that is exactly one JSON
/// value is marked `application/json`, so that the server's projections and
/// its web UI can read it; anything else goes as bytes. Either way the
/// bytes are unchanged.
pub(crate) fn to_client_event(event: &EventData) -> kurrentdb::EventData {
    let json = serde_json::from_slice::<&RawValue>(&event.data)
        .ok()
        .filter(|raw| raw.get().len() == event.data.len())
        .and_then(|raw| kurrentdb::EventData::json(&event.event_type, &raw).ok());
    json.unwrap_or_else(|| kurrentdb::EventData::binary(&event.event_type, event.data.clone().into()))
        .id(event.id)
        .metadata(event.metadata.clone().into())
}

/// The port's record of a server event whose stream, without the
/// namespace, is `name`.
pub(crate) fn from_client_event(name: &str, event: &kurrentdb::RecordedEvent) -> Result<RecordedEvent> {
    let stream = StreamName::new(name).map_err(|error| Error::Backend {
        message: format!("KurrentDB returned an event of stream {name:?}, which is not a valid stream name"),
        source: Some(Box::new(error)),
    })?;
    Ok(RecordedEvent {
        stream,
        revision: event.revision,
        position: from_client_position(event.position),
        id: event.id,
        event_type: event.event_type.clone(),
        data: event.data.to_vec(),
        metadata: event.custom_metadata.to_vec(),
        recorded_at: recorded_at(event),
    })
}

/// The server's `created` stamp, 100 ns ticks since the Unix epoch; the
/// client's own conversion keeps only whole seconds.
fn recorded_at(event: &kurrentdb::RecordedEvent) -> SystemTime {
    event
        .metadata
        .get("created")
        .and_then(|ticks| ticks.parse::<u64>().ok())
        .map_or_else(
            || SystemTime::from(event.created),
            |ticks| SystemTime::UNIX_EPOCH + Duration::from_nanos(ticks.saturating_mul(100)),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_json_is_marked_json() {
        let mut event = EventData {
            id: uuid::Uuid::new_v4(),
            event_type: "TicketOpened".to_owned(),
            data: br#"{"a":1}"#.to_vec(),
            metadata: vec![1, 2, 3],
        };
        let json = format!("{:?}", to_client_event(&event));
        assert!(json.contains("application/json"), "{json}");
        event.data = b" {\"a\":1}\n".to_vec();
        let padded = format!("{:?}", to_client_event(&event));
        assert!(padded.contains("application/octet-stream"), "{padded}");
        event.data = vec![0xff, 0x00];
        assert!(format!("{:?}", to_client_event(&event)).contains("application/octet-stream"));
    }
}
