//! The workload both benchmarks share: one ticket's whole lifecycle, the
//! commands a classifier, a drafter and an escalator send for it.

use triage_domain::{Command, Priority, Role};
use uuid::Uuid;

/// The seven commands of a ticket's happy path, with the role that sends
/// each. `claim` is the claim taken by the latest `Start…` command.
pub(crate) const LIFECYCLE: [Role; 7] = [
    Role::Intake,
    Role::Classifier,
    Role::Classifier,
    Role::Drafter,
    Role::Drafter,
    Role::Escalator,
    Role::Escalator,
];

/// The `step`-th command of the lifecycle (0-based).
pub(crate) fn command(step: usize, claim: Option<Uuid>) -> Command {
    let claim_id = || claim.expect("a claim was taken by the previous step");
    match step {
        0 => Command::OpenTicket {
            subject: "Charged twice for the March invoice".into(),
            body: "Hello, my card was charged twice for the March invoice (order 4411). Please refund one of them."
                .into(),
            customer: Some("dana@example.com".into()),
        },
        1 => Command::StartClassification { lease_secs: None },
        2 => Command::Classify {
            claim_id: claim_id(),
            category: "billing".into(),
            priority: Priority::High,
            confidence: 0.93,
        },
        3 => Command::StartDrafting { lease_secs: None },
        4 => Command::SubmitDraft {
            claim_id: claim_id(),
            body: "Hi Dana, sorry about that. We refunded the duplicate charge; it will show within 5 days.".into(),
        },
        5 => Command::StartEscalation { lease_secs: None },
        6 => Command::Resolve {
            claim_id: Some(claim_id()),
            resolution: "sent the draft".into(),
        },
        _ => panic!("the lifecycle has 7 steps"),
    }
}

/// Whether the `step`-th command takes a claim (its command id becomes the
/// claim id).
pub(crate) fn takes_claim(step: usize) -> bool {
    matches!(step, 1 | 3 | 5)
}
