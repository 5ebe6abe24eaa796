//! The conformance suite: one set of cases that every backend must pass.
//!
//! A backend's `tests/conformance.rs` calls [`conformance_suite!`](crate::conformance_suite)
//! with an async factory returning `Option<Arc<dyn EventStore>>` (a fresh,
//! empty store per case; `None` skips the case, for backends whose server is
//! not configured). The macro generates one `#[tokio::test]` per case, so a
//! failure names the case.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    AllStart, AppendResult, Error, EventData, EventFilter, EventStore, ExpectedRevision, MAX_EVENT_BYTES, Position,
    ReadAll, ReadStream, RecordedEvent, StreamName, SubscribeToAll, Subscription, SubscriptionMessage,
};

/// Another store, counting the reads it serves, and failing the `$all`
/// reads that start at one place if asked to: for tests of what callers
/// read (the command handler's loads, the projection reader's pages). It
/// can also let another writer in just before an append (for tests of
/// lost races), or another process's work just before a read of the head.
pub struct CountingStore {
    inner: Arc<dyn EventStore>,
    stream_reads: AtomicUsize,
    all_reads: AtomicUsize,
    appends: AtomicUsize,
    failing_appends: std::sync::atomic::AtomicBool,
    fail_read_all_from: Option<AllStart>,
    fail_head_position: bool,
    without_id_index: bool,
    read_only: bool,
    before_next_append: std::sync::Mutex<Option<Interloper>>,
    before_next_head_position: std::sync::Mutex<Option<Interloper>>,
    before_next_read_event: std::sync::Mutex<Option<Interloper>>,
}

/// What runs before the next append; see [`CountingStore::before_next_append`].
type Interloper = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl std::fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingStore")
            .field("inner", &self.inner.describe())
            .field("stream_reads", &self.stream_reads)
            .field("all_reads", &self.all_reads)
            .field("fail_read_all_from", &self.fail_read_all_from)
            .finish_non_exhaustive()
    }
}

impl CountingStore {
    /// Counts the reads of `inner`.
    pub fn new(inner: Arc<dyn EventStore>) -> Self {
        CountingStore {
            inner,
            stream_reads: AtomicUsize::new(0),
            all_reads: AtomicUsize::new(0),
            appends: AtomicUsize::new(0),
            failing_appends: std::sync::atomic::AtomicBool::new(false),
            fail_read_all_from: None,
            fail_head_position: false,
            without_id_index: false,
            read_only: false,
            before_next_append: std::sync::Mutex::new(None),
            before_next_head_position: std::sync::Mutex::new(None),
            before_next_read_event: std::sync::Mutex::new(None),
        }
    }

    /// Answers every `head_position` with a backend error.
    pub fn failing_head_position(self) -> Self {
        CountingStore {
            fail_head_position: true,
            ..self
        }
    }

    /// Says it takes no writes ([`EventStore::accepts_writes`]), as a
    /// standby does; appends still go through to `inner`.
    pub fn read_only(self) -> Self {
        CountingStore {
            read_only: true,
            ..self
        }
    }

    /// Answers as a store without an index of event ids does (KurrentDB's
    /// port): `read_event` finds nothing, and ids are unique per stream
    /// only as far as callers know.
    pub fn without_id_index(self) -> Self {
        CountingStore {
            without_id_index: true,
            ..self
        }
    }

    /// Runs `interloper` to its end when the next append arrives, before
    /// that append reaches the inner store; appends made by `interloper`
    /// itself go straight through. The append that lets it in then finds
    /// the store as `interloper` left it: a race lost, every time.
    pub fn before_next_append(&self, interloper: impl std::future::Future<Output = ()> + Send + 'static) {
        *self
            .before_next_append
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::pin(interloper));
    }

    /// Runs `interloper` to its end when `head_position` is next asked,
    /// before the inner store answers: another process's work between a
    /// caller's reads.
    pub fn before_next_head_position(&self, interloper: impl std::future::Future<Output = ()> + Send + 'static) {
        *self
            .before_next_head_position
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::pin(interloper));
    }

    /// Runs `interloper` to its end when `read_event` is next called,
    /// before the inner store answers: holds a caller up at its first look
    /// for an event id while others go ahead.
    pub fn before_next_read_event(&self, interloper: impl std::future::Future<Output = ()> + Send + 'static) {
        *self
            .before_next_read_event
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::pin(interloper));
    }

    /// Answers the `$all` reads that start at `from` with a backend error
    /// (they are counted all the same).
    pub fn failing_read_all_from(self, from: AllStart) -> Self {
        CountingStore {
            fail_read_all_from: Some(from),
            ..self
        }
    }

    /// Stream reads started so far.
    pub fn stream_reads(&self) -> usize {
        self.stream_reads.load(Ordering::SeqCst)
    }

    /// From now on, answers every append with a backend error (they are
    /// counted all the same), or stops doing so.
    pub fn fail_appends(&self, fail: bool) {
        self.failing_appends.store(fail, Ordering::SeqCst);
    }

    /// Appends that reached the inner store so far (an interloper's
    /// included).
    pub fn appends(&self) -> usize {
        self.appends.load(Ordering::SeqCst)
    }

    /// `$all` reads started so far.
    pub fn all_reads(&self) -> usize {
        self.all_reads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventStore for CountingStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedRevision,
        events: Vec<EventData>,
    ) -> crate::Result<AppendResult> {
        let interloper = self
            .before_next_append
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(interloper) = interloper {
            interloper.await;
        }
        self.appends.fetch_add(1, Ordering::SeqCst);
        if self.failing_appends.load(Ordering::SeqCst) {
            return Err(Error::backend("an append the test fails", "on purpose"));
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(&self, stream: &StreamName, options: ReadStream) -> crate::Result<Vec<RecordedEvent>> {
        self.stream_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_stream(stream, options).await
    }

    async fn read_all(&self, options: ReadAll) -> crate::Result<Vec<RecordedEvent>> {
        self.all_reads.fetch_add(1, Ordering::SeqCst);
        if self.fail_read_all_from == Some(options.from) {
            return Err(Error::backend("a read the test fails", "on purpose"));
        }
        self.inner.read_all(options).await
    }

    async fn head_position(&self) -> crate::Result<Option<Position>> {
        let interloper = self
            .before_next_head_position
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(interloper) = interloper {
            interloper.await;
        }
        if self.fail_head_position {
            return Err(Error::backend("the head the test fails", "on purpose"));
        }
        self.inner.head_position().await
    }

    async fn read_event(&self, event_id: uuid::Uuid) -> crate::Result<Option<RecordedEvent>> {
        let interloper = self
            .before_next_read_event
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(interloper) = interloper {
            interloper.await;
        }
        if self.without_id_index {
            return Ok(None);
        }
        self.inner.read_event(event_id).await
    }

    fn subscribe_to_all(self: Arc<Self>, options: SubscribeToAll) -> Subscription {
        Arc::clone(&self.inner).subscribe_to_all(options)
    }

    fn describe(&self) -> String {
        format!("{} (reads counted)", self.inner.describe())
    }

    fn enforces_unique_event_ids(&self) -> bool {
        !self.without_id_index && self.inner.enforces_unique_event_ids()
    }

    async fn accepts_writes(&self) -> crate::Result<bool> {
        Ok(!self.read_only && self.inner.accepts_writes().await?)
    }
}

/// Generates one test per conformance case for a backend.
///
/// ```ignore
/// async fn store() -> Option<Arc<dyn EventStore>> { … }
/// triage_event_store::conformance_suite!(store);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path) => {
        $crate::__conformance_cases!(
            $factory;
            no_stream_creates_the_stream,
            no_stream_conflicts_when_the_stream_exists,
            stream_exists_conflicts_on_a_missing_stream,
            stream_exists_appends_to_an_existing_stream,
            exact_appends_only_at_the_last_revision,
            any_always_appends,
            conflicts_report_the_actual_revision,
            idempotent_retry_returns_the_original_result,
            idempotent_retry_after_no_stream,
            partial_idempotent_match_fails,
            a_stored_id_under_an_unreachable_revision_conflicts,
            event_ids_are_unique_across_streams,
            read_event_finds_an_event_by_id,
            appends_are_atomic,
            invalid_appends_are_rejected_without_writing,
            recorded_events_round_trip,
            read_stream_forwards_and_backwards,
            read_stream_from_revision_with_limit,
            missing_stream_is_not_found,
            a_stream_being_created_reads_as_missing_or_whole,
            read_all_forwards_and_backwards_from_position,
            positions_strictly_increase,
            racing_exact_appends_exactly_one_wins,
            racing_appends_on_many_streams_keep_every_stream_consecutive,
            subscription_catches_up_then_goes_live,
            subscription_started_mid_way_sees_every_later_event_once,
            subscription_filters_by_stream_prefix_with_checkpoints,
            subscription_filters_by_event_type,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                match $factory().await {
                    Some(store) => $crate::testing::$case(store).await,
                    None => eprintln!("skipped: {} (backend not configured)", stringify!($case)),
                }
            }
        )*
    };
}

/// How long a subscription case waits for a message before failing.
const WAIT: Duration = Duration::from_secs(10);

fn stream(name: &str) -> StreamName {
    StreamName::new(format!("{name}-{}", Uuid::new_v4().simple())).expect("valid stream name")
}

/// A small event with a fresh id.
pub fn event(event_type: &str) -> EventData {
    let id = Uuid::new_v4();
    EventData {
        id,
        event_type: event_type.to_owned(),
        data: format!(r#"{{"id":"{id}"}}"#).into_bytes(),
        metadata: br#"{"test":true}"#.to_vec(),
    }
}

fn events(count: usize) -> Vec<EventData> {
    (0..count).map(|_| event("Tested")).collect()
}

async fn read(store: &Arc<dyn EventStore>, stream: &StreamName) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, ReadStream::forwards())
        .await
        .expect("stream is readable")
}

async fn read_whole_log(store: &Arc<dyn EventStore>) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut from = None;
    loop {
        let mut options = ReadAll::forwards(500);
        if let Some(position) = from {
            options = options.from_position(position);
        }
        let page = store.read_all(options).await.expect("log is readable");
        let fresh: Vec<_> = page.into_iter().filter(|event| Some(event.position) > from).collect();
        match fresh.last() {
            None => return all,
            Some(last) => from = Some(last.position),
        }
        all.extend(fresh);
    }
}

fn assert_conflict(result: crate::Result<AppendResult>, expected: ExpectedRevision, actual: Option<u64>) {
    match result {
        Err(Error::WrongExpectedVersion {
            expected: reported_expected,
            actual: reported_actual,
            ..
        }) => {
            assert_eq!(reported_expected, expected, "reported expected revision");
            assert_eq!(reported_actual, actual, "reported actual revision");
        }
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
}

async fn next_message(subscription: &mut Subscription) -> SubscriptionMessage {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("subscription delivered within the time limit")
        .expect("subscription is still open")
        .expect("subscription message is not an error")
}

/// Collects `count` events from a subscription, ignoring checkpoints.
async fn next_events(subscription: &mut Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut received = Vec::with_capacity(count);
    while received.len() < count {
        if let SubscriptionMessage::Event(event) = next_message(subscription).await {
            received.push(event);
        }
    }
    received
}

/// `NoStream` on a new stream writes revision 0, 1, ….
pub async fn no_stream_creates_the_stream(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let result = store.append(&s, ExpectedRevision::NoStream, events(2)).await.unwrap();
    assert_eq!(result.current_revision, 1);
    let stored = read(&store, &s).await;
    assert_eq!(stored.iter().map(|e| e.revision).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(result.position, stored[1].position);
}

/// `NoStream` on an existing stream conflicts with the actual revision.
pub async fn no_stream_conflicts_when_the_stream_exists(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(1)).await.unwrap();
    let second = store.append(&s, ExpectedRevision::NoStream, events(1)).await;
    assert_conflict(second, ExpectedRevision::NoStream, Some(0));
    assert_eq!(read(&store, &s).await.len(), 1, "nothing was written");
}

/// `StreamExists` on a missing stream conflicts with `actual = None`.
pub async fn stream_exists_conflicts_on_a_missing_stream(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let result = store.append(&s, ExpectedRevision::StreamExists, events(1)).await;
    assert_conflict(result, ExpectedRevision::StreamExists, None);
    assert!(matches!(
        store.read_stream(&s, ReadStream::forwards()).await,
        Err(Error::StreamNotFound { .. })
    ));
}

/// `StreamExists` appends to an existing stream.
pub async fn stream_exists_appends_to_an_existing_stream(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(1)).await.unwrap();
    let result = store
        .append(&s, ExpectedRevision::StreamExists, events(2))
        .await
        .unwrap();
    assert_eq!(result.current_revision, 2);
}

/// `Exact(n)` appends only when the last revision is `n`.
pub async fn exact_appends_only_at_the_last_revision(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(3)).await.unwrap();
    assert_conflict(
        store.append(&s, ExpectedRevision::Exact(1), events(1)).await,
        ExpectedRevision::Exact(1),
        Some(2),
    );
    assert_conflict(
        store.append(&s, ExpectedRevision::Exact(3), events(1)).await,
        ExpectedRevision::Exact(3),
        Some(2),
    );
    let result = store.append(&s, ExpectedRevision::Exact(2), events(1)).await.unwrap();
    assert_eq!(result.current_revision, 3);
    assert_conflict(
        store
            .append(&stream("ticket"), ExpectedRevision::Exact(0), events(1))
            .await,
        ExpectedRevision::Exact(0),
        None,
    );
}

/// `Any` appends to new and existing streams alike.
pub async fn any_always_appends(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    assert_eq!(
        store
            .append(&s, ExpectedRevision::Any, events(1))
            .await
            .unwrap()
            .current_revision,
        0
    );
    assert_eq!(
        store
            .append(&s, ExpectedRevision::Any, events(2))
            .await
            .unwrap()
            .current_revision,
        2
    );
}

/// The conflict carries the stream, the expectation and the actual revision.
pub async fn conflicts_report_the_actual_revision(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(5)).await.unwrap();
    match store.append(&s, ExpectedRevision::Exact(0), events(1)).await {
        Err(Error::WrongExpectedVersion {
            stream: reported,
            expected,
            actual,
        }) => {
            assert_eq!(reported, s);
            assert_eq!(expected, ExpectedRevision::Exact(0));
            assert_eq!(actual, Some(4));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// Appending the same ids right after the same expected revision again
/// returns the original result and writes nothing, even after the stream
/// moved on.
pub async fn idempotent_retry_returns_the_original_result(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(1)).await.unwrap();
    let batch = events(2);
    let original = store
        .append(&s, ExpectedRevision::Exact(0), batch.clone())
        .await
        .unwrap();
    // A retry re-sends the same ids; its payload may differ (a command
    // decided again carries a new timestamp), and what is stored stays the
    // original.
    let mut retried_batch = batch.clone();
    retried_batch[0].metadata = br#"{"retry":true}"#.to_vec();
    let retry = store
        .append(&s, ExpectedRevision::Exact(0), retried_batch)
        .await
        .unwrap();
    assert!(!original.replayed && retry.replayed, "only the retry is a replay");
    assert_eq!(
        (retry.current_revision, retry.position),
        (original.current_revision, original.position)
    );
    store.append(&s, ExpectedRevision::Exact(2), events(1)).await.unwrap();
    let mut late_batch = batch;
    late_batch[1].metadata = br#"{"late":true}"#.to_vec();
    let late_retry = store.append(&s, ExpectedRevision::Exact(0), late_batch).await.unwrap();
    assert!(late_retry.replayed);
    assert_eq!(
        (late_retry.current_revision, late_retry.position),
        (original.current_revision, original.position)
    );
    assert_eq!(read(&store, &s).await.len(), 4, "retries wrote nothing");
}

/// A retried `NoStream` append of the same ids is a no-op too.
pub async fn idempotent_retry_after_no_stream(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let batch = events(3);
    let original = store
        .append(&s, ExpectedRevision::NoStream, batch.clone())
        .await
        .unwrap();
    let mut retried_batch = batch;
    retried_batch[2].data = br#"{"retry":true}"#.to_vec();
    let retry = store
        .append(&s, ExpectedRevision::NoStream, retried_batch)
        .await
        .unwrap();
    assert!(retry.replayed);
    assert_eq!(
        (retry.current_revision, retry.position),
        (original.current_revision, original.position)
    );
    assert_eq!(read(&store, &s).await.len(), 3);
}

/// When only some of the ids are stored, or not right after the expected
/// revision, the append fails and writes nothing.
pub async fn partial_idempotent_match_fails(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let batch = events(2);
    store
        .append(&s, ExpectedRevision::NoStream, batch.clone())
        .await
        .unwrap();
    let mut longer = batch.clone();
    longer.push(event("Tested"));
    assert_conflict(
        store.append(&s, ExpectedRevision::NoStream, longer).await,
        ExpectedRevision::NoStream,
        Some(1),
    );
    // The second id is stored, the first is new: a conflict where ids are
    // unique. (KurrentDB checks only the ids after the expected revision, so
    // it would store the second one again.)
    if store.enforces_unique_event_ids() {
        let mut shifted = vec![event("Tested")];
        shifted.push(batch[1].clone());
        assert_conflict(
            store.append(&s, ExpectedRevision::Exact(1), shifted).await,
            ExpectedRevision::Exact(1),
            Some(1),
        );
    }
    // The ids are stored, but not right after the expected revision.
    store.append(&s, ExpectedRevision::Exact(1), events(1)).await.unwrap();
    assert_conflict(
        store.append(&s, ExpectedRevision::Exact(0), batch).await,
        ExpectedRevision::Exact(0),
        Some(2),
    );
    assert_eq!(read(&store, &s).await.len(), 3, "failed appends wrote nothing");
}

/// An append whose events are stored, expecting a revision no stream can
/// reach, is a conflict, and the store goes on serving appends.
pub async fn a_stored_id_under_an_unreachable_revision_conflicts(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let batch = events(1);
    store
        .append(&s, ExpectedRevision::NoStream, batch.clone())
        .await
        .unwrap();
    let retry = store.append(&s, ExpectedRevision::Exact(u64::MAX), batch).await;
    assert_conflict(retry, ExpectedRevision::Exact(u64::MAX), Some(0));
    let other = stream("ticket");
    let next = store.append(&other, ExpectedRevision::NoStream, events(1)).await;
    assert_eq!(next.expect("the store still appends").current_revision, 0);
}

/// An event is found by its id, whole (stream, revision, position, payload),
/// on the backends that index ids across streams; an id never stored is
/// `None` everywhere, and so is every id where ids are not indexed.
pub async fn read_event_finds_an_event_by_id(store: Arc<dyn EventStore>) {
    let first = stream("ticket");
    let second = stream("ticket");
    store
        .append(&first, ExpectedRevision::NoStream, events(2))
        .await
        .unwrap();
    store
        .append(&second, ExpectedRevision::NoStream, events(3))
        .await
        .unwrap();
    assert_eq!(store.read_event(Uuid::new_v4()).await.unwrap(), None);
    for stored in read(&store, &first)
        .await
        .into_iter()
        .chain(read(&store, &second).await)
    {
        let found = store.read_event(stored.id).await.unwrap();
        if store.enforces_unique_event_ids() {
            assert_eq!(found.as_ref(), Some(&stored));
        } else {
            assert_eq!(found, None, "a store without an id index answers None");
        }
    }
}

/// An event id stored in one stream cannot be appended to another, on the
/// backends that say they enforce it.
pub async fn event_ids_are_unique_across_streams(store: Arc<dyn EventStore>) {
    if !store.enforces_unique_event_ids() {
        let first = stream("ticket");
        let second = stream("ticket");
        let batch = events(1);
        store
            .append(&first, ExpectedRevision::NoStream, batch.clone())
            .await
            .unwrap();
        store.append(&second, ExpectedRevision::NoStream, batch).await.unwrap();
        assert_eq!(read(&store, &second).await.len(), 1, "per-stream idempotency only");
        return;
    }
    let first = stream("ticket");
    let second = stream("ticket");
    let batch = events(1);
    store
        .append(&first, ExpectedRevision::NoStream, batch.clone())
        .await
        .unwrap();
    assert_conflict(
        store.append(&second, ExpectedRevision::NoStream, batch).await,
        ExpectedRevision::NoStream,
        None,
    );
    assert!(matches!(
        store.read_stream(&second, ReadStream::forwards()).await,
        Err(Error::StreamNotFound { .. })
    ));
}

/// An append whose last event fails writes none of its events.
pub async fn appends_are_atomic(store: Arc<dyn EventStore>) {
    let existing = stream("ticket");
    let stored = events(1);
    store
        .append(&existing, ExpectedRevision::NoStream, stored.clone())
        .await
        .unwrap();
    let s = stream("ticket");
    let mut batch = events(3);
    if store.enforces_unique_event_ids() {
        // The last event's id is taken.
        batch.push(stored[0].clone());
    } else {
        // The last event is too large for the server's append limit.
        let mut huge = event("Huge");
        huge.data = vec![b'x'; MAX_EVENT_BYTES / 2 + 1];
        huge.metadata = vec![b'x'; MAX_EVENT_BYTES / 2 - 1];
        batch.push(huge);
    }
    let refused = store.append(&s, ExpectedRevision::NoStream, batch).await;
    if store.enforces_unique_event_ids() {
        assert!(
            refused.as_ref().is_err_and(Error::is_wrong_expected_version),
            "{refused:?}"
        );
    } else {
        assert!(matches!(refused, Err(Error::AppendTooLarge { .. })), "{refused:?}");
    }
    assert!(matches!(
        store.read_stream(&s, ReadStream::forwards()).await,
        Err(Error::StreamNotFound { .. })
    ));
    let head = store.head_position().await.unwrap();
    let log = read_whole_log(&store).await;
    assert_eq!(log.len(), 1, "only the first stream's event is in $all");
    assert_eq!(head, Some(log[0].position));
}

/// Oversized, empty and self-duplicating appends, and event types that no
/// backend can store, are typed errors.
pub async fn invalid_appends_are_rejected_without_writing(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let mut huge = event("Huge");
    huge.data = vec![b'x'; MAX_EVENT_BYTES + 1];
    assert!(matches!(
        store.append(&s, ExpectedRevision::Any, vec![huge]).await,
        Err(Error::EventTooLarge { .. })
    ));
    assert!(matches!(
        store.append(&s, ExpectedRevision::Any, vec![]).await,
        Err(Error::EmptyAppend { .. })
    ));
    // PostgreSQL's text cannot hold U+0000: every backend refuses it alike.
    for event_type in ["", "Ticket\0Opened", "Ticket\nOpened"] {
        assert!(
            matches!(
                store.append(&s, ExpectedRevision::Any, vec![event(event_type)]).await,
                Err(Error::InvalidEventType { .. })
            ),
            "event type {event_type:?}"
        );
    }
    let twice = event("Twice");
    assert!(matches!(
        store
            .append(&s, ExpectedRevision::Any, vec![twice.clone(), twice])
            .await,
        Err(Error::DuplicateEventIdInAppend { .. })
    ));
    assert!(matches!(
        store.read_stream(&s, ReadStream::forwards()).await,
        Err(Error::StreamNotFound { .. })
    ));
    assert_eq!(store.head_position().await.unwrap(), None);
}

/// Every field given at append time comes back unchanged.
pub async fn recorded_events_round_trip(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let before = SystemTime::now() - Duration::from_secs(5);
    let mut original = event("TicketOpened");
    original.data = "{\"subject\":\"naïve — ✓\"}".as_bytes().to_vec();
    original.metadata = vec![0, 1, 2, 255];
    store
        .append(&s, ExpectedRevision::NoStream, vec![original.clone()])
        .await
        .unwrap();
    let stored = read(&store, &s).await.remove(0);
    assert_eq!(stored.stream, s);
    assert_eq!(stored.revision, 0);
    assert_eq!(stored.id, original.id);
    assert_eq!(stored.event_type, original.event_type);
    assert_eq!(stored.data, original.data);
    assert_eq!(stored.metadata, original.metadata);
    assert!(stored.recorded_at >= before && stored.recorded_at <= SystemTime::now() + Duration::from_secs(5));
}

/// Streams read oldest first or newest first.
pub async fn read_stream_forwards_and_backwards(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let other = stream("ticket");
    for _ in 0..3 {
        store.append(&s, ExpectedRevision::Any, events(1)).await.unwrap();
        store.append(&other, ExpectedRevision::Any, events(1)).await.unwrap();
    }
    let forwards = read(&store, &s).await;
    assert_eq!(forwards.iter().map(|e| e.revision).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(forwards.iter().all(|e| e.stream == s));
    let backwards = store.read_stream(&s, ReadStream::backwards()).await.unwrap();
    assert_eq!(backwards.iter().map(|e| e.revision).collect::<Vec<_>>(), [2, 1, 0]);
}

/// Reads start at a revision (inclusive) and stop at the limit.
pub async fn read_stream_from_revision_with_limit(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(10)).await.unwrap();
    let page = store
        .read_stream(&s, ReadStream::forwards().from_revision(4).limit(3))
        .await
        .unwrap();
    assert_eq!(page.iter().map(|e| e.revision).collect::<Vec<_>>(), [4, 5, 6]);
    let back = store
        .read_stream(&s, ReadStream::backwards().from_revision(4).limit(2))
        .await
        .unwrap();
    assert_eq!(back.iter().map(|e| e.revision).collect::<Vec<_>>(), [4, 3]);
    let past_end = store
        .read_stream(&s, ReadStream::forwards().from_revision(10))
        .await
        .unwrap();
    assert!(
        past_end.is_empty(),
        "a read past the end of an existing stream is empty"
    );
    let last = store.read_stream(&s, ReadStream::backwards().limit(1)).await.unwrap();
    assert_eq!(last[0].revision, 9);
}

/// A stream with no events is a typed not-found.
pub async fn missing_stream_is_not_found(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    match store.read_stream(&s, ReadStream::forwards()).await {
        Err(Error::StreamNotFound { stream: reported }) => assert_eq!(reported, s),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    assert!(matches!(
        store.read_stream(&s, ReadStream::backwards().limit(1)).await,
        Err(Error::StreamNotFound { .. })
    ));
    // From a revision, in either direction: still not found, not empty.
    assert!(matches!(
        store.read_stream(&s, ReadStream::forwards().from_revision(2)).await,
        Err(Error::StreamNotFound { .. })
    ));
    assert!(matches!(
        store.read_stream(&s, ReadStream::backwards().from_revision(3)).await,
        Err(Error::StreamNotFound { .. })
    ));
}

/// Reads racing a stream's first append see it missing or whole: never
/// empty, which would claim the stream exists and holds nothing.
pub async fn a_stream_being_created_reads_as_missing_or_whole(store: Arc<dyn EventStore>) {
    const STREAMS: usize = 100;
    const READERS: usize = 3;
    for _ in 0..STREAMS {
        let s = stream("ticket");
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let (store, s) = (store.clone(), s.clone());
            // Each reader reads until it sees the stream, so that reads are
            // under way at the moment the append commits.
            readers.push(tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + WAIT;
                loop {
                    match store.read_stream(&s, ReadStream::forwards()).await {
                        Err(Error::StreamNotFound { .. }) if tokio::time::Instant::now() < deadline => {}
                        other => return other,
                    }
                }
            }));
        }
        store.append(&s, ExpectedRevision::NoStream, events(2)).await.unwrap();
        for reader in readers {
            match reader.await.unwrap() {
                Ok(read) => assert_eq!(read.len(), 2, "a read saw {s} empty or part-written: {read:?}"),
                Err(other) => panic!("reading {s} while it was created failed: {other}"),
            }
        }
    }
}

/// `$all` reads include their start position, in both directions.
pub async fn read_all_forwards_and_backwards_from_position(store: Arc<dyn EventStore>) {
    let a = stream("ticket");
    let b = stream("other");
    for _ in 0..4 {
        store.append(&a, ExpectedRevision::Any, events(1)).await.unwrap();
        store.append(&b, ExpectedRevision::Any, events(1)).await.unwrap();
    }
    let all = store.read_all(ReadAll::forwards(100)).await.unwrap();
    assert_eq!(all.len(), 8);
    let third = all[2].position;
    let from_third = store.read_all(ReadAll::forwards(3).from_position(third)).await.unwrap();
    assert_eq!(
        from_third.iter().map(|e| e.id).collect::<Vec<_>>(),
        all[2..5].iter().map(|e| e.id).collect::<Vec<_>>()
    );
    let backwards = store.read_all(ReadAll::backwards(100)).await.unwrap();
    assert_eq!(
        backwards.iter().map(|e| e.id).collect::<Vec<_>>(),
        all.iter().rev().map(|e| e.id).collect::<Vec<_>>()
    );
    let back_from_third = store
        .read_all(ReadAll::backwards(10).from_position(third))
        .await
        .unwrap();
    assert_eq!(
        back_from_third.iter().map(|e| e.id).collect::<Vec<_>>(),
        all[..3].iter().rev().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(store.head_position().await.unwrap(), Some(all[7].position));
}

/// Positions strictly increase in append order across streams.
pub async fn positions_strictly_increase(store: Arc<dyn EventStore>) {
    let mut last = Position::START;
    for round in 0..20 {
        let s = stream(if round % 2 == 0 { "ticket" } else { "other" });
        let result = store
            .append(&s, ExpectedRevision::Any, events(1 + round % 3))
            .await
            .unwrap();
        assert!(result.position > last, "{} is not after {}", result.position, last);
        last = result.position;
    }
    let log = read_whole_log(&store).await;
    assert!(log.windows(2).all(|pair| pair[0].position < pair[1].position));
    assert_eq!(log.last().map(|e| e.position), Some(last));
}

/// 64 tasks race `Exact(n)` appends on one stream: for every revision exactly
/// one writer wins, every loser gets the actual revision, and the stream
/// holds exactly the winners' events.
pub async fn racing_exact_appends_exactly_one_wins(store: Arc<dyn EventStore>) {
    const WRITERS: usize = 64;
    const ROUNDS: u64 = 5;
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(1)).await.unwrap();
    for round in 0..ROUNDS {
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = Vec::with_capacity(WRITERS);
        for _ in 0..WRITERS {
            let store = store.clone();
            let s = s.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let batch = events(2);
                let id = batch[0].id;
                barrier.wait().await;
                (id, store.append(&s, ExpectedRevision::Exact(round * 2), batch).await)
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            let (id, result) = task.await.unwrap();
            match result {
                Ok(result) => {
                    assert_eq!(result.current_revision, round * 2 + 2);
                    winners.push(id);
                }
                Err(Error::WrongExpectedVersion { actual, .. }) => {
                    assert_eq!(actual, Some(round * 2 + 2), "losers see the winner's revision");
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one writer wins round {round}");
        let stored = read(&store, &s).await;
        assert_eq!(stored[(round * 2 + 1) as usize].id, winners[0]);
    }
    assert_eq!(read(&store, &s).await.len() as u64, 1 + 2 * ROUNDS);
}

/// Many tasks append concurrently to many streams: every stream ends up with
/// consecutive revisions and every event is in `$all` exactly once.
pub async fn racing_appends_on_many_streams_keep_every_stream_consecutive(store: Arc<dyn EventStore>) {
    const TASKS: usize = 32;
    const APPENDS: usize = 20;
    let streams: Vec<_> = (0..4).map(|_| stream("ticket")).collect();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        let streams = streams.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for append in 0..APPENDS {
                let s = &streams[(task + append) % streams.len()];
                let batch = events(1 + append % 2);
                written.extend(batch.iter().map(|e| e.id));
                store.append(s, ExpectedRevision::Any, batch).await.unwrap();
            }
            written
        }));
    }
    let mut expected_ids = HashSet::new();
    for task in tasks {
        expected_ids.extend(task.await.unwrap());
    }
    let log = read_whole_log(&store).await;
    let logged: Vec<Uuid> = log.iter().map(|e| e.id).collect();
    assert_eq!(logged.len(), expected_ids.len(), "each event exactly once in $all");
    assert_eq!(logged.iter().copied().collect::<HashSet<_>>(), expected_ids);
    assert!(log.windows(2).all(|pair| pair[0].position < pair[1].position));
    let mut by_stream: BTreeMap<&StreamName, Vec<u64>> = BTreeMap::new();
    for e in &log {
        by_stream.entry(&e.stream).or_default().push(e.revision);
    }
    for (name, revisions) in by_stream {
        let expected: Vec<u64> = (0..revisions.len() as u64).collect();
        assert_eq!(revisions, expected, "{name} has consecutive revisions in log order");
    }
}

/// A subscription from the start delivers history, says `CaughtUp`, then
/// delivers new events as they are appended.
pub async fn subscription_catches_up_then_goes_live(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    store.append(&s, ExpectedRevision::NoStream, events(3)).await.unwrap();
    let mut subscription = store.clone().subscribe_to_all(SubscribeToAll::default());
    let history = next_events(&mut subscription, 3).await;
    assert_eq!(history.iter().map(|e| e.revision).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(next_message(&mut subscription).await, SubscriptionMessage::CaughtUp);
    store.append(&s, ExpectedRevision::Exact(2), events(2)).await.unwrap();
    let live = next_events(&mut subscription, 2).await;
    assert_eq!(live.iter().map(|e| e.revision).collect::<Vec<_>>(), [3, 4]);
}

/// A subscription started after a position, while writers keep appending,
/// sees every later event exactly once and in position order.
pub async fn subscription_started_mid_way_sees_every_later_event_once(store: Arc<dyn EventStore>) {
    const WRITERS: usize = 8;
    const APPENDS: usize = 40;
    for _ in 0..10 {
        store
            .append(&stream("ticket"), ExpectedRevision::NoStream, events(1))
            .await
            .unwrap();
    }
    let history = read_whole_log(&store).await;
    let start = history[4].position;
    let mut subscription = store.clone().subscribe_to_all(SubscribeToAll::after(start));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let s = stream("ticket");
            for _ in 0..APPENDS {
                store.append(&s, ExpectedRevision::Any, events(1)).await.unwrap();
            }
        }));
    }
    let expected_count = 5 + WRITERS * APPENDS;
    let received = next_events(&mut subscription, expected_count).await;
    for writer in writers {
        writer.await.unwrap();
    }
    let log = read_whole_log(&store).await;
    let expected: Vec<Uuid> = log.iter().filter(|e| e.position > start).map(|e| e.id).collect();
    assert_eq!(received.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    // Nothing more arrives: no duplicates after the last event, and the
    // subscription is still open and healthy when the wait ends.
    let extra = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match subscription.next().await {
                Some(Ok(SubscriptionMessage::Event(event))) => return format!("an extra event: {event:?}"),
                Some(Ok(_)) => continue,
                Some(Err(error)) => return format!("an error: {error}"),
                None => return "the end of the subscription".to_owned(),
            }
        }
    })
    .await;
    assert!(
        extra.is_err(),
        "after the last event came {}",
        extra.unwrap_or_default()
    );
}

/// A stream-prefix filter delivers only matching events, and checkpoints
/// advance past non-matching ones so that a consumer can save progress.
pub async fn subscription_filters_by_stream_prefix_with_checkpoints(store: Arc<dyn EventStore>) {
    let wanted = stream("ticket");
    let noise = stream("noise");
    store.append(&wanted, ExpectedRevision::Any, events(1)).await.unwrap();
    store.append(&noise, ExpectedRevision::Any, events(100)).await.unwrap();
    store.append(&wanted, ExpectedRevision::Any, events(1)).await.unwrap();
    let head = store.head_position().await.unwrap().unwrap();
    let mut subscription = store
        .clone()
        .subscribe_to_all(SubscribeToAll::default().filtered(EventFilter::StreamPrefix(vec!["ticket-".to_owned()])));
    let mut delivered = Vec::new();
    let mut checkpoints = Vec::new();
    loop {
        match next_message(&mut subscription).await {
            SubscriptionMessage::Event(event) => delivered.push(event),
            SubscriptionMessage::Checkpoint(position) => checkpoints.push(position),
            SubscriptionMessage::CaughtUp => break,
        }
    }
    assert_eq!(delivered.len(), 2);
    assert!(delivered.iter().all(|e| e.stream == wanted));
    assert!(
        checkpoints.len() >= 3,
        "102 considered events give at least 3 checkpoints, got {checkpoints:?}"
    );
    assert!(checkpoints.windows(2).all(|pair| pair[0] <= pair[1]));
    assert_eq!(checkpoints.last(), Some(&head), "the caught-up checkpoint is the head");
    // Live: non-matching events still move checkpoints on.
    store.append(&noise, ExpectedRevision::Any, events(40)).await.unwrap();
    let new_head = store.head_position().await.unwrap().unwrap();
    let live_checkpoint = loop {
        match next_message(&mut subscription).await {
            SubscriptionMessage::Checkpoint(position) => break position,
            SubscriptionMessage::Event(event) => panic!("noise event delivered: {event:?}"),
            SubscriptionMessage::CaughtUp => {}
        }
    };
    assert!(live_checkpoint > head && live_checkpoint <= new_head);
}

/// An event-type filter delivers only matching types.
pub async fn subscription_filters_by_event_type(store: Arc<dyn EventStore>) {
    let s = stream("ticket");
    let batch = vec![event("TicketOpened"), event("Noise"), event("TicketClassified")];
    store.append(&s, ExpectedRevision::NoStream, batch).await.unwrap();
    let mut subscription = store
        .clone()
        .subscribe_to_all(SubscribeToAll::default().filtered(EventFilter::EventTypePrefix(vec!["Ticket".to_owned()])));
    let delivered = next_events(&mut subscription, 2).await;
    assert_eq!(
        delivered.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(),
        ["TicketOpened", "TicketClassified"]
    );
}
