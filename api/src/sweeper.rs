//! The lease sweeper: expires claims whose lease ran out, through the
//! domain's `ExpireClaim` command.
//!
//! Safe with several server instances at once: each expiry is decided on
//! the revision the sweeper saw, and its command id derives from the claim
//! id, so two sweepers expiring the same claim write it once (the second
//! gets the first's outcome, or a stale-revision refusal).

use std::time::Duration;

use triage_command_handler::CommandError;
use triage_domain::{Agent, Command, CommandEnvelope, Role};
use uuid::Uuid;

use crate::error::ApiError;
use crate::service::AppState;

/// The agent id the sweeper's events carry.
pub const SWEEPER_AGENT: &str = "lease-sweeper";

/// Expires up to `limit` claims whose lease ran out by the handler's clock;
/// returns how many this call expired.
///
/// A ticket that cannot be expired for a reason of its own (a stored event
/// this version cannot read, other writers that kept winning) is logged
/// and passed over: stopping there would leave every claim behind it
/// unexpired, at every sweep, since the next sweep meets it first again.
/// A failing store ends the sweep with its error.
pub async fn sweep_once(state: &AppState, limit: usize) -> Result<usize, ApiError> {
    state.catch_up().await?;
    let now = state.handler().clock().now();
    let rows = state.read_models().expired_claims(now, limit).await?;
    let mut expired = 0;
    for row in rows {
        // A shutdown does not wait for the rest of a long sweep; the next
        // start sweeps them.
        if state.shutdown_token().is_cancelled() {
            break;
        }
        let (Some(ticket_id), Some(claim)) = (row.ticket.id, row.ticket.claim.as_ref()) else {
            continue;
        };
        let command_id = Uuid::new_v5(&claim.claim_id, b"triage expire claim");
        let envelope = CommandEnvelope::new(
            ticket_id,
            Agent::new(SWEEPER_AGENT, Role::System),
            Command::ExpireClaim {
                claim_id: claim.claim_id,
            },
        )
        .with_id(command_id)
        .at_revision(row.revision);
        match state.handler().handle(envelope).await {
            Ok(accepted) if !accepted.duplicate => expired += 1,
            Ok(_) => {}
            // Another sweeper, a heartbeat or the holder got there first.
            Err(CommandError::StaleRevision { .. } | CommandError::Rejected { .. }) => {}
            Err(error @ CommandError::Store(_)) => return Err(ApiError::from_command(error)),
            Err(error) => {
                tracing::warn!(ticket = %ticket_id, %error, "cannot expire this ticket's claim; sweeping the others");
            }
        }
    }
    Ok(expired)
}

/// Sweeps every `interval` until the state's shutdown token is cancelled.
pub async fn run(state: AppState, interval: Duration) {
    let stop = state.shutdown_token();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match sweep_once(&state, 256).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "expired claims whose lease ran out"),
            Err(error) => tracing::warn!(%error, "lease sweep failed; retrying"),
        }
    }
}
