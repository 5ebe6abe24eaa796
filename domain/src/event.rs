//! Events: what happened, in the past tense, with explicit schema versions.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Agent, Claim, Priority, TicketId};

/// Something that happened to a ticket.
///
/// Serialized as JSON with a `type` tag equal to [`Event::event_type`]. Each
/// type has a schema version ([`Event::schema_version`]) stored in the
/// envelope metadata; [`Event::decode`] upcasts older versions on read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// A ticket was opened.
    TicketOpened {
        /// The ticket.
        ticket_id: TicketId,
        /// The subject line.
        subject: String,
        /// The customer's message.
        body: String,
        /// Who wrote in, if known.
        #[serde(default)]
        customer: Option<String>,
    },
    /// A classifier claimed the ticket.
    ClassificationStarted {
        /// The new claim.
        claim: Claim,
    },
    /// The ticket was classified.
    TicketClassified {
        /// The completed claim.
        claim_id: Uuid,
        /// One of the configured categories.
        category: String,
        /// How urgent.
        priority: Priority,
        /// Confidence in [0, 1].
        confidence: f64,
    },
    /// A drafter claimed the ticket.
    DraftingStarted {
        /// The new claim.
        claim: Claim,
    },
    /// A draft reply was submitted.
    DraftSubmitted {
        /// The completed claim.
        claim_id: Uuid,
        /// The draft reply.
        body: String,
    },
    /// An escalator claimed the draft for review.
    EscalationStarted {
        /// The new claim.
        claim: Claim,
    },
    /// The draft was sent back for another draft.
    DraftRejected {
        /// The review claim, if one was held.
        #[serde(default)]
        claim_id: Option<Uuid>,
        /// Why.
        reason: String,
    },
    /// The ticket was handed to a human operator.
    EscalatedToHuman {
        /// The review claim, if the escalator handed it over.
        #[serde(default)]
        claim_id: Option<Uuid>,
        /// Why.
        reason: String,
    },
    /// The ticket was closed.
    TicketResolved {
        /// The completed claim, if an escalator resolved it.
        #[serde(default)]
        claim_id: Option<Uuid>,
        /// What was done.
        resolution: String,
    },
    /// A claim was given back; the attempt failed.
    ClaimReleased {
        /// The claim.
        claim_id: Uuid,
        /// Why.
        reason: String,
        /// Failed attempts at this stage so far, including this one.
        attempts: u32,
    },
    /// A claim's lease ran out; the attempt failed.
    ClaimExpired {
        /// The claim.
        claim_id: Uuid,
        /// When its lease ran out.
        #[serde(deserialize_with = "crate::timestamp::deserialize")]
        lease_expired_at: DateTime<Utc>,
        /// Failed attempts at this stage so far, including this one.
        attempts: u32,
    },
    /// A claim's lease was extended.
    LeaseExtended {
        /// The claim.
        claim_id: Uuid,
        /// The new expiry.
        #[serde(deserialize_with = "crate::timestamp::deserialize")]
        lease_expires_at: DateTime<Utc>,
    },
    /// An operator replaced the current claim with their own.
    ClaimTakenOver {
        /// The replaced claim.
        previous_claim_id: Uuid,
        /// The new claim.
        claim: Claim,
    },
}

/// Why stored event data could not be turned back into an [`Event`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The event type is not one this build knows (written by a newer one).
    #[error("unknown event type {event_type:?}")]
    UnknownType {
        /// The stored type.
        event_type: String,
    },
    /// The schema version is newer than this build reads.
    #[error("{event_type} schema version {version} is newer than this build reads (up to {supported})")]
    NewerVersion {
        /// The stored type.
        event_type: String,
        /// The stored version.
        version: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// The payload is not valid for its type and version.
    #[error("invalid {event_type} payload: {source}")]
    Payload {
        /// The stored type.
        event_type: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The schema version is 0: versions start at 1, so the metadata is
    /// damaged, and no upcast can be chosen for it.
    #[error("{event_type} schema version 0 does not exist (versions start at 1)")]
    VersionZero {
        /// The stored type.
        event_type: String,
    },
    /// The payload's `type` tag disagrees with the stored event type.
    #[error("payload tagged {tagged:?} stored as {stored:?}")]
    TypeMismatch {
        /// The type the store recorded.
        stored: String,
        /// The type inside the payload.
        tagged: String,
    },
}

impl Event {
    /// Every event type name.
    pub const TYPES: [&'static str; 13] = [
        "TicketOpened",
        "ClassificationStarted",
        "TicketClassified",
        "DraftingStarted",
        "DraftSubmitted",
        "EscalationStarted",
        "DraftRejected",
        "EscalatedToHuman",
        "TicketResolved",
        "ClaimReleased",
        "ClaimExpired",
        "LeaseExtended",
        "ClaimTakenOver",
    ];

    /// The stored event type.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::TicketOpened { .. } => "TicketOpened",
            Event::ClassificationStarted { .. } => "ClassificationStarted",
            Event::TicketClassified { .. } => "TicketClassified",
            Event::DraftingStarted { .. } => "DraftingStarted",
            Event::DraftSubmitted { .. } => "DraftSubmitted",
            Event::EscalationStarted { .. } => "EscalationStarted",
            Event::DraftRejected { .. } => "DraftRejected",
            Event::EscalatedToHuman { .. } => "EscalatedToHuman",
            Event::TicketResolved { .. } => "TicketResolved",
            Event::ClaimReleased { .. } => "ClaimReleased",
            Event::ClaimExpired { .. } => "ClaimExpired",
            Event::LeaseExtended { .. } => "LeaseExtended",
            Event::ClaimTakenOver { .. } => "ClaimTakenOver",
        }
    }

    /// The claim this event hands out, if it starts one: a stage's claim,
    /// or an operator's take-over.
    pub fn new_claim(&self) -> Option<&Claim> {
        match self {
            Event::ClassificationStarted { claim }
            | Event::DraftingStarted { claim }
            | Event::EscalationStarted { claim }
            | Event::ClaimTakenOver { claim, .. } => Some(claim),
            _ => None,
        }
    }

    /// The current schema version of this event's type.
    ///
    /// When a type's payload changes, bump its version here, add the upcast
    /// from the old version in [`Event::decode`], and keep a golden file of
    /// the old version under `domain/tests/golden/`.
    pub fn schema_version(&self) -> u16 {
        current_schema_version(self.event_type()).unwrap_or(1)
    }

    /// The JSON payload.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events always serialize")
    }

    /// Reads a stored payload of `event_type` at `schema_version`,
    /// upcasting older versions.
    pub fn decode(event_type: &str, schema_version: u16, data: &[u8]) -> Result<Event, DecodeError> {
        let supported = current_schema_version(event_type).ok_or_else(|| DecodeError::UnknownType {
            event_type: event_type.to_owned(),
        })?;
        if schema_version == 0 {
            return Err(DecodeError::VersionZero {
                event_type: event_type.to_owned(),
            });
        }
        if schema_version > supported {
            return Err(DecodeError::NewerVersion {
                event_type: event_type.to_owned(),
                version: schema_version,
                supported,
            });
        }
        // Upcasts go here, oldest first, as `match (event_type, version)` arms
        // that rewrite a `serde_json::Value`. Every type is at version 1 so far.
        let payload = |source| DecodeError::Payload {
            event_type: event_type.to_owned(),
            source,
        };
        let Ok(json) = std::str::from_utf8(data) else {
            // Not UTF-8: `from_slice` says where.
            let error = serde_json::from_slice::<serde::de::IgnoredAny>(data)
                .err()
                .unwrap_or_else(|| serde::de::Error::custom("the payload is not UTF-8"));
            return Err(payload(error));
        };
        crate::by_type::decode(event_type, json).map_err(|failure| match failure {
            crate::by_type::Failure::Payload(source) => payload(source),
            crate::by_type::Failure::Tagged(tagged) => DecodeError::TypeMismatch {
                stored: event_type.to_owned(),
                tagged,
            },
        })
    }
}

fn current_schema_version(event_type: &str) -> Option<u16> {
    Event::TYPES.contains(&event_type).then_some(1)
}

/// A command the handler refused, kept for analysts and statistics in the
/// ticket's `rejections-<uuid>` stream. Never in the ticket stream itself:
/// a refused command changes nothing, and the ticket stream stays a path
/// through the transition table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandRejected {
    /// The ticket the command was for.
    pub ticket_id: TicketId,
    /// What was asked.
    pub command: crate::CommandKind,
    /// The stable code of the reason, such as `stale_claim` or
    /// `stale_revision`.
    pub code: String,
    /// The reason in words.
    pub reason: String,
    /// The ticket's state when it was refused.
    pub state: Option<crate::State>,
    /// The ticket's revision when it was refused.
    pub revision: Option<u64>,
}

impl CommandRejected {
    /// The stored event type.
    pub const EVENT_TYPE: &'static str = "CommandRejected";
    /// The current schema version.
    pub const SCHEMA_VERSION: u16 = 1;
    /// The stream category of rejection records.
    pub const CATEGORY: &'static str = "rejections";

    /// The rejection stream of a ticket.
    pub fn stream_name(ticket_id: TicketId) -> String {
        format!("{}-{}", Self::CATEGORY, ticket_id.0)
    }

    /// The record's id: derived from the command id and the ticket, so a
    /// retried refusal is stored once, and a command refused on several
    /// tickets (a keyed work claim tries one after another under its one
    /// id) is recorded on each: event ids are unique across streams, and
    /// the same id in a second stream was refused as a conflict.
    pub fn record_id(command_id: Uuid, ticket_id: TicketId) -> Uuid {
        let name = format!("rejected on {}", ticket_id.0);
        Uuid::new_v5(&command_id, name.as_bytes())
    }

    /// The JSON payload.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("rejection records always serialize")
    }

    /// Reads a stored payload.
    pub fn decode(schema_version: u16, data: &[u8]) -> Result<Self, DecodeError> {
        if schema_version == 0 {
            return Err(DecodeError::VersionZero {
                event_type: Self::EVENT_TYPE.to_owned(),
            });
        }
        if schema_version > Self::SCHEMA_VERSION {
            return Err(DecodeError::NewerVersion {
                event_type: Self::EVENT_TYPE.to_owned(),
                version: schema_version,
                supported: Self::SCHEMA_VERSION,
            });
        }
        from_json(data).map_err(|source| DecodeError::Payload {
            event_type: Self::EVENT_TYPE.to_owned(),
            source,
        })
    }
}

/// Decodes a stored ticket event and its metadata, upcasting old versions.
pub fn decode_stored(event_type: &str, data: &[u8], metadata: &[u8]) -> Result<(Event, EventMetadata), DecodeError> {
    let metadata = EventMetadata::decode(metadata).map_err(|source| DecodeError::Payload {
        event_type: format!("{event_type} metadata"),
        source,
    })?;
    let event = Event::decode(event_type, metadata.schema_version, data)?;
    Ok((event, metadata))
}

/// [`decode_stored`] for read models: the event and its [`EventHeader`],
/// the few parts of the metadata a projection uses. A rebuild decodes
/// every event of the log; the whole metadata's ids and trace context,
/// which no read model keeps, were a sixth of its decoding work.
pub fn decode_stored_header(
    event_type: &str,
    data: &[u8],
    metadata: &[u8],
) -> Result<(Event, EventHeader), DecodeError> {
    let header = EventHeader::decode(metadata).map_err(|source| DecodeError::Payload {
        event_type: format!("{event_type} metadata"),
        source,
    })?;
    let event = Event::decode(event_type, header.schema_version, data)?;
    Ok((event, header))
}

/// The namespace of deterministic event ids.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_0b7e_2a44_4e0b_9d7c_1a52_7e3f_9b21);

/// The id of the `index`-th event produced by a command, derived from the
/// command id and the index alone, so that a retried command produces
/// identical events and the store's idempotent append makes the retry a
/// no-op.
///
/// - A time-ordered (UUIDv7) command id, what Triage's own clients send,
///   gives a UUIDv8 that keeps the command's 48-bit millisecond timestamp
///   in front and fills the other 74 bits from the UUIDv5 of the command
///   id and the index. Event ids then arrive in about the order they are
///   stored, so a store's unique index of event ids takes each new one at
///   its right edge: with random ids every event dirtied a leaf page of
///   its own somewhere in the index, and in SQLite that was most of the
///   pages each group commit wrote.
/// - Any other command id gives the UUIDv5 of the command id and the index
///   (what every event id was before), so a command sent with a random id
///   keeps the event ids it always had, and a retry of it is recognised.
///   A UUIDv7 command's events stored before carry that UUIDv5 too:
///   [`former_event_id`] gives it.
pub fn event_id(command_id: Uuid, index: u32) -> Uuid {
    let hashed = hashed_event_id(command_id, index);
    if command_id.get_version() != Some(uuid::Version::SortRand) {
        return hashed;
    }
    let mut bytes = *hashed.as_bytes();
    bytes[..6].copy_from_slice(&command_id.as_bytes()[..6]);
    // Sets the version (8) and variant bits over the hash's.
    Uuid::new_v8(bytes)
}

/// The id earlier builds gave the `index`-th event of a command, where it
/// differs from [`event_id`]'s: for a UUIDv7 command id, whose events were
/// stored with the UUIDv5 before event ids were time-ordered. Whatever
/// looks a command's stored events up by their ids (the retry of a
/// command sent before an upgrade and retried after it) looks for this
/// one too.
pub fn former_event_id(command_id: Uuid, index: u32) -> Option<Uuid> {
    let former = hashed_event_id(command_id, index);
    (former != event_id(command_id, index)).then_some(former)
}

/// The UUIDv5 of the command id and the index.
fn hashed_event_id(command_id: Uuid, index: u32) -> Uuid {
    let mut name = [0u8; 20];
    name[..16].copy_from_slice(command_id.as_bytes());
    name[16..].copy_from_slice(&index.to_be_bytes());
    Uuid::new_v5(&EVENT_ID_NAMESPACE, &name)
}

/// The envelope metadata stored with every event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The payload's schema version.
    pub schema_version: u16,
    /// The command that produced the event.
    pub command_id: Uuid,
    /// The workflow it belongs to (the command id when none was given).
    pub correlation_id: Uuid,
    /// What caused the command (the command id when none was given).
    pub causation_id: Uuid,
    /// Who sent the command.
    pub agent: Agent,
    /// The W3C `traceparent` of the sender's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// When the command handler decided the command.
    #[serde(deserialize_with = "crate::timestamp::deserialize")]
    pub recorded_at: DateTime<Utc>,
    /// The stream revision the command was decided on (`None` for a new
    /// stream): what the writer had seen, so that an auditor can prove from
    /// the log alone that no write overwrote one it never saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_revision: Option<u64>,
    /// The revision the sender said it decided on (the command's
    /// `at_revision`), when it said. The handler appends only when this is
    /// the revision it decided on too; recorded so that an auditor need not
    /// take the handler's word for that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_saw_revision: Option<u64>,
    /// A digest of the command and its sender (see
    /// `triage_command_handler::command_digest`): a retry of the command is
    /// recognised by it whatever the policy says by the time it comes.
    /// `None` in events written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_digest: Option<Uuid>,
}

impl EventMetadata {
    /// The JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("metadata always serializes")
    }

    /// Reads stored metadata.
    pub fn decode(data: &[u8]) -> Result<Self, serde_json::Error> {
        from_json(data)
    }
}

/// The parts of an event's [`EventMetadata`] that read models use, read
/// from the same stored JSON. The other fields are checked as
/// [`EventMetadata::decode`] checks them (present where required, ids that
/// are UUIDs, numbers that are numbers) but not kept: metadata that one
/// refuses, the other refuses too, so a damaged event stops a rebuild as it
/// stops the command handler, instead of being applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// The payload's schema version.
    pub schema_version: u16,
    /// Who sent the command.
    pub agent: Agent,
    /// When the command handler decided the command.
    pub recorded_at: DateTime<Utc>,
}

impl EventHeader {
    /// Reads it from stored metadata.
    pub fn decode(metadata: &[u8]) -> Result<Self, serde_json::Error> {
        let stored: StoredHeader = from_json(metadata)?;
        Ok(EventHeader {
            schema_version: stored.schema_version,
            agent: stored.agent,
            recorded_at: stored.recorded_at,
        })
    }
}

/// [`EventMetadata`]'s fields as stored, the ones [`EventHeader`] does not
/// keep read into values that allocate nothing (a UUID is 16 bytes; the
/// trace context is checked to be a string and dropped). Must list every
/// field of [`EventMetadata`] with the same requirements; a test compares
/// the two on damaged metadata.
#[derive(Deserialize)]
struct StoredHeader {
    schema_version: u16,
    #[serde(rename = "command_id")]
    _command_id: Uuid,
    #[serde(rename = "correlation_id")]
    _correlation_id: Uuid,
    #[serde(rename = "causation_id")]
    _causation_id: Uuid,
    agent: Agent,
    #[serde(rename = "traceparent", default)]
    _traceparent: Option<AnyString>,
    #[serde(deserialize_with = "crate::timestamp::deserialize")]
    recorded_at: DateTime<Utc>,
    #[serde(rename = "decided_at_revision", default)]
    _decided_at_revision: Option<u64>,
    #[serde(rename = "sender_saw_revision", default)]
    _sender_saw_revision: Option<u64>,
    #[serde(rename = "command_digest", default)]
    _command_digest: Option<Uuid>,
}

/// A JSON string, checked to be one and not kept.
struct AnyString;

impl<'de> Deserialize<'de> for AnyString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Checked;
        impl serde::de::Visitor<'_> for Checked {
            type Value = AnyString;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<AnyString, E> {
                Ok(AnyString)
            }
        }
        deserializer.deserialize_str(Checked)
    }
}

/// Reads stored JSON. The bytes are checked to be UTF-8 once, as a whole:
/// `serde_json::from_slice` checks every string on its own, keys included,
/// which was a fifth of the decoding work of a replay. Bytes that are not
/// UTF-8 go the `from_slice` way, for its error and position.
fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored event decodes to exactly the event that was decided:
    /// otherwise a retry compares its decision with a stored copy that
    /// differs in the last bit of a float, and is refused as a reused
    /// command id. serde_json writes the shortest text that reads back to
    /// the same f64, but by default reads some of it back one unit in the
    /// last place off (0.18414572685438918 came back 0.1841457268543892);
    /// its `float_roundtrip` feature reads exactly.
    #[test]
    fn a_classification_confidence_survives_the_log_bit_for_bit() {
        let classified = |confidence: f64| Event::TicketClassified {
            claim_id: Uuid::from_u128(7),
            category: "billing".into(),
            priority: Priority::Normal,
            confidence,
        };
        // The value a race test found, then a deterministic spread of others.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut values = vec![0.184_145_726_854_389_18];
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            values.push((state >> 11) as f64 / (1u64 << 53) as f64);
        }
        for confidence in values {
            let event = classified(confidence);
            let decoded = Event::decode("TicketClassified", 1, &event.encode()).expect("decodes");
            let Event::TicketClassified { confidence: read, .. } = decoded else {
                panic!("decoded as another event: {decoded:?}");
            };
            assert_eq!(
                read.to_bits(),
                confidence.to_bits(),
                "{confidence:?} came back as {read:?}"
            );
        }
    }

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        let command = Uuid::from_u128(42);
        assert_eq!(event_id(command, 0), event_id(command, 0));
        assert_ne!(event_id(command, 0), event_id(command, 1));
        assert_ne!(event_id(command, 0), event_id(Uuid::from_u128(43), 0));
        assert_eq!(event_id(command, 0).get_version_num(), 5);
    }

    #[test]
    fn a_time_ordered_command_gets_time_ordered_event_ids() {
        let first = Uuid::now_v7();
        // Later by one millisecond at least, whatever the clock does.
        let later = {
            let mut bytes = *first.as_bytes();
            let millis = u64::from_be_bytes([0, 0, bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]]) + 1;
            bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
            Uuid::from_bytes(bytes)
        };
        assert_eq!(later.get_version_num(), 7);
        for index in 0..4 {
            let id = event_id(first, index);
            assert_eq!(id.get_version_num(), 8, "{id}");
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(
                id.as_bytes()[..6],
                first.as_bytes()[..6],
                "the command's timestamp leads"
            );
            assert_eq!(id, event_id(first, index), "deterministic");
            assert!(id < event_id(later, 0), "a later command's events sort after");
        }
        let ids: std::collections::BTreeSet<Uuid> = (0..1000).map(|index| event_id(first, index)).collect();
        assert_eq!(ids.len(), 1000, "distinct per index");
        // Two commands in the same millisecond differ in the hashed bits.
        let mut sibling = *first.as_bytes();
        sibling[15] ^= 1;
        assert_ne!(event_id(Uuid::from_bytes(sibling), 0), event_id(first, 0));
        // A random command id keeps the UUIDv5 it always had; a UUIDv7
        // one had that before, and says so.
        let random = Uuid::new_v4();
        let mut name = [0u8; 20];
        name[..16].copy_from_slice(random.as_bytes());
        assert_eq!(event_id(random, 0), Uuid::new_v5(&EVENT_ID_NAMESPACE, &name));
        assert_eq!(former_event_id(random, 0), None);
        name[..16].copy_from_slice(first.as_bytes());
        name[16..].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            former_event_id(first, 3),
            Some(Uuid::new_v5(&EVENT_ID_NAMESPACE, &name))
        );
    }

    #[test]
    fn claims_come_from_the_starts_and_take_overs_only() {
        let claim = Claim {
            claim_id: Uuid::from_u128(7),
            agent_id: "drafter-1".into(),
            lease_expires_at: DateTime::UNIX_EPOCH,
        };
        let started = Event::DraftingStarted { claim: claim.clone() };
        let taken = Event::ClaimTakenOver {
            previous_claim_id: Uuid::from_u128(6),
            claim: claim.clone(),
        };
        assert_eq!(started.new_claim(), Some(&claim));
        assert_eq!(taken.new_claim(), Some(&claim));
        let extended = Event::LeaseExtended {
            claim_id: claim.claim_id,
            lease_expires_at: DateTime::UNIX_EPOCH,
        };
        assert_eq!(extended.new_claim(), None);
    }

    #[test]
    fn an_event_round_trips_through_its_type_name_and_version() {
        let event = Event::DraftRejected {
            claim_id: None,
            reason: "tone".into(),
        };
        assert!(Event::TYPES.contains(&event.event_type()));
        let decoded = Event::decode(event.event_type(), event.schema_version(), &event.encode()).unwrap();
        assert_eq!(decoded, event);
    }

    #[test]
    fn decoding_rejects_unknown_types_newer_versions_and_mismatches() {
        let event = Event::DraftRejected {
            claim_id: None,
            reason: "tone".into(),
        };
        assert!(matches!(
            Event::decode("TicketExploded", 1, b"{}"),
            Err(DecodeError::UnknownType { .. })
        ));
        assert!(matches!(
            Event::decode("DraftRejected", 2, &event.encode()),
            Err(DecodeError::NewerVersion { version: 2, .. })
        ));
        assert!(matches!(
            Event::decode("DraftRejected", 0, &event.encode()),
            Err(DecodeError::VersionZero { .. })
        ));
        assert!(matches!(
            Event::decode("TicketResolved", 1, &event.encode()),
            Err(DecodeError::TypeMismatch { .. })
        ));
        assert!(matches!(
            Event::decode("DraftRejected", 1, b"{not json"),
            Err(DecodeError::Payload { .. })
        ));
    }

    /// Stored metadata with every field set, optional ones included, and
    /// an agent id that needs escaping.
    fn every_field_set() -> EventMetadata {
        EventMetadata {
            schema_version: 1,
            command_id: Uuid::now_v7(),
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            agent: Agent {
                id: "drafter-\"7\"".into(),
                role: crate::Role::Drafter,
                model: Some("m".into()),
                prompt_version: None,
            },
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            recorded_at: "2026-12-07T10:11:12.345678Z".parse().unwrap(),
            decided_at_revision: Some(3),
            sender_saw_revision: Some(3),
            command_digest: Some(Uuid::new_v4()),
        }
    }

    /// The header of stored metadata holds the same schema version, agent
    /// and time as the whole metadata does, whatever else it carries; and
    /// metadata without one of those three is refused, not defaulted.
    #[test]
    fn the_header_reads_what_the_whole_metadata_says() {
        let metadata = every_field_set();
        let header = EventHeader::decode(&metadata.encode()).unwrap();
        assert_eq!(header.schema_version, metadata.schema_version);
        assert_eq!(header.agent, metadata.agent);
        assert_eq!(header.recorded_at, metadata.recorded_at);

        let event = Event::DraftRejected {
            claim_id: None,
            reason: "tone".into(),
        };
        let (decoded, header) = decode_stored_header(event.event_type(), &event.encode(), &metadata.encode()).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(header.agent.id, "drafter-\"7\"");

        let mut without_agent: serde_json::Value = serde_json::from_slice(&metadata.encode()).unwrap();
        without_agent.as_object_mut().unwrap().remove("agent");
        assert!(matches!(
            decode_stored_header(
                event.event_type(),
                &event.encode(),
                &serde_json::to_vec(&without_agent).unwrap()
            ),
            Err(DecodeError::Payload { .. })
        ));
        assert!(matches!(
            decode_stored_header(event.event_type(), &event.encode(), b"{\"schema_version\": 1"),
            Err(DecodeError::Payload { .. })
        ));
    }

    /// The header refuses exactly the metadata the whole decode refuses:
    /// a field missing, an id that is not a UUID, a number that is not
    /// one. Otherwise a damaged event would be applied to the read models
    /// while the command handler refuses to load its ticket.
    #[test]
    fn the_header_refuses_what_the_whole_metadata_refuses() {
        let whole = every_field_set();
        let valid: serde_json::Value = serde_json::from_slice(&whole.encode()).unwrap();
        let mut variants: Vec<(String, serde_json::Value)> = vec![("valid".into(), valid.clone())];
        let fields: Vec<String> = valid.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            fields.len(),
            10,
            "a field of EventMetadata that StoredHeader may not list: {fields:?}"
        );
        for field in &fields {
            let mut missing = valid.clone();
            missing.as_object_mut().unwrap().remove(field);
            variants.push((format!("without {field}"), missing));
            for (name, damaged) in [
                ("a word", serde_json::json!("not a uuid")),
                ("a number", serde_json::json!(-5)),
                ("an object", serde_json::json!({})),
                ("null", serde_json::Value::Null),
            ] {
                let mut changed = valid.clone();
                changed[field.as_str()] = damaged;
                variants.push((format!("{field} as {name}"), changed));
            }
        }
        let mut bad_role = valid.clone();
        bad_role["agent"]["role"] = serde_json::json!("boss");
        variants.push(("an unknown role".into(), bad_role));
        let mut refused = 0;
        for (name, variant) in &variants {
            let bytes = serde_json::to_vec(variant).unwrap();
            let by_whole = EventMetadata::decode(&bytes).is_ok();
            assert_eq!(EventHeader::decode(&bytes).is_ok(), by_whole, "{name}: {variant}");
            refused += usize::from(!by_whole);
        }
        // Most variants are damage; the comparison is not between two
        // decoders that accept everything.
        assert!(refused > 30, "only {refused} of {} refused", variants.len());
    }
}
