//! Keeps the store's head watch current: LISTEN on a dedicated connection
//! for the fast path, polling as the fallback.
//!
//! The watch holds the *visible* head (the highest position below the
//! watermark), never the highest committed one, so a subscriber woken by it
//! finds exactly what it may deliver. The head only moves forward.
//!
//! Why both: `triage_append` notifies at commit, which wakes subscribers
//! within a round trip. But the watermark can also move without any
//! notification, when the transaction holding it back is not an append
//! (any writing transaction on the cluster holds xmin), and a LISTEN
//! connection can drop; the poll every `poll_interval` covers both.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio_postgres::{AsyncMessage, Config, NoTls};
use triage_event_store::Position;

use crate::Target;
use crate::reader::{Sql, heads};

/// Starts the listener and the head refresher; the store aborts them when
/// it is dropped.
pub(crate) fn start(
    target: Arc<Target>,
    pool: Pool,
    sql: Arc<Sql>,
    head: Arc<watch::Sender<Option<Position>>>,
    wake: Arc<Notify>,
    poll_interval: Duration,
) -> Vec<AbortHandle> {
    let listener = tokio::spawn(listen_forever(
        target.config.clone(),
        crate::schema::channel(&target.schema),
        Arc::clone(&wake),
    ));
    let refresher = tokio::spawn(refresh_forever(target, pool, sql, head, wake, poll_interval));
    vec![listener.abort_handle(), refresher.abort_handle()]
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

async fn listen_forever(config: Config, channel: String, wake: Arc<Notify>) {
    let mut pause = Duration::from_millis(100);
    loop {
        match listen(&config, &channel, &wake).await {
            Ok(()) => tracing::warn!(channel, "the LISTEN connection closed; reconnecting"),
            Err(error) => {
                tracing::warn!(channel, %error, "the LISTEN connection failed; polling until it is back");
            }
        }
        // Whatever was notified meanwhile is found by the next read.
        wake.notify_one();
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Listens until the connection ends. The connection is driven by hand
/// (`poll_message`) because notifications arrive only through it.
async fn listen(config: &Config, channel: &str, wake: &Notify) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!(r#"LISTEN "{channel}""#);
    let subscribe = client.batch_execute(&statement);
    tokio::pin!(subscribe);
    let mut listening = false;
    loop {
        tokio::select! {
            result = &mut subscribe, if !listening => {
                result?;
                listening = true;
                // Appends that committed before LISTEN took effect.
                wake.notify_one();
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
        }
    }
}
