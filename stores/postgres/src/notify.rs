//! Keeps the store's head watch current: LISTEN on a dedicated connection
//! for the fast path, polling as the fallback; and announces this
//! process's appends to the other processes with NOTIFY.
//!
//! The watch holds the *visible* head (the highest position below the
//! watermark), never the highest committed one, so a subscriber woken by it
//! finds exactly what it may deliver. The head only moves forward.
//!
//! Why both: a notification wakes subscribers within a round trip. But the
//! watermark can also move without any notification, when the transaction
//! holding it back is not an append of a Triage store (any writing
//! transaction on the cluster holds xmin), a LISTEN connection can drop,
//! and a notification can be lost (see below); the poll every
//! `poll_interval` covers all of them.
//!
//! # Announcing appends
//! Appends do not notify inside their own transaction: PostgreSQL takes
//! one cluster-wide lock at the commit of every transaction that notified
//! and holds it through the commit's WAL flush, so notifying appends would
//! commit and fsync one at a time. Instead, an append that committed asks
//! the announcer for a notification, and the announcer sends `NOTIFY` in a
//! transaction of its own on a connection of its own, opened at the first
//! append. Requests coalesce: however many appends commit while one
//! `NOTIFY` is on its way, one more follows it, and every append that
//! returned is followed by a `NOTIFY` that started after its commit, so the
//! listeners that it wakes read heads that include it. The announcer's
//! connection commits asynchronously (`synchronous_commit = off`): its
//! transactions write nothing but the notification, and they hold the
//! watermark back (they take a transaction id) only for as long as they
//! run.
//!
//! A notification is only a wake-up, never a source of positions: one that
//! is lost (the process stops between its commit and the announcement, the
//! announcer's connection is down) or late costs latency, up to one
//! `poll_interval`, never an event. Subscribers of this process do not
//! depend on it: the append wakes the head refresher directly, and the
//! listener ignores the notifications of this store's own announcer.
//!
//! # Reconnecting
//! The listener and the announcer reconnect after their connection ends,
//! pausing between attempts: the pause doubles (0.1 s up to 5 s) while
//! attempts fail or connections drop soon after they start, and is back
//! to 0.1 s after a connection that served for 5 s or more, so a
//! connection dropped after a day of service is replaced at once, and one
//! that a server or proxy keeps dropping is retried every 5 s, not
//! hammered.
//!
//! # Only for subscribers
//! The refresher reads the head only while a subscription of this process
//! waits on it; a writer with no subscribers pays no query per append.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio_postgres::{AsyncMessage, Client};
use triage_event_store::Position;

use crate::Target;
use crate::reader::{Sql, heads};
use crate::tls::PgUrl;

/// Starts the listener, the head refresher and the announcer; the store
/// aborts them when it is dropped.
pub(crate) fn start(
    target: Arc<Target>,
    pool: Pool,
    sql: Arc<Sql>,
    head: Arc<watch::Sender<Option<Position>>>,
    wake: Arc<Notify>,
    announce: Arc<Notify>,
    poll_interval: Duration,
) -> Vec<AbortHandle> {
    let channel = crate::schema::channel(&target.schema);
    // The announcer's backend, whose notifications the listener ignores:
    // this process's subscribers were woken by the appends themselves.
    let announcer_pid = Arc::new(AtomicI32::new(0));
    let listener = tokio::spawn(listen_forever(
        server(&target),
        channel.clone(),
        Arc::clone(&wake),
        Arc::clone(&announcer_pid),
    ));
    let announcer = tokio::spawn(announce_forever(server(&target), channel, announce, announcer_pid));
    let refresher = tokio::spawn(refresh_forever(target, pool, sql, head, wake, poll_interval));
    vec![
        listener.abort_handle(),
        announcer.abort_handle(),
        refresher.abort_handle(),
    ]
}

async fn refresh_forever(
    target: Arc<Target>,
    pool: Pool,
    sql: Arc<Sql>,
    head: Arc<watch::Sender<Option<Position>>>,
    wake: Arc<Notify>,
    poll_interval: Duration,
) {
    let poll_interval = poll_interval.max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(poll_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set while committed events are hidden behind an older transaction.
    let mut recheck: Option<Duration> = None;
    loop {
        let soon = async {
            match recheck {
                Some(pause) => tokio::time::sleep(pause).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticks.tick() => {}
            () = wake.notified() => {}
            () = soon => {}
        }
        // Nobody in this process waits on the head: leave it as it is. It
        // only has to move when a subscriber waits for it to, and a new
        // subscriber reads everything visible before it waits, so the next
        // wake-up or tick after it subscribed is soon enough. This keeps a
        // busy writer from paying a head query per append for nothing.
        if head.receiver_count() == 0 {
            recheck = None;
            continue;
        }
        let found = match pool.get().await {
            Ok(client) => heads(&client, &sql, &target).await,
            Err(error) => Err(crate::pool_error(&target, error)),
        };
        match found {
            Ok(found) => {
                let visible = found.visible_position();
                head.send_if_modified(|current| {
                    let moved = visible > *current;
                    if moved {
                        *current = visible;
                    }
                    moved
                });
                // Something committed is not visible yet: an older
                // transaction is still in flight, and nothing may notify
                // when it ends (it may not be an append, or its
                // notification came first). Appends are short, so look
                // again soon, backing off to the poll interval, rather
                // than leave subscribers waiting for the next poll.
                recheck = (found.top > found.visible)
                    .then(|| recheck.map_or(Duration::from_millis(1), |pause| (pause * 2).min(poll_interval)));
            }
            Err(error) => {
                recheck = None;
                tracing::warn!(%error, "cannot refresh the head position; retrying at the next poll");
            }
        }
    }
}

/// The pauses between connection attempts: doubling from [`Self::FIRST`]
/// up to [`Self::MOST`] while attempts fail, and back to the first after a
/// connection that served for [`Self::MOST`] or more, so that a connection
/// that drops after hours of service is back within [`Self::FIRST`], not
/// after the longest pause the failures of another day grew to. One that
/// drops as soon as it served (a proxy closing sessions, a server in a
/// crash loop) counts as a failure: resetting then would reconnect ten
/// times a second.
#[derive(Debug)]
struct Reconnect {
    next: Duration,
}

impl Reconnect {
    const FIRST: Duration = Duration::from_millis(100);
    const MOST: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Reconnect { next: Self::FIRST }
    }

    /// The pause before the next attempt, after a connection that ended
    /// having served (listened, notified) for `served`, zero if it never
    /// did.
    fn pause_after(&mut self, served: Duration) -> Duration {
        if served >= Self::MOST {
            self.next = Self::FIRST;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MOST);
        pause
    }
}

/// How long a connection served, from when it started serving.
fn served(since: Option<Instant>) -> Duration {
    since.map_or(Duration::ZERO, |since| since.elapsed())
}

/// Where the store's own connections go, and how they are secured.
fn server(target: &Target) -> PgUrl {
    PgUrl {
        config: target.config.clone(),
        tls: target.tls.clone(),
    }
}

async fn listen_forever(server: PgUrl, channel: String, wake: Arc<Notify>, announcer_pid: Arc<AtomicI32>) {
    let mut reconnect = Reconnect::new();
    loop {
        let mut listening_since = None;
        match listen(&server, &channel, &wake, &announcer_pid, &mut listening_since).await {
            Ok(()) => tracing::warn!(channel, "the LISTEN connection closed; reconnecting"),
            Err(error) => {
                tracing::warn!(channel, error = %crate::describe_error(&error), "the LISTEN connection failed; polling until it is back");
            }
        }
        // Whatever was notified meanwhile is found by the next read.
        wake.notify_one();
        tokio::time::sleep(reconnect.pause_after(served(listening_since))).await;
    }
}

/// Listens until the connection ends; `listening_since` is set when
/// LISTEN takes effect. The connection is driven by hand (`poll_message`) because
/// notifications arrive only through it.
async fn listen(
    server: &PgUrl,
    channel: &str,
    wake: &Notify,
    announcer_pid: &AtomicI32,
    listening_since: &mut Option<Instant>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = server.config.connect(server.tls.clone()).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!(r#"LISTEN "{channel}""#);
    let subscribe = client.batch_execute(&statement);
    tokio::pin!(subscribe);
    loop {
        tokio::select! {
            result = &mut subscribe, if listening_since.is_none() => {
                result?;
                *listening_since = Some(Instant::now());
                // Appends that committed before LISTEN took effect.
                wake.notify_one();
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(notification)))
                    if notification.process_id() == announcer_pid.load(Ordering::Relaxed) => {}
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
        }
    }
}

/// Sends a `NOTIFY` whenever `pending` was notified since the last one; see
/// the module docs. Connects at the first request, and again after the
/// connection ended.
async fn announce_forever(server: PgUrl, channel: String, pending: Arc<Notify>, pid: Arc<AtomicI32>) {
    let statement = format!(r#"NOTIFY "{channel}""#);
    let mut reconnect = Reconnect::new();
    loop {
        pending.notified().await;
        let mut notifying_since = None;
        // Whether a request was taken and its NOTIFY not sent yet.
        let mut owed = true;
        match announce(&server, &statement, &pending, &pid, &mut notifying_since, &mut owed).await {
            Ok(()) => tracing::warn!(channel, "the NOTIFY connection closed; reconnecting"),
            Err(error) => {
                tracing::warn!(channel, error = %crate::describe_error(&error), "the NOTIFY connection failed; other processes poll until it is back");
            }
        }
        // A request taken but not sent is sent once the connection is
        // back; a connection that ended idle is opened again at the next
        // request, not to send a NOTIFY nobody asked for.
        if owed {
            pending.notify_one();
        }
        tokio::time::sleep(reconnect.pause_after(served(notifying_since))).await;
    }
}

/// Announces on one connection until it ends; `notifying_since` is set
/// when the first `NOTIFY` went out, and `owed` is false while every
/// request taken was sent.
async fn announce(
    server: &PgUrl,
    statement: &str,
    pending: &Notify,
    pid: &AtomicI32,
    notifying_since: &mut Option<Instant>,
    owed: &mut bool,
) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = server.config.connect(server.tls.clone()).await?;
    let ended = tokio::select! {
        result = connection => result,
        result = send_notifications(&client, statement, pending, pid, notifying_since, owed) => result,
    };
    // The session is over, and the server may give its process id to
    // another process's announcer: the listener must not ignore that one's
    // notifications. No backend has process id 0.
    pid.store(0, Ordering::Relaxed);
    ended
}

/// The first `NOTIFY` goes out at once, for the request that connected.
async fn send_notifications(
    client: &Client,
    statement: &str,
    pending: &Notify,
    pid: &AtomicI32,
    notifying_since: &mut Option<Instant>,
    owed: &mut bool,
) -> Result<(), tokio_postgres::Error> {
    // Each NOTIFY is a transaction of its own that writes nothing else: it
    // need not wait for a WAL flush.
    client.batch_execute("SET synchronous_commit = off").await?;
    pid.store(
        client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0),
        Ordering::Relaxed,
    );
    loop {
        client.batch_execute(statement).await?;
        *owed = false;
        notifying_since.get_or_insert_with(Instant::now);
        pending.notified().await;
        *owed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_while_connections_fail_and_restart_after_one_served() {
        let mut reconnect = Reconnect::new();
        let failing: Vec<u64> = (0..8)
            .map(|_| reconnect.pause_after(Duration::ZERO).as_millis() as u64)
            .collect();
        assert_eq!(failing, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(reconnect.pause_after(Reconnect::MOST), Reconnect::FIRST);
        assert_eq!(reconnect.pause_after(Duration::ZERO), Duration::from_millis(200));
    }

    #[test]
    fn a_connection_dropped_right_after_it_served_is_a_failure() {
        let mut reconnect = Reconnect::new();
        let flapping: Vec<u64> = (0..8)
            .map(|_| reconnect.pause_after(Duration::from_millis(50)).as_millis() as u64)
            .collect();
        assert_eq!(flapping, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
