//! Golden files of every stored event version.
//!
//! `tests/golden/v<N>/<Type>.json` holds a payload as a build that wrote
//! schema version N stored it. Every file must still decode, through the
//! upcasters, into the event the sample below describes. When a type's
//! schema changes, keep its old file, add the new version's file, and add
//! the upcast in `Event::decode`. `TRIAGE_BLESS=1` writes files that are
//! missing for the current version; it never rewrites an existing one.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use triage_domain::{Claim, CommandKind, CommandRejected, Event, Priority, State, TicketId};
use uuid::Uuid;

fn samples() -> Vec<Event> {
    let claim = Claim {
        claim_id: Uuid::from_u128(0xc1a1),
        agent_id: "drafter-2".into(),
        lease_expires_at: Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 30).unwrap(),
    };
    vec![
        Event::TicketOpened {
            ticket_id: TicketId(Uuid::from_u128(0x7157)),
            subject: "Charged twice".into(),
            body: "My card was charged twice for March.".into(),
            customer: Some("dana@example.com".into()),
        },
        Event::ClassificationStarted { claim: claim.clone() },
        Event::TicketClassified {
            claim_id: claim.claim_id,
            category: "billing".into(),
            priority: Priority::High,
            confidence: 0.93,
        },
        Event::DraftingStarted { claim: claim.clone() },
        Event::DraftSubmitted {
            claim_id: claim.claim_id,
            body: "We refunded the duplicate charge.".into(),
        },
        Event::EscalationStarted { claim: claim.clone() },
        Event::DraftRejected {
            claim_id: Some(claim.claim_id),
            reason: "promises a refund we cannot give".into(),
        },
        Event::EscalatedToHuman {
            claim_id: None,
            reason: "poison ticket: 3 failed attempts at one stage".into(),
        },
        Event::TicketResolved {
            claim_id: Some(claim.claim_id),
            resolution: "sent the draft".into(),
        },
        Event::ClaimReleased {
            claim_id: claim.claim_id,
            reason: "model timed out".into(),
            attempts: 1,
        },
        Event::ClaimExpired {
            claim_id: claim.claim_id,
            lease_expired_at: claim.lease_expires_at,
            attempts: 2,
        },
        Event::LeaseExtended {
            claim_id: claim.claim_id,
            lease_expires_at: Utc.with_ymd_and_hms(2026, 3, 1, 12, 1, 30).unwrap(),
        },
        Event::ClaimTakenOver {
            previous_claim_id: claim.claim_id,
            claim: Claim {
                claim_id: Uuid::from_u128(0xa11ce),
                agent_id: "alice@example.com".into(),
                lease_expires_at: Utc.with_ymd_and_hms(2026, 3, 1, 12, 5, 0).unwrap(),
            },
        },
    ]
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn every_event_type_has_a_golden_file_of_its_current_version() {
    let bless = std::env::var_os("TRIAGE_BLESS").is_some();
    let samples = samples();
    assert_eq!(samples.len(), Event::TYPES.len(), "one sample per event type");
    for event in samples {
        let path = golden_dir().join(format!("v{}/{}.json", event.schema_version(), event.event_type()));
        if bless && !path.exists() {
            let value: serde_json::Value = serde_json::from_slice(&event.encode()).unwrap();
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, serde_json::to_string_pretty(&value).unwrap() + "\n").unwrap();
        }
        let stored = fs::read(&path).unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
        let decoded = Event::decode(event.event_type(), event.schema_version(), &stored)
            .unwrap_or_else(|error| panic!("{} no longer decodes: {error}", path.display()));
        assert_eq!(decoded, event, "{} decodes to a different event", path.display());
    }
}

#[test]
fn rejection_records_have_a_golden_file_too() {
    let record = CommandRejected {
        ticket_id: TicketId(Uuid::from_u128(0x7157)),
        command: CommandKind::SubmitDraft,
        code: "invalid_transition".into(),
        reason: "rejected: submit_draft is not allowed in state NEW".into(),
        state: Some(State::New),
        revision: Some(0),
    };
    let path = golden_dir().join("rejections/v1/CommandRejected.json");
    if std::env::var_os("TRIAGE_BLESS").is_some() && !path.exists() {
        let value: serde_json::Value = serde_json::from_slice(&record.encode()).unwrap();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, serde_json::to_string_pretty(&value).unwrap() + "\n").unwrap();
    }
    let stored = fs::read(&path).unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    assert_eq!(CommandRejected::decode(1, &stored).unwrap(), record);
}

#[test]
fn every_golden_file_of_every_version_still_decodes() {
    let mut checked = 0;
    for version_dir in fs::read_dir(golden_dir()).unwrap() {
        let version_dir = version_dir.unwrap().path();
        if version_dir.ends_with("rejections") {
            continue;
        }
        let version: u16 = version_dir
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix('v'))
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("{} is not named v<N>", version_dir.display()));
        for file in fs::read_dir(&version_dir).unwrap() {
            let path = file.unwrap().path();
            let event_type = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let data = fs::read(&path).unwrap();
            let event = Event::decode(&event_type, version, &data)
                .unwrap_or_else(|error| panic!("{} no longer decodes: {error}", path.display()));
            assert_eq!(event.event_type(), event_type);
            checked += 1;
        }
    }
    assert!(checked >= Event::TYPES.len(), "only {checked} golden files found");
}
