//! What a projection is: a name, a version, tables, and a batch handler.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use triage_domain::{Agent, CommandRejected, Event, EventHeader, TicketId};
use triage_event_store::{Position, RecordedEvent};

use crate::ProjectionError;
use crate::db::Slot;

/// A stored event, decoded once for every projection.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectedEvent {
    /// Its place in the global log.
    pub position: Position,
    /// Its revision in its stream.
    pub revision: u64,
    /// The ticket it belongs to.
    pub ticket_id: TicketId,
    /// When the command handler decided it.
    pub recorded_at: DateTime<Utc>,
    /// Who sent the command behind it. The rest of its metadata (the
    /// command, correlation and trace ids) is not decoded here: no read
    /// model keeps it, and a rebuild decodes every event.
    pub agent: Agent,
    /// What happened.
    pub payload: Payload,
}

impl ProjectedEvent {
    /// Whether this is the first event of its ticket's stream. A read model
    /// holds nothing for the ticket before it (pages are applied once and
    /// in order), so there is no stored row to load.
    pub fn opens_ticket(&self) -> bool {
        self.revision == 0 && matches!(self.payload, Payload::Ticket(_))
    }
}

/// The two kinds of stored records projections read.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// An event of a ticket stream.
    Ticket(Event),
    /// A refusal from a `rejections-` stream.
    Rejected(CommandRejected),
}

/// The stream prefixes projections read.
pub const STREAM_PREFIXES: [&str; 2] = ["ticket-", "rejections-"];

/// Decodes a record for projections. `Ok(None)` for records of streams
/// projections do not read.
pub fn decode(record: &RecordedEvent) -> Result<Option<ProjectedEvent>, ProjectionError> {
    let stream = record.stream.as_str();
    let undecodable = |source: triage_domain::DecodeError| ProjectionError::Undecodable {
        position: record.position,
        stream: stream.to_owned(),
        event_type: record.event_type.clone(),
        source,
    };
    let (ticket_id, payload, header) = if let Some(id) = TicketId::from_stream_name(stream) {
        let (event, header) = triage_domain::decode_stored_header(&record.event_type, &record.data, &record.metadata)
            .map_err(undecodable)?;
        (id, Payload::Ticket(event), header)
    } else if let Some(id) = stream
        .strip_prefix("rejections-")
        .and_then(|uuid| uuid.parse().ok())
        .map(TicketId)
    {
        let header = EventHeader::decode(&record.metadata).map_err(|source| {
            undecodable(triage_domain::DecodeError::Payload {
                event_type: format!("{} metadata", record.event_type),
                source,
            })
        })?;
        if record.event_type != CommandRejected::EVENT_TYPE {
            return Err(undecodable(triage_domain::DecodeError::UnknownType {
                event_type: record.event_type.clone(),
            }));
        }
        let rejected = CommandRejected::decode(header.schema_version, &record.data).map_err(undecodable)?;
        (id, Payload::Rejected(rejected), header)
    } else {
        return Ok(None);
    };
    Ok(Some(ProjectedEvent {
        position: record.position,
        revision: record.revision,
        ticket_id,
        recorded_at: header.recorded_at,
        agent: header.agent,
        payload,
    }))
}

/// [`decode`], passing over an event that `skip` names the type of and
/// that this build cannot read by design (a type it does not know, or a
/// newer schema version of one), as `--skip-event-type` asks. A damaged
/// event of a type this build knows is never passed over: skipping it
/// would drop it from every read model for good, and the log needs
/// repairing instead.
pub fn decode_skipping(
    record: &RecordedEvent,
    skip: &BTreeSet<String>,
) -> Result<Option<ProjectedEvent>, ProjectionError> {
    match decode(record) {
        Err(error) if error.written_by_a_newer_build() && skip.contains(&record.event_type) => {
            tracing::warn!(position = %record.position, event_type = %record.event_type, "skipping an event type on request");
            Ok(None)
        }
        decoded => decoded,
    }
}

/// A read model maintained from the events.
///
/// The runtime calls [`Projection::apply`] with a batch of events inside one
/// transaction that also advances the checkpoint, so a batch is applied
/// exactly once. Tables live in generations (`<table>_g<N>`): a rebuild fills
/// a new generation while the live one keeps serving, and a swap makes it
/// live atomically. A view named `<table>` always points at the live
/// generation, for SQL users.
pub trait Projection: Send + Sync + fmt::Debug + 'static {
    /// A stable name, such as `tickets`.
    fn name(&self) -> &'static str;

    /// Bump it when the tables or the handler change: the next start
    /// rebuilds the projection before serving.
    fn version(&self) -> u32;

    /// The base names of its tables (and of their views).
    fn tables(&self) -> &'static [&'static str];

    /// Base names of tables that earlier versions of the projection had
    /// and this one has not: dropped with a generation an earlier version
    /// made, views included, so that an upgrade leaves none behind.
    fn former_tables(&self) -> &'static [&'static str] {
        &[]
    }

    /// Creates the tables of `slot`'s generation, with their primary keys
    /// but without secondary indexes (see [`Projection::create_indexes`]).
    fn create(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<()>;

    /// Creates the secondary indexes of `slot`'s generation. A generation
    /// made live at once gets them with its tables. A rebuild's generation
    /// gets them only when it is swapped in, in the swap's transaction:
    /// each index is then built once, by sorting the finished table,
    /// instead of being updated row by row through the whole replay. So a
    /// live generation always has its indexes.
    fn create_indexes(&self, _conn: &Connection, _slot: &Slot) -> rusqlite::Result<()> {
        Ok(())
    }

    /// Applies a batch, in order, inside the caller's transaction.
    fn apply(&self, conn: &Connection, slot: &Slot, events: &[ProjectedEvent]) -> Result<(), ProjectionError>;

    /// A digest per key (a ticket id, a counter name, …) of the generation's
    /// rows, for comparing a rebuild with the live model.
    fn digest(&self, conn: &Connection, slot: &Slot) -> rusqlite::Result<BTreeMap<String, u64>>;
}

/// FNV-1a, 64 bits: a small, stable hash for row digests (the same bytes
/// always give the same digest, across builds and machines).
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Adds one SQLite value, tagged by type so that `NULL`, `0` and `""`
    /// differ.
    pub fn write_value(&mut self, value: rusqlite::types::ValueRef<'_>) {
        use rusqlite::types::ValueRef;
        match value {
            ValueRef::Null => self.write(&[0]),
            ValueRef::Integer(i) => {
                self.write(&[1]);
                self.write(&i.to_le_bytes());
            }
            ValueRef::Real(f) => {
                self.write(&[2]);
                self.write(&f.to_le_bytes());
            }
            ValueRef::Text(t) => {
                self.write(&[3]);
                self.write(&(t.len() as u64).to_le_bytes());
                self.write(t);
            }
            ValueRef::Blob(b) => {
                self.write(&[4]);
                self.write(&(b.len() as u64).to_le_bytes());
                self.write(b);
            }
        }
    }

    /// The digest.
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// Digests every row of `sql` (whose first column is the key) into a map
/// from key to a hash of the whole row. Keys that repeat are combined.
pub fn digest_rows(conn: &Connection, sql: &str) -> rusqlite::Result<BTreeMap<String, u64>> {
    let mut statement = conn.prepare(sql)?;
    let columns = statement.column_count();
    let mut rows = statement.query([])?;
    let mut digests = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let key: String = match row.get_ref(0)? {
            rusqlite::types::ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
            other => format!("{other:?}"),
        };
        let mut hash = Fnv::default();
        for column in 0..columns {
            hash.write_value(row.get_ref(column)?);
        }
        let entry = digests.entry(key).or_insert(0u64);
        *entry = entry.rotate_left(5) ^ hash.finish();
    }
    Ok(digests)
}
