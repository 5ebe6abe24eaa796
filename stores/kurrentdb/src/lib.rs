//! The EventStoreDB / KurrentDB backend of Triage's event store
//! (`esdb://…`, `kurrentdb://…`), through the `kurrentdb` gRPC client, the
//! maintained successor of the `eventstore` crate. This is the only crate
//! that sees gRPC.
//!
//! [`KurrentDbEventStore`] implements the port
//! [`triage_event_store::EventStore`] and passes its conformance suite,
//! against the protocol test double (`triage-kurrentdb-testserver`) in every
//! test run and against a real server when `TRIAGE_ESDB_URL` is set.
//!
//! # Main decision: the server enforces, the backend translates
//! Expected revisions, idempotency and positions are the server's own; the
//! backend maps them one to one ([`ExpectedRevision`] to `StreamState`,
//! `WrongExpectedVersion` to the port's typed error, `(commit, prepare)`
//! positions unchanged) and never second-guesses them with reads of its own,
//! with one exception below.
//!
//! # What the server cannot say, and what the backend does about it
//! - **Was a successful append a replay?** The server answers an idempotent
//!   retry with the original success, indistinguishable from a fresh write.
//!   The command handler must know when what is stored is *another* copy's
//!   decision, so after each append the backend reads the appended range back
//!   (one small read) and reports [`AppendResult::replayed`] unless the
//!   stored events are byte for byte the ones it sent.
//! - **Event ids are unique per stream, not globally** on KurrentDB, so
//!   [`EventStore::enforces_unique_event_ids`] is `false`.
//! - **Reading `$all` backwards from a position** excludes it on the server
//!   and includes it in the port, so the backend reads that one event first.
//!
//! # Namespaces
//! A real server is shared: other applications' streams and the server's
//! own `$`-streams are in `$all`. With a namespace (`?namespace=NAME` in the
//! URL, or [`KurrentDbOptions::namespace`]) every stream is stored as
//! `NAME.<stream>` and `$all` reads and subscriptions are filtered on the
//! server to that prefix, so that one server holds several independent
//! Triage stores (the conformance suite uses one per case). Without one,
//! system streams (`$…`) are skipped.
//!
//! # Connections
//! The client connects lazily, and a client whose first connection failed
//! stays dead. So the backend keeps its client in a slot: after a
//! connection-level failure it builds a new one (at most once per backoff
//! period, doubling up to [`KurrentDbOptions::max_backoff`]) and retries the
//! call once. Appends are safe to retry because retries carry the same event
//! ids. During an outage calls fail with [`Error::Backend`] naming the
//! server; once it is back, calls succeed again.

mod convert;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kurrentdb::{
    AppendToStreamOptions, Client, ClientSettings, ReadAllOptions, ReadStreamOptions, StreamPosition,
    SubscribeToAllOptions, SubscriptionEvent, SubscriptionFilter,
};
use tokio::sync::mpsc;
use triage_event_store::url::{redact_password as redact, take_query_parameter};
use triage_event_store::{
    AllStart, AppendResult, Direction, Error, EventData, EventFilter, EventStore, ExpectedRevision, Position, ReadAll,
    ReadStream, RecordedEvent, Result, StreamName, StreamStart, SubscribeToAll, Subscription, SubscriptionMessage,
    validate_append,
};

use convert::{from_client_position, to_client_event, to_client_position, to_client_state};

/// Options of [`KurrentDbEventStore::connect`].
#[derive(Clone, Debug)]
pub struct KurrentDbOptions {
    /// Store every stream as `NAMESPACE.<stream>` and see only those.
    pub namespace: Option<String>,
    /// The deadline of each call.
    pub deadline: Duration,
    /// The wait before the first reconnection; it doubles per failure.
    pub initial_backoff: Duration,
    /// The longest wait between reconnections.
    pub max_backoff: Duration,
}

impl Default for KurrentDbOptions {
    fn default() -> Self {
        KurrentDbOptions {
            namespace: None,
            deadline: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The client in use and when it may be replaced.
struct ClientSlot {
    client: Arc<Client>,
    generation: u64,
    replaced_at: Instant,
    backoff: Duration,
}

/// The KurrentDB backend. Cheap to share behind an `Arc`.
pub struct KurrentDbEventStore {
    settings: ClientSettings,
    options: KurrentDbOptions,
    /// `NAMESPACE.` or empty.
    prefix: String,
    slot: Mutex<ClientSlot>,
    description: String,
}

impl std::fmt::Debug for KurrentDbEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KurrentDbEventStore")
            .field("server", &self.description)
            .finish_non_exhaustive()
    }
}

/// Events read per request while paging.
const PAGE: usize = 512;

impl KurrentDbEventStore {
    /// Parses `url` (`esdb://host:2113?tls=false`, `kurrentdb://…`,
    /// `kdb://…`, a cluster `esdb://h1:2113,h2:2113,h3:2113`; an optional
    /// `namespace=NAME` parameter) and prepares a client. Connecting is lazy:
    /// the first call connects. Must be called inside a tokio runtime.
    pub fn connect(url: &str, mut options: KurrentDbOptions) -> Result<Self> {
        let (client_url, namespace) =
            take_query_parameter(url, "namespace").map_err(|error| Error::Incompatible(error.to_string()))?;
        if namespace.is_some() {
            options.namespace = namespace;
        }
        let prefix = match &options.namespace {
            Some(namespace) => {
                validate_namespace(namespace)?;
                format!("{namespace}.")
            }
            None => String::new(),
        };
        let settings: ClientSettings = client_url
            .parse()
            .map_err(|error: kurrentdb::ClientSettingsParseError| {
                Error::Incompatible(format!("{} is not a KurrentDB connection string: {error}", redact(url)))
            })?;
        let client = Client::new(settings.clone()).map_err(|error| {
            Error::backend(format!("cannot create a client for {}", redact(url)), error.to_string())
        })?;
        let description = match &options.namespace {
            Some(namespace) => format!("{} (namespace {namespace})", redact(&client_url)),
            None => redact(&client_url),
        };
        Ok(KurrentDbEventStore {
            settings,
            prefix,
            slot: Mutex::new(ClientSlot {
                client: Arc::new(client),
                generation: 0,
                replaced_at: Instant::now(),
                backoff: options.initial_backoff,
            }),
            options,
            description,
        })
    }

    fn current_client(&self) -> (Arc<Client>, u64) {
        let slot = self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (slot.client.clone(), slot.generation)
    }

    /// Replaces the client of `generation` after a connection failure, no
    /// sooner than the backoff allows; waits out the rest of the backoff.
    async fn reconnect(&self, generation: u64) {
        let wait = {
            let mut slot = self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if slot.generation != generation {
                // Another call already replaced it.
                return;
            }
            let due = slot.replaced_at + slot.backoff;
            let wait = due.saturating_duration_since(Instant::now());
            match Client::new(self.settings.clone()) {
                Ok(client) => {
                    tracing::info!(server = %self.description, backoff = ?slot.backoff, "reconnecting to KurrentDB");
                    slot.client = Arc::new(client);
                    slot.generation += 1;
                    slot.replaced_at = Instant::now() + wait;
                    slot.backoff = (slot.backoff * 2).min(self.options.max_backoff);
                }
                Err(error) => tracing::warn!(%error, "cannot build a KurrentDB client"),
            }
            wait
        };
        tokio::time::sleep(wait).await;
    }

    fn connected(&self) {
        let mut slot = self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slot.backoff = self.options.initial_backoff;
    }

    /// Runs `call` with the current client; after a connection failure,
    /// reconnects and runs it once more. Other client errors come back as
    /// they are, for the caller to map.
    async fn with_client<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, CallError>
    where
        F: FnMut(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, kurrentdb::Error>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (client, generation) = self.current_client();
            match call(client).await {
                Ok(value) => {
                    self.connected();
                    return Ok(value);
                }
                // The client has already turned to the leader it was told
                // of: the same client tries again. A new one would start
                // over from the URL's first host, which may be this very
                // follower.
                Err(error @ kurrentdb::Error::NotLeaderException(_)) if attempt < 2 => {
                    tracing::debug!(%error, what, "KurrentDB node is not the leader; trying the leader");
                }
                Err(error) if is_connection_failure(&error) && attempt < 2 => {
                    tracing::debug!(%error, what, "KurrentDB call failed; reconnecting");
                    self.reconnect(generation).await;
                }
                Err(error) if is_connection_failure(&error) => {
                    if !matches!(error, kurrentdb::Error::NotLeaderException(_)) {
                        self.reconnect_later(generation);
                    }
                    return Err(CallError::Port(Error::backend(
                        format!("KurrentDB at {} is unavailable ({what})", self.description),
                        error,
                    )));
                }
                Err(error) => return Err(CallError::Client(error)),
            }
        }
    }

    /// [`Self::with_client`] with every error mapped to the port's.
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: FnMut(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, kurrentdb::Error>>,
    {
        self.with_client(what, call).await.map_err(|error| match error {
            CallError::Client(error) => self.map_error(what, error),
            CallError::Port(error) => error,
        })
    }

    /// Marks the client of `generation` for replacement by the next call,
    /// without waiting now.
    fn reconnect_later(&self, generation: u64) {
        let mut slot = self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.generation == generation
            && let Ok(client) = Client::new(self.settings.clone())
        {
            slot.client = Arc::new(client);
            slot.generation += 1;
        }
    }

    fn map_error(&self, what: &str, error: kurrentdb::Error) -> Error {
        match error {
            kurrentdb::Error::DeadlineExceeded => Error::backend(
                format!(
                    "KurrentDB at {} did not answer within {:?} ({what})",
                    self.description, self.options.deadline
                ),
                kurrentdb::Error::DeadlineExceeded,
            ),
            kurrentdb::Error::AccessDenied => Error::refused(
                format!(
                    "KurrentDB at {} denied access ({what}); check the credentials in the connection string",
                    self.description
                ),
                kurrentdb::Error::AccessDenied,
            ),
            other => Error::backend(format!("KurrentDB at {}: {what} failed", self.description), other),
        }
    }

    fn server_name(&self, stream: &StreamName) -> String {
        format!("{}{}", self.prefix, stream.as_str())
    }

    /// The port's view of a recorded event; `None` for events outside the
    /// namespace, in system streams, or in a stream whose name no Triage
    /// store could have written (another application's, over 255 bytes or
    /// with control characters): like system events, they are not this
    /// store's, and failing on one would stop every reader of `$all` at it
    /// for good.
    fn recorded(&self, event: &kurrentdb::RecordedEvent) -> Result<Option<RecordedEvent>> {
        let Some(name) = event.stream_id().strip_prefix(self.prefix.as_str()) else {
            return Ok(None);
        };
        if name.starts_with('$') {
            return Ok(None);
        }
        if let Err(error) = StreamName::new(name) {
            tracing::debug!(%error, position = ?event.position, "skipping an event of a stream Triage cannot name");
            return Ok(None);
        }
        convert::from_client_event(name, event).map(Some)
    }

    fn all_filter(&self) -> Option<SubscriptionFilter> {
        (!self.prefix.is_empty()).then(|| SubscriptionFilter::on_stream_name().add_prefix(&self.prefix))
    }

    /// One page of `$all` from the server, converted, with what the server
    /// sent before conversion dropped system events: how many events, and
    /// the last one's position (the next page's start).
    async fn read_all_page(
        &self,
        direction: Direction,
        from: Option<Position>,
        count: usize,
    ) -> Result<(Vec<RecordedEvent>, usize, Option<Position>)> {
        let mut options = ReadAllOptions::default()
            .max_count(count)
            .deadline(self.options.deadline);
        options = match direction {
            Direction::Forwards => options.forwards(),
            Direction::Backwards => options.backwards(),
        };
        options = options.position(match (from, direction) {
            (Some(position), _) => StreamPosition::Position(to_client_position(position)),
            (None, Direction::Forwards) => StreamPosition::Start,
            (None, Direction::Backwards) => StreamPosition::End,
        });
        if let Some(filter) = self.all_filter() {
            options = options.filter(filter);
        }
        let options = &options;
        let raw = self
            .call("read $all", |client| async move {
                let mut reader = client.read_all(options).await?;
                let mut events = Vec::new();
                while let Some(event) = reader.next().await? {
                    events.push(event);
                }
                Ok(events)
            })
            .await?;
        let seen = raw.len();
        let last = raw
            .last()
            .map(|resolved| from_client_position(resolved.get_original_event().position));
        let mut events = Vec::with_capacity(seen);
        for resolved in &raw {
            if let Some(event) = self.recorded(resolved.get_original_event())? {
                events.push(event);
            }
        }
        Ok((events, seen, last))
    }

    /// Whether the stored events at the end of an append are exactly `sent`.
    async fn stored_exactly(&self, name: &str, last_revision: u64, sent: &[EventData]) -> Result<bool> {
        let options = ReadStreamOptions::default()
            .backwards()
            .position(StreamPosition::Position(last_revision))
            .max_count(sent.len())
            .deadline(self.options.deadline);
        let options = &options;
        let stored = self
            .call("read back an append", |client| async move {
                let mut reader = client.read_stream(name, options).await?;
                let mut events = Vec::new();
                while let Some(event) = reader.next().await? {
                    events.push(event);
                }
                Ok(events)
            })
            .await?;
        Ok(stored.len() == sent.len()
            && stored.iter().rev().zip(sent).all(|(stored, sent)| {
                let stored = stored.get_original_event();
                stored.id == sent.id
                    && stored.event_type == sent.event_type
                    && stored.data.as_ref() == sent.data.as_slice()
                    && stored.custom_metadata.as_ref() == sent.metadata.as_slice()
            }))
    }
}

#[async_trait]
impl EventStore for KurrentDbEventStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> Result<AppendResult> {
        validate_append(stream, &events)?;
        // The server reads a revision as a signed 64-bit number: it takes
        // u64::MAX for "no stream" and refuses the rest above i64::MAX as
        // an internal error. No stream reaches such a revision, so
        // expecting one is a conflict, decided here.
        if let ExpectedRevision::Exact(revision) = expected
            && i64::try_from(revision).is_err()
        {
            let actual = match self.read_stream(stream, ReadStream::backwards().limit(1)).await {
                Ok(last) => last.first().map(|event| event.revision),
                Err(Error::StreamNotFound { .. }) => None,
                Err(error) => return Err(error),
            };
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        let name = self.server_name(stream);
        let options = AppendToStreamOptions::default()
            .stream_state(to_client_state(expected))
            .deadline(self.options.deadline);
        let (name_ref, options_ref, events_ref) = (&name, &options, &events);
        let written = self
            .with_client("append", |client| async move {
                let proposed: Vec<kurrentdb::EventData> = events_ref.iter().map(to_client_event).collect();
                client.append_to_stream(name_ref.as_str(), options_ref, proposed).await
            })
            .await;
        let written = match written {
            Ok(written) => written,
            Err(CallError::Client(kurrentdb::Error::WrongExpectedVersion { current, .. })) => {
                return Err(Error::WrongExpectedVersion {
                    stream: stream.clone(),
                    expected,
                    actual: match current {
                        kurrentdb::CurrentRevision::Current(revision) => Some(revision),
                        kurrentdb::CurrentRevision::NoStream => None,
                    },
                });
            }
            Err(CallError::Client(error)) => return Err(self.map_error("append", error)),
            Err(CallError::Port(error)) => return Err(error),
        };
        let replayed = !self
            .stored_exactly(&name, written.next_expected_version, &events)
            .await?;
        Ok(AppendResult {
            current_revision: written.next_expected_version,
            position: from_client_position(written.position),
            replayed,
        })
    }

    async fn read_stream(&self, stream: &StreamName, options: ReadStream) -> Result<Vec<RecordedEvent>> {
        let name = self.server_name(stream);
        let mut client_options = ReadStreamOptions::default().deadline(self.options.deadline);
        client_options = match options.direction {
            Direction::Forwards => client_options.forwards(),
            Direction::Backwards => client_options.backwards(),
        };
        client_options = client_options.position(match (options.from, options.direction) {
            (StreamStart::Revision(revision), _) => StreamPosition::Position(revision),
            (StreamStart::Boundary, Direction::Forwards) => StreamPosition::Start,
            (StreamStart::Boundary, Direction::Backwards) => StreamPosition::End,
        });
        client_options = client_options.max_count(options.max_count);
        let (name_ref, options_ref) = (&name, &client_options);
        let raw = self
            .with_client("read a stream", |client| async move {
                let mut reader = client.read_stream(name_ref.as_str(), options_ref).await?;
                let mut events = Vec::new();
                while let Some(event) = reader.next().await? {
                    events.push(event);
                }
                Ok(events)
            })
            .await;
        let raw = match raw {
            Ok(raw) => raw,
            Err(CallError::Client(kurrentdb::Error::ResourceNotFound)) => {
                return Err(Error::StreamNotFound { stream: stream.clone() });
            }
            Err(CallError::Client(error)) => return Err(self.map_error("read a stream", error)),
            Err(CallError::Port(error)) => return Err(error),
        };
        raw.iter()
            .map(|resolved| convert::from_client_event(stream.as_str(), resolved.get_original_event()))
            .collect()
    }

    async fn read_all(&self, options: ReadAll) -> Result<Vec<RecordedEvent>> {
        let mut events = Vec::with_capacity(options.max_count.min(PAGE));
        let start = match options.from {
            AllStart::Boundary => None,
            AllStart::Position(position) => Some(position),
        };
        if options.max_count == 0 {
            return Ok(events);
        }
        if options.direction == Direction::Backwards
            && let Some(position) = start
        {
            // A backward read excludes its start on the server and includes
            // it in the port.
            let (first, _, _) = self.read_all_page(Direction::Forwards, Some(position), 1).await?;
            events.extend(first.into_iter().filter(|event| event.position == position));
        }
        // System events dropped in conversion make short pages: read on
        // until the page is full or the log ends. Whatever the server does
        // with a page's start, an event is kept only if it lies beyond the
        // previous page (or, forwards on the first page, at the start).
        let mut cursor = start;
        let mut first_page = true;
        while events.len() < options.max_count {
            // A later page means the first held events that were dropped
            // (system events: a projection writes links after each event),
            // so it asks for a whole page, not for what is missing: asking
            // for one event over a stretch of them would take a round trip
            // each. It may also return the cursor event again (forward
            // reads include their start): one more.
            let wanted = if first_page {
                (options.max_count - events.len()).min(PAGE)
            } else {
                PAGE + 1
            };
            let (page, seen, last) = self.read_all_page(options.direction, cursor, wanted).await?;
            for event in page {
                let beyond = match (options.direction, cursor) {
                    (_, None) => true,
                    (Direction::Forwards, Some(at)) if first_page => event.position >= at,
                    (Direction::Forwards, Some(at)) => event.position > at,
                    (Direction::Backwards, Some(at)) => event.position < at,
                };
                if beyond && events.len() < options.max_count {
                    events.push(event);
                }
            }
            // The end of the log, or no progress (a page holding only the
            // cursor event).
            if seen < wanted || last.is_none() || (!first_page && last == cursor) {
                break;
            }
            cursor = last;
            first_page = false;
        }
        Ok(events)
    }

    /// KurrentDB keeps no index of event ids across streams (its
    /// idempotency is per stream), and finding one would mean scanning
    /// `$all`: callers fall back to what they have.
    async fn read_event(&self, _event_id: uuid::Uuid) -> Result<Option<RecordedEvent>> {
        Ok(None)
    }

    async fn head_position(&self) -> Result<Option<Position>> {
        let (events, _, _) = self.read_all_page(Direction::Backwards, None, 1).await?;
        if let Some(last) = events.first() {
            return Ok(Some(last.position));
        }
        // The last server event may be a system event: look further back.
        let newest = self
            .read_all(ReadAll {
                direction: Direction::Backwards,
                from: AllStart::Boundary,
                max_count: 1,
            })
            .await?;
        Ok(newest.first().map(|event| event.position))
    }

    fn subscribe_to_all(self: Arc<Self>, options: SubscribeToAll) -> Subscription {
        let (sender, receiver) = mpsc::channel(PAGE);
        tokio::spawn(async move {
            if let Err(error) = self.run_subscription(options, &sender).await {
                let _ = sender.send(Err(error)).await;
            }
        });
        Subscription::from_channel(receiver)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn enforces_unique_event_ids(&self) -> bool {
        false
    }
}

impl KurrentDbEventStore {
    /// Feeds `sender` from a server-side subscription until either side
    /// stops. The server filters on the namespace and stream prefixes; an
    /// event-type filter inside a namespace is applied here.
    async fn run_subscription(
        &self,
        options: SubscribeToAll,
        sender: &mpsc::Sender<Result<SubscriptionMessage>>,
    ) -> Result<()> {
        let interval = options.checkpoint_interval.max(1);
        let (server_filter, local_type_filter) = match (&options.filter, self.prefix.is_empty()) {
            (Some(EventFilter::StreamPrefix(prefixes)), _) => {
                let filter = prefixes
                    .iter()
                    .fold(SubscriptionFilter::on_stream_name(), |filter, prefix| {
                        filter.add_prefix(format!("{}{prefix}", self.prefix))
                    });
                (Some(filter), None)
            }
            (Some(EventFilter::EventTypePrefix(prefixes)), true) => {
                let filter = prefixes
                    .iter()
                    .fold(SubscriptionFilter::on_event_type(), |filter, prefix| {
                        filter.add_prefix(prefix)
                    });
                (Some(filter), None)
            }
            (Some(filter @ EventFilter::EventTypePrefix(_)), false) => (self.all_filter(), Some(filter.clone())),
            (None, _) => (self.all_filter(), None),
        };
        let filtered = options.filter.is_some();
        let mut client_options = SubscribeToAllOptions::default().position(match options.from {
            Some(position) => StreamPosition::Position(to_client_position(position)),
            None => StreamPosition::Start,
        });
        if let Some(filter) = server_filter {
            client_options = client_options.filter(filter.max(interval));
        }
        let (client, generation) = self.current_client();
        let mut subscription = client.subscribe_to_all(&client_options).await;
        loop {
            let event = tokio::select! {
                event = subscription.next_subscription_event() => event,
                () = sender.closed() => return Ok(()),
            };
            let message = match event {
                Ok(SubscriptionEvent::EventAppeared(resolved)) => {
                    let Some(event) = self.recorded(resolved.get_original_event())? else {
                        continue;
                    };
                    if local_type_filter.as_ref().is_some_and(|filter| !filter.matches(&event)) {
                        continue;
                    }
                    SubscriptionMessage::Event(event)
                }
                // Checkpoints only mean something to filtered subscribers,
                // as in the port's contract.
                Ok(SubscriptionEvent::Checkpoint(position)) if filtered => {
                    SubscriptionMessage::Checkpoint(from_client_position(position))
                }
                Ok(SubscriptionEvent::CaughtUp(_)) => {
                    self.connected();
                    SubscriptionMessage::CaughtUp
                }
                Ok(_) => continue,
                Err(error) => {
                    if is_connection_failure(&error) {
                        self.reconnect_later(generation);
                        return Err(Error::backend(
                            format!("the subscription to KurrentDB at {} was dropped", self.description),
                            error,
                        ));
                    }
                    return Err(self.map_error("subscribe to $all", error));
                }
            };
            if sender.send(Ok(message)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// A failed call: the client's own error, or the port's when the server
/// stayed unreachable.
#[derive(Debug)]
enum CallError {
    Client(kurrentdb::Error),
    Port(Error),
}

/// Failures after which the client should be rebuilt.
fn is_connection_failure(error: &kurrentdb::Error) -> bool {
    matches!(
        error,
        kurrentdb::Error::ConnectionClosed
            | kurrentdb::Error::GrpcConnectionError(_)
            | kurrentdb::Error::ServerError(_)
            | kurrentdb::Error::NotLeaderException(_)
    )
}

fn validate_namespace(namespace: &str) -> Result<()> {
    let valid = !namespace.is_empty()
        && namespace.len() <= 64
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(Error::Incompatible(format!(
            "namespace {namespace:?} must be 1 to 64 characters of letters, digits, '_' and '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_validated() {
        assert!(validate_namespace("prod_1").is_ok());
        assert!(validate_namespace("a.b").is_err());
        assert!(validate_namespace("").is_err());
    }
}
