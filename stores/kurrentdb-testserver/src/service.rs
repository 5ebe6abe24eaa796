//! `streams.Streams`: `Append` and `Read` (stream reads, `$all` reads and
//! `$all` subscriptions) over the [`Log`].

// `tonic::Status` is the error type the generated trait dictates; boxing it
// in the helpers would only be undone at the trait boundary.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ::uuid::Uuid;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::MAX_APPEND_SIZE;
use crate::log::{AppendOutcome, Expected, Log, Proposed, StoredEvent};
use crate::proto::event_store::client::streams::append_req;
use crate::proto::event_store::client::streams::append_resp::{self, success, wrong_expected_version};
use crate::proto::event_store::client::streams::read_req::options::{
    self as read_options, AllOptions, CountOption, FilterOption, StreamOption, StreamOptions, all_options,
    filter_options, stream_options,
};
use crate::proto::event_store::client::streams::read_resp::{self, read_event};
use crate::proto::event_store::client::streams::streams_server::{Streams, StreamsServer};
use crate::proto::event_store::client::streams::{
    AppendReq, AppendResp, BatchAppendReq, BatchAppendResp, DeleteReq, DeleteResp, ReadReq, ReadResp, TombstoneReq,
    TombstoneResp,
};
use crate::proto::event_store::client::{Empty, StreamIdentifier, uuid as proto_uuid};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Events a subscription reads from the log at a time.
const SUBSCRIPTION_PAGE: usize = 512;

/// Checkpoint interval of a filtered subscription with a `count` window.
const CHECKPOINT_INTERVAL: u32 = 32;

/// Faults a test can switch on while the server runs.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Every append waits this long (milliseconds) before it is applied.
    pub(crate) append_delay_ms: AtomicU64,
    /// When set, the server is a follower of the leader at this address:
    /// reads and appends are refused with KurrentDB's "not leader" answer,
    /// which names the leader.
    pub(crate) leader: std::sync::Mutex<Option<std::net::SocketAddr>>,
    /// Read requests served (not a fault: what tests count round trips by).
    pub(crate) reads: AtomicU64,
}

impl Faults {
    /// KurrentDB's answer to a leader-only request sent to a follower: the
    /// `not-leader` exception with the leader's endpoint in the metadata.
    fn refuse_if_follower(&self) -> Result<(), Status> {
        let leader = *self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(leader) = leader else {
            return Ok(());
        };
        let mut status = Status::not_found("Leader info available");
        let metadata = status.metadata_mut();
        metadata.insert("exception", "not-leader".parse().expect("ASCII"));
        metadata.insert("leader-endpoint-host", leader.ip().to_string().parse().expect("ASCII"));
        metadata.insert(
            "leader-endpoint-port",
            leader.port().to_string().parse().expect("ASCII"),
        );
        Err(status)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct StreamsService {
    log: Arc<Log>,
    shutdown: watch::Receiver<bool>,
    faults: Arc<Faults>,
}

impl StreamsService {
    pub(crate) fn new(log: Arc<Log>, shutdown: watch::Receiver<bool>, faults: Arc<Faults>) -> Self {
        StreamsService { log, shutdown, faults }
    }

    pub(crate) fn into_server(self) -> StreamsServer<Self> {
        // The client sends up to 1 MiB per append plus framing.
        StreamsServer::new(self).max_decoding_message_size(4 * MAX_APPEND_SIZE)
    }
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

fn not_implemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not implemented by the Triage KurrentDB test double (only Append and Read are)"
    ))
}

#[tonic::async_trait]
impl Streams for StreamsService {
    type ReadStream = ResponseStream<ReadResp>;
    type BatchAppendStream = ResponseStream<BatchAppendResp>;

    async fn read(&self, request: Request<ReadReq>) -> Result<Response<Self::ReadStream>, Status> {
        self.faults.refuse_if_follower()?;
        self.faults.reads.fetch_add(1, Ordering::Relaxed);
        let options = request
            .into_inner()
            .options
            .ok_or_else(|| invalid("ReadReq.options is required"))?;
        let structured_ids = matches!(
            options.uuid_option.as_ref().and_then(|option| option.content.as_ref()),
            Some(read_options::uuid_option::Content::Structured(_))
        );
        let filter = Filter::parse(options.filter_option)?;
        let backwards = options.read_direction == read_options::ReadDirection::Backwards as i32;
        let encoder = Encoder { structured_ids };
        match (options.stream_option, options.count_option) {
            (Some(StreamOption::Stream(stream)), Some(CountOption::Count(count))) => {
                let messages = read_stream(&self.log, stream, backwards, count, encoder)?;
                Ok(Response::new(Box::pin(tokio_stream::iter(
                    messages.into_iter().map(Ok),
                ))))
            }
            (Some(StreamOption::All(all)), Some(CountOption::Count(count))) => {
                let messages = read_all(&self.log, all, backwards, count, &filter, encoder)?;
                Ok(Response::new(Box::pin(tokio_stream::iter(
                    messages.into_iter().map(Ok),
                ))))
            }
            (Some(StreamOption::All(all)), Some(CountOption::Subscription(_))) => {
                if backwards {
                    return Err(invalid("subscriptions read forwards"));
                }
                let (sender, receiver) = mpsc::channel(256);
                let subscription = SubscriptionTask {
                    log: self.log.clone(),
                    shutdown: self.shutdown.clone(),
                    sender,
                    filter,
                    encoder,
                };
                tokio::spawn(subscription.run(all));
                Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
            }
            (Some(StreamOption::Stream(_)), Some(CountOption::Subscription(_))) => {
                Err(not_implemented("a stream subscription"))
            }
            _ => Err(invalid("ReadReq.options needs a stream option and a count option")),
        }
    }

    async fn append(&self, request: Request<Streaming<AppendReq>>) -> Result<Response<AppendResp>, Status> {
        self.faults.refuse_if_follower()?;
        let mut messages = request.into_inner();
        let first = messages
            .message()
            .await?
            .ok_or_else(|| invalid("an append starts with its options"))?;
        let Some(append_req::Content::Options(options)) = first.content else {
            return Err(invalid("an append starts with its options"));
        };
        let stream = options
            .stream_identifier
            .map(|identifier| identifier.stream_name)
            .filter(|name| !name.is_empty())
            .ok_or_else(|| invalid("an append needs a stream name"))?;
        let expected = match options.expected_stream_revision {
            // As the server: a revision is read as a signed 64-bit number,
            // u64::MAX (-1) meaning "no stream" and anything else above
            // i64::MAX an internal error.
            Some(append_req::options::ExpectedStreamRevision::Revision(u64::MAX)) => Expected::NoStream,
            Some(append_req::options::ExpectedStreamRevision::Revision(n)) if i64::try_from(n).is_err() => {
                return Err(Status::unknown(format!("revision {n} is out of range")));
            }
            Some(append_req::options::ExpectedStreamRevision::Revision(n)) => Expected::Exact(n),
            Some(append_req::options::ExpectedStreamRevision::NoStream(_)) => Expected::NoStream,
            Some(append_req::options::ExpectedStreamRevision::Any(_)) => Expected::Any,
            Some(append_req::options::ExpectedStreamRevision::StreamExists(_)) => Expected::StreamExists,
            None => return Err(invalid("an append needs an expected stream revision")),
        };
        // Read the whole request before answering, as the server does.
        let mut proposed = Vec::new();
        let mut size = 0;
        while let Some(message) = messages.message().await? {
            let Some(append_req::Content::ProposedMessage(mut event)) = message.content else {
                return Err(invalid("an append sends its options once, first"));
            };
            size += event.data.len() + event.custom_metadata.len();
            if size > MAX_APPEND_SIZE {
                let mut status = invalid(format!("Maximum Append Size of {MAX_APPEND_SIZE} Exceeded."));
                status
                    .metadata_mut()
                    .insert("exception", "maximum-append-size-exceeded".parse().expect("ascii"));
                status.metadata_mut().insert(
                    "maximum-append-size",
                    MAX_APPEND_SIZE.to_string().parse().expect("ascii"),
                );
                return Err(status);
            }
            let id = parse_uuid(event.id.as_ref())?;
            let event_type = event
                .metadata
                .remove("type")
                .filter(|event_type| !event_type.is_empty())
                .ok_or_else(|| invalid(format!("event {id} has no type")))?;
            let content_type = event
                .metadata
                .remove("content-type")
                .unwrap_or_else(|| "application/octet-stream".to_owned());
            proposed.push(Proposed {
                id,
                event_type,
                content_type,
                custom_metadata: event.custom_metadata,
                data: event.data,
            });
        }
        let delay = self.faults.append_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let result = match self.log.append(&stream, expected, proposed) {
            AppendOutcome::Success {
                current_revision,
                position,
            } => append_resp::Result::Success(append_resp::Success {
                current_revision_option: Some(success::CurrentRevisionOption::CurrentRevision(current_revision)),
                position_option: Some(success::PositionOption::Position(append_resp::Position {
                    commit_position: position.0,
                    prepare_position: position.1,
                })),
            }),
            AppendOutcome::WrongExpectedVersion { current, expected } => {
                append_resp::Result::WrongExpectedVersion(wrong_expected_version_message(current, expected))
            }
        };
        Ok(Response::new(AppendResp { result: Some(result) }))
    }

    async fn delete(&self, _request: Request<DeleteReq>) -> Result<Response<DeleteResp>, Status> {
        Err(not_implemented("Streams/Delete"))
    }

    async fn tombstone(&self, _request: Request<TombstoneReq>) -> Result<Response<TombstoneResp>, Status> {
        Err(not_implemented("Streams/Tombstone"))
    }

    async fn batch_append(
        &self,
        _request: Request<Streaming<BatchAppendReq>>,
    ) -> Result<Response<Self::BatchAppendStream>, Status> {
        Err(not_implemented("Streams/BatchAppend"))
    }
}

/// The conflict answer, with the current fields and the pre-20.6 ones that
/// older clients read.
fn wrong_expected_version_message(current: Option<u64>, expected: Expected) -> append_resp::WrongExpectedVersion {
    use wrong_expected_version::{
        CurrentRevisionOption, CurrentRevisionOption2060, ExpectedRevisionOption, ExpectedRevisionOption2060,
    };
    let (current_now, current_old) = match current {
        Some(revision) => (
            CurrentRevisionOption::CurrentRevision(revision),
            CurrentRevisionOption2060::CurrentRevision2060(revision),
        ),
        None => (
            CurrentRevisionOption::CurrentNoStream(Empty {}),
            CurrentRevisionOption2060::NoStream2060(Empty {}),
        ),
    };
    let (expected_now, expected_old) = match expected {
        Expected::Exact(n) => (
            ExpectedRevisionOption::ExpectedRevision(n),
            ExpectedRevisionOption2060::ExpectedRevision2060(n),
        ),
        Expected::Any => (
            ExpectedRevisionOption::ExpectedAny(Empty {}),
            ExpectedRevisionOption2060::Any2060(Empty {}),
        ),
        Expected::StreamExists => (
            ExpectedRevisionOption::ExpectedStreamExists(Empty {}),
            ExpectedRevisionOption2060::StreamExists2060(Empty {}),
        ),
        // The old fields had no "no stream" expectation.
        Expected::NoStream => (
            ExpectedRevisionOption::ExpectedNoStream(Empty {}),
            ExpectedRevisionOption2060::Any2060(Empty {}),
        ),
    };
    append_resp::WrongExpectedVersion {
        current_revision_option_20_6_0: Some(current_old),
        expected_revision_option_20_6_0: Some(expected_old),
        current_revision_option: Some(current_now),
        expected_revision_option: Some(expected_now),
    }
}

fn parse_uuid(id: Option<&crate::proto::event_store::client::Uuid>) -> Result<Uuid, Status> {
    match id.and_then(|id| id.value.as_ref()) {
        Some(proto_uuid::Value::String(text)) => {
            Uuid::parse_str(text).map_err(|_| invalid(format!("{text:?} is not a UUID")))
        }
        Some(proto_uuid::Value::Structured(parts)) => Ok(Uuid::from_u64_pair(
            parts.most_significant_bits as u64,
            parts.least_significant_bits as u64,
        )),
        None => Err(invalid("every proposed event needs an id")),
    }
}

/// A server-side filter on `$all`.
#[derive(Clone, Debug, Default)]
struct Filter {
    /// `None`: no filter.
    rule: Option<(FilterOn, Vec<String>)>,
    /// Considered events between checkpoints.
    checkpoint_interval: u32,
}

#[derive(Clone, Copy, Debug)]
enum FilterOn {
    StreamName,
    EventType,
}

impl Filter {
    fn parse(option: Option<FilterOption>) -> Result<Self, Status> {
        let options = match option {
            None | Some(FilterOption::NoFilter(_)) => return Ok(Filter::default()),
            Some(FilterOption::Filter(options)) => options,
        };
        let (on, expression) = match options.filter {
            Some(filter_options::Filter::StreamIdentifier(expression)) => (FilterOn::StreamName, expression),
            Some(filter_options::Filter::EventType(expression)) => (FilterOn::EventType, expression),
            None => return Err(invalid("a filter needs a stream-name or an event-type expression")),
        };
        if !expression.regex.is_empty() {
            return Err(not_implemented("a regex filter"));
        }
        let window = match options.window {
            Some(filter_options::Window::Max(max)) => max.max(1),
            _ => CHECKPOINT_INTERVAL,
        };
        Ok(Filter {
            rule: Some((on, expression.prefix)),
            checkpoint_interval: window.saturating_mul(options.checkpoint_interval_multiplier.max(1)),
        })
    }

    fn is_filtered(&self) -> bool {
        self.rule.is_some()
    }

    fn matches(&self, event: &StoredEvent) -> bool {
        match &self.rule {
            None => true,
            Some((FilterOn::StreamName, prefixes)) => prefixes
                .iter()
                .any(|prefix| event.stream.starts_with(prefix.as_bytes())),
            Some((FilterOn::EventType, prefixes)) => prefixes
                .iter()
                .any(|prefix| event.event_type().starts_with(prefix.as_str())),
        }
    }
}

/// Builds response messages in the id format the client asked for.
#[derive(Clone, Copy, Debug)]
struct Encoder {
    structured_ids: bool,
}

impl Encoder {
    fn uuid(self, id: Uuid) -> crate::proto::event_store::client::Uuid {
        let value = if self.structured_ids {
            let (most, least) = id.as_u64_pair();
            proto_uuid::Value::Structured(proto_uuid::Structured {
                most_significant_bits: most as i64,
                least_significant_bits: least as i64,
            })
        } else {
            proto_uuid::Value::String(id.hyphenated().to_string())
        };
        crate::proto::event_store::client::Uuid { value: Some(value) }
    }

    fn event(self, event: &StoredEvent) -> ReadResp {
        let recorded = read_event::RecordedEvent {
            id: Some(self.uuid(event.id)),
            stream_identifier: Some(StreamIdentifier {
                stream_name: event.stream.clone(),
            }),
            stream_revision: event.revision,
            prepare_position: event.prepare,
            commit_position: event.commit,
            metadata: event.metadata.clone(),
            custom_metadata: event.custom_metadata.clone(),
            data: event.data.clone(),
        };
        content(read_resp::Content::Event(read_resp::ReadEvent {
            event: Some(recorded),
            link: None,
            position: Some(read_event::Position::CommitPosition(event.commit)),
        }))
    }
}

async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopped| *stopped).await;
}

fn content(content: read_resp::Content) -> ReadResp {
    ReadResp { content: Some(content) }
}

fn timestamp_now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

fn read_stream(
    log: &Log,
    options: StreamOptions,
    backwards: bool,
    count: u64,
    encoder: Encoder,
) -> Result<Vec<ReadResp>, Status> {
    let identifier = options
        .stream_identifier
        .ok_or_else(|| invalid("a stream read needs a stream name"))?;
    let Some(events) = log.stream(&identifier.stream_name) else {
        return Ok(vec![content(read_resp::Content::StreamNotFound(
            read_resp::StreamNotFound {
                stream_identifier: Some(identifier),
            },
        ))]);
    };
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let last = events.len() as u64 - 1;
    let selected: Vec<&Arc<StoredEvent>> = match (options.revision_option, backwards) {
        (Some(stream_options::RevisionOption::Revision(from)), false) => {
            events.iter().filter(|e| e.revision >= from).take(count).collect()
        }
        (Some(stream_options::RevisionOption::Revision(from)), true) => {
            events.iter().rev().filter(|e| e.revision <= from).take(count).collect()
        }
        (Some(stream_options::RevisionOption::Start(_)), false) => events.iter().take(count).collect(),
        (Some(stream_options::RevisionOption::Start(_)), true) => {
            events.iter().filter(|e| e.revision == 0).take(count).collect()
        }
        (Some(stream_options::RevisionOption::End(_)), false) => events.iter().filter(|e| e.revision > last).collect(),
        (Some(stream_options::RevisionOption::End(_)), true) => events.iter().rev().take(count).collect(),
        (None, _) => return Err(invalid("a stream read needs a start revision")),
    };
    Ok(selected.into_iter().map(|event| encoder.event(event)).collect())
}

fn read_all(
    log: &Log,
    options: AllOptions,
    backwards: bool,
    count: u64,
    filter: &Filter,
    encoder: Encoder,
) -> Result<Vec<ReadResp>, Status> {
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let all = log.all();
    let matching = |event: &&Arc<StoredEvent>| filter.matches(event);
    let selected: Vec<&Arc<StoredEvent>> = match (options.all_option, backwards) {
        (Some(all_options::AllOption::Start(_)), false) => all.iter().filter(matching).take(count).collect(),
        (Some(all_options::AllOption::Start(_)), true) | (Some(all_options::AllOption::End(_)), false) => Vec::new(),
        (Some(all_options::AllOption::End(_)), true) => all.iter().rev().filter(matching).take(count).collect(),
        // Forwards from a position includes it; backwards excludes it.
        (Some(all_options::AllOption::Position(p)), false) => {
            let from = (p.commit_position, p.prepare_position);
            all.iter()
                .filter(|e| e.position() >= from)
                .filter(matching)
                .take(count)
                .collect()
        }
        (Some(all_options::AllOption::Position(p)), true) => {
            let before = (p.commit_position, p.prepare_position);
            all.iter()
                .rev()
                .filter(|e| e.position() < before)
                .filter(matching)
                .take(count)
                .collect()
        }
        (None, _) => return Err(invalid("an $all read needs a start position")),
    };
    Ok(selected.into_iter().map(|event| encoder.event(event)).collect())
}

/// One `$all` subscription: confirmation, catch-up, `CaughtUp`, then live.
struct SubscriptionTask {
    log: Arc<Log>,
    shutdown: watch::Receiver<bool>,
    sender: mpsc::Sender<Result<ReadResp, Status>>,
    filter: Filter,
    encoder: Encoder,
}

impl SubscriptionTask {
    async fn run(mut self, start: AllOptions) {
        let confirmation = read_resp::SubscriptionConfirmation {
            subscription_id: Uuid::new_v4().to_string(),
        };
        if !self.send(read_resp::Content::Confirmation(confirmation)).await {
            return;
        }
        let mut appended = self.log.subscribe();
        // A subscription from a position starts after it.
        let (mut next_index, mut last_considered) = match start.all_option {
            Some(all_options::AllOption::Position(p)) => {
                let after = (p.commit_position, p.prepare_position);
                let index = self.log.all().partition_point(|e| e.position() <= after);
                (index, Some(after))
            }
            Some(all_options::AllOption::End(_)) => {
                let all = self.log.all();
                (all.len(), all.last().map(|e| e.position()))
            }
            _ => (0, None),
        };
        let mut caught_up = false;
        let mut considered: u32 = 0;
        loop {
            appended.borrow_and_update();
            let page = self.log.page_from(next_index, SUBSCRIPTION_PAGE);
            if page.is_empty() {
                if !caught_up {
                    caught_up = true;
                    if self.filter.is_filtered() {
                        considered = 0;
                        let (commit, prepare) = last_considered.unwrap_or((0, 0));
                        if !self.checkpoint(commit, prepare).await {
                            return;
                        }
                    }
                    let head = self.log.all().last().map(|e| read_resp::Position {
                        commit_position: e.commit,
                        prepare_position: e.prepare,
                    });
                    let caught_up_message = read_resp::CaughtUp {
                        timestamp: Some(timestamp_now()),
                        stream_revision: None,
                        position: head,
                    };
                    if !self.send(read_resp::Content::CaughtUp(caught_up_message)).await {
                        return;
                    }
                }
                tokio::select! {
                    changed = appended.changed() => if changed.is_err() { return },
                    _ = wait_for_shutdown(&mut self.shutdown) => {
                        let _ = self.sender.send(Err(Status::unavailable("the server is shutting down"))).await;
                        return;
                    }
                    () = self.sender.closed() => return,
                }
                continue;
            }
            for event in page {
                next_index += 1;
                last_considered = Some(event.position());
                if self.filter.matches(&event) && self.sender.send(Ok(self.encoder.event(&event))).await.is_err() {
                    return;
                }
                if self.filter.is_filtered() {
                    considered += 1;
                    if considered >= self.filter.checkpoint_interval {
                        considered = 0;
                        if !self.checkpoint(event.commit, event.prepare).await {
                            return;
                        }
                    }
                }
            }
            let stopping = *self.shutdown.borrow();
            if stopping {
                let _ = self
                    .sender
                    .send(Err(Status::unavailable("the server is shutting down")))
                    .await;
                return;
            }
        }
    }

    async fn checkpoint(&self, commit: u64, prepare: u64) -> bool {
        let checkpoint = read_resp::Checkpoint {
            commit_position: commit,
            prepare_position: prepare,
            timestamp: Some(timestamp_now()),
        };
        self.send(read_resp::Content::Checkpoint(checkpoint)).await
    }

    async fn send(&self, message: read_resp::Content) -> bool {
        self.sender.send(Ok(content(message))).await.is_ok()
    }
}
