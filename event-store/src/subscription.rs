//! Subscriptions to the global log: catch up from a position, then stay live.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};

use crate::{AllStart, Direction, EventStore, Position, ReadAll, RecordedEvent, Result};

/// A server-side filter, as EventStoreDB offers: on stream name prefixes or
/// on event type prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventFilter {
    /// Events whose stream name starts with one of these.
    StreamPrefix(Vec<String>),
    /// Events whose type starts with one of these.
    EventTypePrefix(Vec<String>),
}

impl EventFilter {
    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        match self {
            EventFilter::StreamPrefix(prefixes) => prefixes
                .iter()
                .any(|prefix| event.stream.as_str().starts_with(prefix.as_str())),
            EventFilter::EventTypePrefix(prefixes) => prefixes
                .iter()
                .any(|prefix| event.event_type.starts_with(prefix.as_str())),
        }
    }
}

/// Options of [`EventStore::subscribe_to_all`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeToAll {
    /// Start after this position; `None` starts at the beginning of the log.
    pub from: Option<Position>,
    /// Deliver only the events that match.
    pub filter: Option<EventFilter>,
    /// With a filter, emit a [`SubscriptionMessage::Checkpoint`] after this
    /// many considered events, matching or not.
    pub checkpoint_interval: u32,
}

impl Default for SubscribeToAll {
    fn default() -> Self {
        SubscribeToAll {
            from: None,
            filter: None,
            checkpoint_interval: 32,
        }
    }
}

impl SubscribeToAll {
    /// Starts after `position`.
    pub fn after(position: Position) -> Self {
        SubscribeToAll {
            from: Some(position),
            ..Self::default()
        }
    }

    /// Adds a filter.
    pub fn filtered(self, filter: EventFilter) -> Self {
        SubscribeToAll {
            filter: Some(filter),
            ..self
        }
    }
}

/// What a subscription delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionMessage {
    /// The next event after the previous one, in position order.
    Event(RecordedEvent),
    /// Every event up to this position was considered: a consumer may save
    /// it as its checkpoint even when no event matched.
    Checkpoint(Position),
    /// The subscription has delivered everything stored when it caught up
    /// and is now live.
    CaughtUp,
}

/// A live subscription to `$all`: a [`Stream`] of messages. Dropping it stops
/// the reader.
#[derive(Debug)]
pub struct Subscription {
    receiver: mpsc::Receiver<Result<SubscriptionMessage>>,
}

/// Events read ahead per page while catching up.
const PAGE_SIZE: usize = 1024;

impl Subscription {
    /// A subscription that any backend can offer: it pages through
    /// [`EventStore::read_all`] and, once caught up, waits for `head` to
    /// change before reading again.
    ///
    /// Skipping nothing relies on the backend's promise that an event is
    /// readable only once every event with a lower position is; a backend
    /// that cannot promise that (PostgreSQL sequences) must hold reads below
    /// its visibility watermark.
    pub fn catch_up<S>(store: Arc<S>, options: SubscribeToAll, head: watch::Receiver<Option<Position>>) -> Self
    where
        S: EventStore + ?Sized,
    {
        Self::catch_up_polling(store, options, head, None)
    }

    /// [`Subscription::catch_up`] that, once caught up, also reads again
    /// every `poll` without waiting for `head`: for a backend whose `head`
    /// only hears of this process's own appends (a SQLite file another
    /// process appends to).
    pub fn catch_up_polling<S>(
        store: Arc<S>,
        options: SubscribeToAll,
        head: watch::Receiver<Option<Position>>,
        poll: Option<Duration>,
    ) -> Self
    where
        S: EventStore + ?Sized,
    {
        // A small buffer: the reader runs one page ahead of the consumer.
        let (sender, receiver) = mpsc::channel(PAGE_SIZE);
        tokio::spawn(run_catch_up(store, options, head, sender, poll));
        Subscription { receiver }
    }

    /// Wraps a channel fed by a backend's native subscription.
    pub fn from_channel(receiver: mpsc::Receiver<Result<SubscriptionMessage>>) -> Self {
        Subscription { receiver }
    }

    /// The next message; `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Result<SubscriptionMessage>> {
        self.receiver.recv().await
    }

    /// The next message if one is ready now, without waiting.
    pub fn try_next(&mut self) -> Option<Result<SubscriptionMessage>> {
        self.receiver.try_recv().ok()
    }
}

impl Stream for Subscription {
    type Item = Result<SubscriptionMessage>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

async fn run_catch_up<S>(
    store: Arc<S>,
    options: SubscribeToAll,
    mut head: watch::Receiver<Option<Position>>,
    sender: mpsc::Sender<Result<SubscriptionMessage>>,
    poll: Option<Duration>,
) where
    S: EventStore + ?Sized,
{
    let mut last_seen = options.from;
    let mut caught_up = false;
    let mut considered_since_checkpoint: u32 = 0;
    let interval = options.checkpoint_interval.max(1);
    loop {
        // Mark the head as seen before reading: a commit after this point
        // changes it again, so the wait below cannot miss it.
        head.borrow_and_update();
        let from = last_seen.map_or(AllStart::Boundary, AllStart::Position);
        let page = match store
            .read_all(ReadAll {
                direction: Direction::Forwards,
                from,
                max_count: PAGE_SIZE + 1,
            })
            .await
        {
            Ok(page) => page,
            Err(error) => {
                let _ = sender.send(Err(error)).await;
                return;
            }
        };
        let mut new_events = 0;
        for event in page {
            // Reads include their start; subscriptions start after it.
            if Some(event.position) <= last_seen {
                continue;
            }
            new_events += 1;
            last_seen = Some(event.position);
            let position = event.position;
            let message = match &options.filter {
                Some(filter) => {
                    considered_since_checkpoint += 1;
                    let matched = filter.matches(&event);
                    let checkpoint_due = considered_since_checkpoint >= interval;
                    if matched && sender.send(Ok(SubscriptionMessage::Event(event))).await.is_err() {
                        return;
                    }
                    if checkpoint_due {
                        considered_since_checkpoint = 0;
                        Some(SubscriptionMessage::Checkpoint(position))
                    } else {
                        None
                    }
                }
                None => Some(SubscriptionMessage::Event(event)),
            };
            if let Some(message) = message
                && sender.send(Ok(message)).await.is_err()
            {
                return;
            }
        }
        if new_events > 0 {
            continue;
        }
        if !caught_up {
            caught_up = true;
            if options.filter.is_some() {
                considered_since_checkpoint = 0;
                let checkpoint = last_seen.unwrap_or(Position::START);
                if sender
                    .send(Ok(SubscriptionMessage::Checkpoint(checkpoint)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if sender.send(Ok(SubscriptionMessage::CaughtUp)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    // The store was dropped: end the subscription.
                    return;
                }
            }
            () = sender.closed() => return,
            () = async {
                match poll {
                    Some(poll) => tokio::time::sleep(poll).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}
