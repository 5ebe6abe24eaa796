//! The SQL of one store and the reads: streams, `$all` below the watermark,
//! and the heads the watermark is measured by.
//!
//! # The watermark
//! An event is *visible* when its `tx_id` (the top-level transaction id
//! that wrote it) is below `pg_snapshot_xmin(pg_current_snapshot())` of the
//! reading statement: every transaction below that xmin has finished, so no
//! event with such a `tx_id` can still appear. `triage_append` (see
//! `schema.rs`) keeps positions in the order of transaction ids, so the
//! visible events are exactly a gap-free prefix of the log: an event from a
//! slower transaction with a lower position stays invisible, and so does
//! every later one, until the slower transaction ends. Reads of `$all` and
//! the head never go past the highest visible position, so a reader that
//! goes on from its last position never skips an event.
//!
//! Stream reads need no watermark: a stream's revisions are written in
//! order (each append is planned from the committed last revision and the
//! unique `(stream, revision)` refuses anything else), so the committed
//! part of a stream never has a hole.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::{Client, Pool};
use tokio_postgres::Row;
use triage_event_store::{AllStart, Direction, Error, Position, ReadAll, ReadStream, RecordedEvent, StreamName};
use triage_event_store::{Result, StreamStart};
use uuid::Uuid;

use crate::Target;

/// Every statement the store runs, with the schema filled in once.
#[derive(Debug)]
pub(crate) struct Sql {
    /// `(current, event_id, stream, revision, position)`: the stream's last
    /// committed revision on every row, and one row per already-stored id.
    pub(crate) append_state: String,
    /// Appends a batch; per append, the first revision and the last
    /// position, or why not (see `triage_append`).
    pub(crate) append: String,
    read_stream_forwards: String,
    read_stream_backwards: String,
    stream_exists: String,
    read_event: String,
    read_all_forwards: String,
    read_all_backwards: String,
    /// `(top, visible)`: the highest committed position, and the highest
    /// position below the watermark.
    heads: String,
}

/// The highest position below the watermark, as a sub-select.
fn visible_top(s: &str) -> String {
    format!(
        r#"(SELECT position FROM "{s}".triage_events
            WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
            ORDER BY tx_id DESC, position DESC LIMIT 1)"#
    )
}

const EVENT_COLUMNS: &str = "position, stream, revision, event_id, event_type, data, metadata, recorded_at";

impl Sql {
    pub(crate) fn new(s: &str) -> Self {
        let top = visible_top(s);
        Sql {
            append_state: format!(
                r#"SELECT c.current, e.event_id, e.stream, e.revision, e.position
                   FROM (SELECT max(revision) AS current FROM "{s}".triage_events WHERE stream = $1) c
                   LEFT JOIN "{s}".triage_events e ON e.event_id = ANY ($2)"#
            ),
            append: format!(
                r#"SELECT first_revision, last_position, conflict, actual_revision
                   FROM "{s}".triage_append($1, $2, $3, $4, $5, $6, $7, $8)"#
            ),
            read_stream_forwards: format!(
                r#"SELECT {EVENT_COLUMNS} FROM "{s}".triage_events
                   WHERE stream = $1 AND revision >= $2 ORDER BY revision ASC LIMIT $3"#
            ),
            read_stream_backwards: format!(
                r#"SELECT {EVENT_COLUMNS} FROM "{s}".triage_events
                   WHERE stream = $1 AND revision <= $2 ORDER BY revision DESC LIMIT $3"#
            ),
            stream_exists: format!(r#"SELECT EXISTS (SELECT 1 FROM "{s}".triage_events WHERE stream = $1)"#),
            read_event: format!(r#"SELECT {EVENT_COLUMNS} FROM "{s}".triage_events WHERE event_id = $1"#),
            // A page of `$all` is the first `$2` rows from `$1` in the order
            // of the primary key (the inner select), of which only those
            // below the watermark are returned (the outer filters). The two
            // levels keep the plan an ordered walk of the primary key that
            // stops after the page, whatever the statistics say:
            // - `position >= $1 AND position <= (visible head)` in one scan is a
            //   range whose upper end the planner cannot know, so it assumes
            //   a tiny range (0.5 % of the table, ~1,000 rows at 200k
            //   events), below the page size; it then preferred a bitmap scan
            //   and sorted every remaining row of the log, for each page
            //   (100-170 ms a page after a bulk load). A select with a LIMIT
            //   is planned on its own, so the upper bound stays outside it.
            // - `(SELECT $1)` hides the start from the planner, so the
            //   estimate does not come from a histogram taken when the table
            //   was small (it takes the whole table, from its current size).
            // - `(SELECT pg_snapshot_xmin(…))` is taken once per statement,
            //   not once per row: the same value (one statement, one
            //   snapshot), without building a snapshot copy for every row.
            // Every returned row passes the same two tests as before (at or
            // below the visible head, tx_id below the watermark), so the
            // read never goes past the watermark. The visible rows are a
            // gap-free prefix of the log (see triage_append), so the page
            // holds the same rows as a page of the visible prefix; the rows
            // the filters drop can only lie above the visible head.
            read_all_forwards: format!(
                r#"SELECT {EVENT_COLUMNS} FROM (
                       SELECT {EVENT_COLUMNS}, tx_id FROM "{s}".triage_events
                       WHERE position >= (SELECT $1::bigint)
                       ORDER BY position ASC LIMIT $2
                   ) page
                   WHERE position <= {top}
                     AND tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                   ORDER BY position ASC"#
            ),
            // Backwards the page starts at or below the visible head, so
            // the head bound stays in the walk; the tx_id test (implied by
            // the bound, see triage_append) is applied to the page.
            read_all_backwards: format!(
                r#"SELECT {EVENT_COLUMNS} FROM (
                       SELECT {EVENT_COLUMNS}, tx_id FROM "{s}".triage_events
                       WHERE position <= (SELECT $1::bigint) AND position <= {top}
                       ORDER BY position DESC LIMIT $2
                   ) page
                   WHERE tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                   ORDER BY position DESC"#
            ),
            heads: format!(r#"SELECT (SELECT max(position) FROM "{s}".triage_events), {top}"#),
        }
    }
}

/// The two heads, read in one statement (one snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Heads {
    /// The highest committed position, visible or not.
    pub(crate) top: Option<i64>,
    /// The highest position below the watermark.
    pub(crate) visible: Option<i64>,
}

impl Heads {
    pub(crate) fn visible_position(self) -> Option<Position> {
        self.visible.map(|position| Position::from_sequence(position as u64))
    }
}

pub(crate) async fn heads(client: &Client, sql: &Sql, target: &Target) -> Result<Heads> {
    let statement = client
        .prepare_cached(&sql.heads)
        .await
        .map_err(|e| target.db_error("cannot prepare the head query", e))?;
    let row = client
        .query_one(&statement, &[])
        .await
        .map_err(|e| target.db_error("cannot read the head position", e))?;
    Ok(Heads {
        top: row.get(0),
        visible: row.get(1),
    })
}

/// Waits until everything committed when it was called is below the
/// watermark, for at most `wait`, and returns the heads then. With
/// `enough`, it also stops waiting once every position up to `enough` is
/// below the watermark: a read of a range that ends there needs no more.
///
/// This is what makes reads read-your-writes: an append that returned is
/// committed, but its events stay invisible while an older transaction is
/// in flight. Appends are short, so the wait usually ends in a few
/// milliseconds. A transaction that stays open (or any long transaction
/// holding an xid on the cluster: xmin is cluster-wide) ends the wait at
/// the deadline, and the read answers with the visible prefix, which is
/// still gap-free.
pub(crate) async fn settled_heads(
    client: &Client,
    sql: &Sql,
    target: &Target,
    wait: Duration,
    enough: Option<i64>,
) -> Result<Heads> {
    let (heads, _) = settle(Looker::Client(client), sql, target, wait, enough).await?;
    Ok(heads)
}

/// [`settled_heads`] holding no connection while it waits: each look at
/// the heads takes a pooled connection and gives it back. A read that
/// waits on a transaction left open on the cluster would otherwise hold
/// its connection for the whole wait, and enough such readers would leave
/// appends waiting for one. Returns the heads and what is left of `wait`.
pub(crate) async fn settled_heads_pooled(
    pool: &Pool,
    sql: &Sql,
    target: &Target,
    wait: Duration,
    enough: Option<i64>,
) -> Result<(Heads, Duration)> {
    settle(Looker::Pool(pool), sql, target, wait, enough).await
}

/// Where [`settle`] reads the heads.
#[derive(Clone, Copy)]
enum Looker<'a> {
    /// On the caller's connection.
    Client(&'a Client),
    /// On a pooled connection taken for each look.
    Pool(&'a Pool),
}

impl Looker<'_> {
    /// The oldest transaction on the cluster that holds a transaction id,
    /// as `pid …, database …, open for …`: what holds the watermark back.
    /// `None` when none is found or the server does not say (a role
    /// without `pg_read_all_stats` sees little of other roles' sessions).
    async fn oldest_transaction(self) -> Option<String> {
        const OLDEST: &str = "SELECT pid, coalesce(datname, '?'), \
               coalesce(extract(epoch FROM now() - xact_start)::bigint, -1) \
             FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
             ORDER BY age(backend_xid) DESC LIMIT 1";
        let row = match self {
            Looker::Client(client) => client.query_opt(OLDEST, &[]).await.ok()?,
            Looker::Pool(pool) => pool.get().await.ok()?.query_opt(OLDEST, &[]).await.ok()?,
        }?;
        let (pid, database, seconds): (i32, String, i64) = (row.get(0), row.get(1), row.get(2));
        let open_for = if seconds >= 0 {
            format!(", open for {seconds} s")
        } else {
            String::new()
        };
        Some(format!("pid {pid}, database {database}{open_for}"))
    }

    async fn look(self, sql: &Sql, target: &Target) -> Result<Heads> {
        match self {
            Looker::Client(client) => heads(client, sql, target).await,
            Looker::Pool(pool) => {
                let client = pool.get().await.map_err(|error| crate::pool_error(target, error))?;
                match tokio::time::timeout(target.query_timeout, heads(&client, sql, target)).await {
                    Ok(heads) => heads,
                    Err(_elapsed) => {
                        // Its answer may still come: not back to the pool.
                        drop(deadpool_postgres::Object::take(client));
                        Err(target.unanswered("reading the head of $all", false))
                    }
                }
            }
        }
    }
}

/// The waiting of [`settled_heads`].
async fn settle(
    looker: Looker<'_>,
    sql: &Sql,
    target: &Target,
    wait: Duration,
    enough: Option<i64>,
) -> Result<(Heads, Duration)> {
    let first = looker.look(sql, target).await?;
    // From the first look on: waiting for a pooled connection to look with
    // does not use up the wait.
    let deadline = Instant::now() + wait;
    let left = || deadline.saturating_duration_since(Instant::now());
    let Some(goal) = first.top else {
        return Ok((first, wait));
    };
    let settled =
        |heads: Heads| heads.visible >= Some(goal) || enough.is_some_and(|enough| heads.visible >= Some(enough));
    if settled(first) {
        return Ok((first, wait));
    }
    let mut pause = Duration::from_millis(1);
    loop {
        let now = Instant::now();
        if now >= deadline {
            let last = looker.look(sql, target).await?;
            warn_held_back(looker, goal, last.visible).await;
            return Ok((last, Duration::ZERO));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
        let current = looker.look(sql, target).await?;
        if settled(current) {
            return Ok((current, left()));
        }
    }
}

/// When [`warn_held_back`] last warned, in seconds since the epoch.
static LAST_HELD_BACK_WARNING: AtomicU64 = AtomicU64::new(0);

/// Says, at most every 30 s per process, that reads answer without
/// committed events because an older transaction is still open: the
/// watermark is cluster-wide, so a transaction left open in any database
/// of the server holds back what every Triage reader sees (lists, `$all`,
/// projections) until it ends. Silent, this looked like lost writes.
async fn warn_held_back(looker: Looker<'_>, goal: i64, visible: Option<i64>) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let last = LAST_HELD_BACK_WARNING.load(Ordering::Relaxed);
    if now < last + 30
        || LAST_HELD_BACK_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        tracing::debug!(?goal, ?visible, "a read stopped waiting for older transactions");
        return;
    }
    let blocker = looker
        .oldest_transaction()
        .await
        .unwrap_or_else(|| "not visible to this role".to_owned());
    tracing::warn!(
        committed_up_to = goal,
        visible_up_to = ?visible,
        oldest_transaction = %blocker,
        "reads cannot see committed events yet: an older transaction on the PostgreSQL server is still open \
         (in any database: the watermark is server-wide); they become visible when it ends"
    );
}

/// Reads one stream; `Err(StreamNotFound)` when it has no events.
pub(crate) async fn read_stream(
    client: &Client,
    sql: &Sql,
    target: &Target,
    stream: &StreamName,
    options: ReadStream,
) -> Result<Vec<RecordedEvent>> {
    let failed = |e| target.db_error("cannot read a stream", e);
    let limit = to_sql_int(options.max_count as u64);
    let (query, from) = match (options.direction, options.from) {
        (Direction::Forwards, StreamStart::Boundary) => (&sql.read_stream_forwards, 0),
        (Direction::Forwards, StreamStart::Revision(revision)) => (&sql.read_stream_forwards, to_sql_int(revision)),
        (Direction::Backwards, StreamStart::Boundary) => (&sql.read_stream_backwards, i64::MAX),
        (Direction::Backwards, StreamStart::Revision(revision)) => (&sql.read_stream_backwards, to_sql_int(revision)),
    };
    let statement = client.prepare_cached(query).await.map_err(failed)?;
    let rows = client
        .query(&statement, &[&stream.as_str(), &from, &limit])
        .await
        .map_err(failed)?;
    // A stream's revisions start at 0 without gaps, and nothing is ever
    // deleted: a read whose range holds revision 0 (any backwards read, a
    // forwards one from the start) finds nothing only when there is no
    // stream, and needs no second query to tell.
    let holds_revision_0 = limit > 0 && (options.direction == Direction::Backwards || from == 0);
    if rows.is_empty() {
        // Otherwise empty is an answer only for a stream that exists (a
        // read past its end, or a zero limit).
        let exists = !holds_revision_0 && {
            let statement = client.prepare_cached(&sql.stream_exists).await.map_err(failed)?;
            client
                .query_one(&statement, &[&stream.as_str()])
                .await
                .map_err(failed)?
                .get::<_, bool>(0)
        };
        if !exists {
            return Err(Error::StreamNotFound { stream: stream.clone() });
        }
    }
    rows.iter().map(|row| decode(row, target)).collect()
}

/// The event with `event_id`, through the unique constraint on it. Only
/// committed rows are seen; unlike `$all`, a single event needs no
/// watermark, since nothing is read after it.
pub(crate) async fn read_event(
    client: &Client,
    sql: &Sql,
    target: &Target,
    event_id: Uuid,
) -> Result<Option<RecordedEvent>> {
    let failed = |e| target.db_error("cannot read an event by id", e);
    let statement = client.prepare_cached(&sql.read_event).await.map_err(failed)?;
    let row = client.query_opt(&statement, &[&event_id]).await.map_err(failed)?;
    row.map(|row| decode(&row, target)).transpose()
}

/// Forward pages of `$all` at least this long that lie wholly below the
/// visible head are read as two halves at once; see [`read_halves`].
pub(crate) const SPLIT_PAGE_MIN: usize = 1024;

/// Where [`read_all`] may take a second connection, and what it counts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spare<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) pages_read_in_halves: &'a AtomicU64,
}

/// The start of a forward page of `$all` as the page query takes it.
/// Positions here have equal parts (`Position::from_sequence`). A start
/// position from elsewhere may not; this bound keeps the port's order
/// (commit, then prepare) exact for it too.
pub(crate) fn forward_from(from: AllStart) -> i64 {
    let from = match from {
        AllStart::Boundary => 0,
        AllStart::Position(Position { commit, prepare }) if prepare > commit => commit.saturating_add(1),
        AllStart::Position(Position { commit, .. }) => commit,
    };
    to_sql_int(from)
}

/// The positions a page of `options` can hold end here: a page that ends
/// below the watermark (catching up far behind the head) needs no wait,
/// also while some unrelated transaction stays open on the cluster. `None`
/// for a backward read from the end.
pub(crate) fn page_end(options: ReadAll) -> Option<i64> {
    let limit = to_sql_int(options.max_count as u64);
    match options.direction {
        // Positions start at 1: a page from the start (0) ends at `limit`,
        // not `limit - 1`.
        Direction::Forwards => Some(
            forward_from(options.from)
                .max(1)
                .saturating_add(limit.saturating_sub(1)),
        ),
        Direction::Backwards => Some(backward_from(options.from)).filter(|&from| from != i64::MAX),
    }
}

/// The first position a backward read of `$all` from `from` may return.
fn backward_from(from: AllStart) -> i64 {
    let from = match from {
        AllStart::Boundary => u64::MAX,
        AllStart::Position(Position { commit, prepare }) if prepare < commit => commit - 1,
        AllStart::Position(Position { commit, .. }) => commit,
    };
    to_sql_int(from)
}

/// A page of `$all`, and the visible head the store knew of when it read
/// the page (when it asked; see [`read_all`]).
#[derive(Debug)]
pub(crate) struct AllPage {
    pub(crate) events: Vec<RecordedEvent>,
    pub(crate) visible: Option<i64>,
}

/// Heads read after waiting for older transactions (see
/// [`settled_heads_pooled`]), and what is left of the wait.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settled {
    pub(crate) heads: Heads,
    pub(crate) wait_left: Duration,
}

/// Reads a page of `$all` below the watermark, the start position included.
/// With `settled`, the caller has waited (bounded) for transactions in
/// flight; the page then carries the visible head it knew. The heads may be
/// a moment old: the page's query applies the watermark itself, and they
/// only decide how to read (a lower visible head reads in one query, or
/// waits again where the page came back short). With
/// `spare`, a long forward page far enough behind the head may be read in
/// two halves, the second on a connection of `spare` (see
/// [`read_halves`]); the answer is the same either way.
pub(crate) async fn read_all(
    client: &Client,
    sql: &Sql,
    target: &Target,
    options: ReadAll,
    settled: Option<Settled>,
    spare: Option<Spare<'_>>,
) -> Result<AllPage> {
    let limit = to_sql_int(options.max_count as u64);
    let (query, from) = match options.direction {
        Direction::Forwards => (&sql.read_all_forwards, forward_from(options.from)),
        Direction::Backwards => (&sql.read_all_backwards, backward_from(options.from)),
    };
    let mut visible = None;
    if let Some(Settled { heads, wait_left }) = settled {
        let last = page_end(options);
        visible = heads.visible;
        // Splitting pays only where both halves are full, so only below the
        // visible head: a live reader's pages near the head stay one query.
        let events = if let Some(spare) = spare
            && options.direction == Direction::Forwards
            && visible.is_some_and(|visible| last.is_some_and(|last| last <= visible))
        {
            read_visible_page(client, spare, sql, target, from, limit).await?
        } else {
            read_page(client, query, target, from, limit).await?
        };
        // The wait stopped at `last` (not at its deadline), short of
        // everything committed, and the page came back short: a position of its range is missing (an
        // identity value taken by a batch that rolled back), so the page
        // reaches past `last`, where committed events may still be above
        // the watermark. Wait for them too, as a read near the head does,
        // and read the page again.
        let stopped_at_last = last.is_some_and(|last| heads.visible >= Some(last)) && heads.visible < heads.top;
        if stopped_at_last && options.direction == Direction::Forwards && (events.len() as u64) < limit as u64 {
            let heads = settled_heads(client, sql, target, wait_left, None).await?;
            let events = read_page(client, query, target, from, limit).await?;
            return Ok(AllPage {
                events,
                visible: heads.visible,
            });
        }
        return Ok(AllPage { events, visible });
    }
    let events = read_page(client, query, target, from, limit).await?;
    Ok(AllPage { events, visible })
}

/// One page query, decoded.
async fn read_page(client: &Client, query: &str, target: &Target, from: i64, limit: i64) -> Result<Vec<RecordedEvent>> {
    query_page(client, query, target, from, limit)
        .await
        .map_err(|error| error.into_error(target))
}

/// Why a page query gave no page.
enum PageError {
    /// The query failed: the connection, the server, a cancel.
    Query(tokio_postgres::Error),
    /// A row did not decode (a hand-edited table).
    Row(Error),
}

impl PageError {
    fn into_error(self, target: &Target) -> Error {
        match self {
            PageError::Query(error) => target.db_error("cannot read $all", error),
            PageError::Row(error) => error,
        }
    }
}

/// Runs a page query (`$1` the start, `$2` the length) and decodes each row
/// as it arrives. A row's buffer is let go once it is decoded, so a page is
/// never held twice (as rows, then as events), and the decoding overlaps
/// the transfer of the rows behind it.
async fn query_page(
    client: &Client,
    query: &str,
    target: &Target,
    from: i64,
    limit: i64,
) -> std::result::Result<Vec<RecordedEvent>, PageError> {
    use futures::TryStreamExt as _;
    let statement = client.prepare_cached(query).await.map_err(PageError::Query)?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&from, &limit];
    let rows = client.query_raw(&statement, params).await.map_err(PageError::Query)?;
    let mut rows = std::pin::pin!(rows);
    // A page is at most `limit` rows; a huge `limit` asked of a short log
    // does not reserve memory it will never use.
    let mut events = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(PAGE_RESERVE));
    while let Some(row) = rows.try_next().await.map_err(PageError::Query)? {
        events.push(decode(&row, target).map_err(PageError::Row)?);
    }
    Ok(events)
}

/// The most events a page read reserves room for before it sees its rows.
const PAGE_RESERVE: usize = 16_384;

/// Reads the forward page of `limit` rows from `from`, which lies wholly
/// at or below a visible head: as two halves at once when it is long
/// enough (see [`read_halves`]), else in one query.
pub(crate) async fn read_visible_page(
    client: &Client,
    spare: Spare<'_>,
    sql: &Sql,
    target: &Target,
    from: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>> {
    if usize::try_from(limit).is_ok_and(|limit| limit >= SPLIT_PAGE_MIN)
        && from > 0
        && let Some(page) = read_halves(client, spare.pool, sql, target, from, limit).await?
    {
        spare.pages_read_in_halves.fetch_add(1, Ordering::Relaxed);
        return Ok(page);
    }
    read_page(client, &sql.read_all_forwards, target, from, limit).await
}

/// Reads the `limit` rows of `$all` from position `from` as two halves at
/// once, the first on `client` and the second on a spare connection of
/// `pool` (see [`spare_client`]): the database produces and sends both
/// halves in parallel, which is where a rebuild far behind the head spends
/// its time.
///
/// Each half is an ordinary page read (`read_all_forwards`, with its
/// watermark filters), the second starting where the first ends when no
/// position is missing. The halves are answered only if together they are
/// exactly the positions `from .. from + limit`, in order: those are the
/// first `limit` positions from `from`, and they were visible, so one read
/// of the whole page now would return the same rows (the watermark only
/// moves up, and events are never deleted). A position can be missing (an
/// identity value taken by a transaction that rolled back); then, with no
/// spare connection, or when the spare's half fails, `None`, and the caller
/// reads the page in one query.
async fn read_halves(
    client: &Client,
    pool: &Pool,
    sql: &Sql,
    target: &Target,
    from: i64,
    limit: i64,
) -> Result<Option<Vec<RecordedEvent>>> {
    let Some(spare) = spare_client(pool).await else {
        return Ok(None);
    };
    // Back to the pool only once its query is answered: if this read is
    // given up (the caller's query timeout), the spare is closed with it.
    let spare = UntilAnswered(Some(spare));
    let query = &sql.read_all_forwards;
    let half = limit / 2;
    let (first, second) = tokio::join!(
        query_page(client, query, target, from, half),
        query_page(spare.client(), query, target, from + half, limit - half)
    );
    let mut events = first.map_err(|error| error.into_error(target))?;
    let second = match second {
        Ok(second) => second,
        // The spare may be dead without the pool's quick check knowing it
        // yet; it is not put back. The caller's own query decides.
        Err(PageError::Query(_)) => return Ok(None),
        Err(PageError::Row(error)) => return Err(error),
    };
    spare.answered();
    if events.len() + second.len() != usize::try_from(limit).unwrap_or(usize::MAX) {
        return Ok(None);
    }
    events.extend(second);
    let exact = (from..)
        .zip(&events)
        .all(|(expected, event)| i64::try_from(event.position.commit) == Ok(expected));
    Ok(exact.then_some(events))
}

/// A pooled connection that goes back to the pool only through
/// [`UntilAnswered::answered`]. Dropped otherwise (a query failed, or the
/// read was given up while the query ran), it is closed: its answer may
/// still come, and whoever used it next would wait behind it.
struct UntilAnswered(Option<Client>);

impl UntilAnswered {
    fn client(&self) -> &Client {
        self.0.as_ref().expect("held until answered or dropped")
    }

    fn answered(mut self) {
        drop(self.0.take());
    }
}

impl Drop for UntilAnswered {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Connections of the pool a page read leaves to others: the batch writers
/// (see `batcher.rs`) and one more, so that a rebuild's split reads never
/// keep appends waiting for a connection.
const SPARE_RESERVE: usize = crate::batcher::WRITERS + 1;

/// A pooled connection for the second half of a page, if the pool has one
/// to spare: nobody waits for one, and [`SPARE_RESERVE`] would still be
/// free (idle or not yet opened). Taken without waiting: a read that holds
/// one connection and waited for a second could wait on readers doing the
/// same.
pub(crate) async fn spare_client(pool: &Pool) -> Option<Client> {
    let status = pool.status();
    let free = status.max_size.saturating_sub(status.size) + status.available;
    if status.waiting > 0 || free <= SPARE_RESERVE {
        return None;
    }
    let timeouts = deadpool_postgres::Timeouts {
        wait: Some(Duration::ZERO),
        ..pool.timeouts()
    };
    pool.timeout_get(&timeouts).await.ok()
}

/// Decodes a row of [`EVENT_COLUMNS`].
fn decode(row: &Row, target: &Target) -> Result<RecordedEvent> {
    let failed = |e| target.db_error("cannot decode an event row", e);
    let position: i64 = row.try_get(0).map_err(failed)?;
    let stream: String = row.try_get(1).map_err(failed)?;
    let revision: i64 = row.try_get(2).map_err(failed)?;
    let id: Uuid = row.try_get(3).map_err(failed)?;
    let recorded_at: SystemTime = row.try_get(7).map_err(failed)?;
    // A hand-edited table must not smuggle an invalid name into the port.
    let stream = StreamName::new(stream).map_err(|error| {
        Error::backend(
            format!("{} holds an event with an invalid stream name", target.describe()),
            error,
        )
    })?;
    Ok(RecordedEvent {
        stream,
        revision: from_sql_int(revision),
        position: Position::from_sequence(from_sql_int(position)),
        id,
        event_type: row.try_get(4).map_err(failed)?,
        data: row.try_get(5).map_err(failed)?,
        metadata: row.try_get(6).map_err(failed)?,
        recorded_at,
    })
}

/// PostgreSQL `bigint`s are `i64`; bounds past its range mean "no bound".
pub(crate) fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Positions and revisions are never negative (identity from 1, and a
/// CHECK on revisions).
pub(crate) fn from_sql_int(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_bounds_become_unbounded() {
        assert_eq!(to_sql_int(u64::MAX), i64::MAX);
        assert_eq!(to_sql_int(7), 7);
        assert_eq!(from_sql_int(7), 7);
    }

    #[test]
    fn every_statement_names_the_schema() {
        let sql = Sql::new("triage_x");
        for statement in [
            &sql.append_state,
            &sql.append,
            &sql.read_stream_forwards,
            &sql.read_stream_backwards,
            &sql.stream_exists,
            &sql.read_all_forwards,
            &sql.read_all_backwards,
            &sql.heads,
        ] {
            assert!(statement.contains(r#""triage_x"."#), "{statement}");
        }
    }
}
