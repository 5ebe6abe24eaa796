//! Bearer tokens: the `agents.toml` file, hashing and look-up.
//!
//! The file stores only the SHA-256 of each token. A presented token is
//! hashed and compared in constant time against every entry, so neither the
//! comparison nor the number of entries checked says how close a guess was.
//! The file is re-read when its modification time changes, so `triage agents
//! revoke` takes effect on a running server without a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use triage_domain::Role;

/// Roles a token may carry. `system` belongs to Triage itself (the lease
/// sweeper) and is never given to a token.
pub const TOKEN_ROLES: [Role; 6] = [
    Role::Classifier,
    Role::Drafter,
    Role::Escalator,
    Role::Operator,
    Role::Intake,
    Role::Analyst,
];

/// Who a request comes from: the agent behind a valid token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The agent id, recorded in every event it causes.
    pub agent_id: String,
    /// The roles it may act in, in the order they were granted.
    pub roles: Vec<Role>,
}

impl Principal {
    /// A principal with the given roles.
    pub fn new(agent_id: impl Into<String>, roles: impl IntoIterator<Item = Role>) -> Self {
        Principal {
            agent_id: agent_id.into(),
            roles: roles.into_iter().collect(),
        }
    }
}

/// One agent in `agents.toml`. Unknown fields are refused: a misspelt
/// `revoked_at`, ignored, would leave a revoked token working.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent id.
    pub id: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Hex SHA-256 of its token; the token itself is never stored.
    pub token_sha256: String,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// When it was revoked; a revoked token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The contents of `agents.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsFile {
    /// The agents, in the order they were added.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentEntry>,
}

/// Why the agents file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentsError {
    /// The file could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{} is not a valid agents file: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An agent with that id exists already.
    #[error("agent {0:?} exists already; revoke it or choose another id")]
    Exists(String),
    /// No active agent has that id.
    #[error("no active agent {0:?}")]
    Unknown(String),
    /// The request cannot be satisfied as given.
    #[error("{0}")]
    Bad(String),
}

/// The hex SHA-256 of a token.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A fresh token: `trg_` and 64 hex digits from two random v4 UUIDs
/// (244 random bits, from the operating system's generator).
pub fn generate_token() -> String {
    format!("trg_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// An agent id goes into every event its token writes, and into read
/// models: what the command handler takes (see
/// `triage_domain::check_agent_id`).
fn check_agent_id(id: &str) -> Result<(), String> {
    triage_domain::check_agent_id(id).map_err(|error| error.to_string())
}

/// Ids that Triage itself writes into events as the agent: a token with
/// one would make its actions indistinguishable from the system's.
pub const RESERVED_AGENT_IDS: [&str; 2] = [crate::sweeper::SWEEPER_AGENT, "cli"];

/// What a new agent id must also be: no whitespace (ids are table cells,
/// CSV fields and command-line arguments), and not one Triage writes for
/// itself. Files written before these rules still load.
fn check_new_agent_id(id: &str) -> Result<(), String> {
    check_agent_id(id)?;
    if id.chars().any(char::is_whitespace) {
        return Err(format!("an agent id must not contain whitespace: {id:?}"));
    }
    if RESERVED_AGENT_IDS.contains(&id) {
        return Err(format!(
            "{id:?} is the id Triage records its own actions under ({}); choose another",
            if id == "cli" {
                "the command line's"
            } else {
                "the lease sweeper's"
            }
        ));
    }
    Ok(())
}

impl AgentsFile {
    /// Reads `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Self, AgentsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(AgentsFile::default()),
            Err(source) => {
                return Err(AgentsError::Io {
                    action: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let file: AgentsFile = toml::from_str(&text).map_err(|error| AgentsError::Invalid {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        for agent in &file.agents {
            if let Err(message) = check_agent_id(&agent.id) {
                return Err(AgentsError::Invalid {
                    path: path.to_owned(),
                    message: format!("agent {:?}: {message}", agent.id),
                });
            }
            if agent.roles.contains(&Role::System) {
                return Err(AgentsError::Invalid {
                    path: path.to_owned(),
                    message: format!("agent {:?} has the role system, which no token may carry", agent.id),
                });
            }
        }
        Ok(file)
    }

    /// Writes the file atomically (a sibling temporary file, then a rename).
    pub fn save(&self, path: &Path) -> Result<(), AgentsError> {
        let text = format!(
            "# Triage agents: each token's SHA-256, never the token itself.\n\
             # Manage with `triage agents add|list|revoke`.\n\n{}",
            toml::to_string_pretty(self).map_err(|error| AgentsError::Invalid {
                path: path.to_owned(),
                message: error.to_string(),
            })?
        );
        let tmp = path.with_extension("toml.tmp");
        let io = |action, source| AgentsError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        std::fs::write(&tmp, text).map_err(|source| io("write", source))?;
        std::fs::rename(&tmp, path).map_err(|source| io("replace", source))
    }

    /// Reads `path`, changes it with `change`, and writes it back, holding
    /// an exclusive lock on `<path>.lock` throughout: two `triage agents`
    /// commands at once each see the other's change, instead of the later
    /// save dropping the earlier one (a revocation undone, a token added
    /// and reported but not stored). `change` failing writes nothing.
    /// Readers (a running server) need no lock: a save replaces the file
    /// whole, by renaming.
    pub fn update<T>(
        path: &Path,
        change: impl FnOnce(&mut AgentsFile) -> Result<T, AgentsError>,
    ) -> Result<T, AgentsError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let io = |action, source| AgentsError::Io {
            action,
            path: lock_path.clone(),
            source,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| io("open the lock file", source))?;
        lock.lock().map_err(|source| io("lock", source))?;
        let mut file = AgentsFile::load(path)?;
        let changed = change(&mut file)?;
        file.save(path)?;
        // The lock goes with `lock`, after the save.
        Ok(changed)
    }

    /// Adds an agent and returns its token, which is not stored.
    pub fn add(&mut self, id: &str, roles: &[Role]) -> Result<String, AgentsError> {
        let id = id.trim();
        check_new_agent_id(id).map_err(AgentsError::Bad)?;
        if roles.is_empty() {
            return Err(AgentsError::Bad("give at least one --role".to_owned()));
        }
        if let Some(role) = roles.iter().find(|role| !TOKEN_ROLES.contains(role)) {
            return Err(AgentsError::Bad(format!("role {role} cannot be given to a token")));
        }
        if self
            .agents
            .iter()
            .any(|agent| agent.id == id && agent.revoked_at.is_none())
        {
            return Err(AgentsError::Exists(id.to_owned()));
        }
        let mut unique = Vec::new();
        for role in roles {
            if !unique.contains(role) {
                unique.push(*role);
            }
        }
        let token = generate_token();
        self.agents.push(AgentEntry {
            id: id.to_owned(),
            roles: unique,
            token_sha256: hash_token(&token),
            created_at: Utc::now(),
            revoked_at: None,
        });
        Ok(token)
    }

    /// Revokes every active token of agent `id`.
    pub fn revoke(&mut self, id: &str) -> Result<usize, AgentsError> {
        let now = Utc::now();
        let mut revoked = 0;
        for agent in self.agents.iter_mut().filter(|a| a.id == id && a.revoked_at.is_none()) {
            agent.revoked_at = Some(now);
            revoked += 1;
        }
        if revoked == 0 {
            return Err(AgentsError::Unknown(id.to_owned()));
        }
        Ok(revoked)
    }

    /// The active agent whose token hashes to `hash`. Every entry is
    /// compared, in constant time each.
    pub fn find(&self, token: &str) -> Option<&AgentEntry> {
        let hash = hash_token(token);
        let mut found = None;
        for agent in &self.agents {
            let equal: bool = agent.token_sha256.as_bytes().ct_eq(hash.as_bytes()).into();
            if equal && agent.revoked_at.is_none() && found.is_none() {
                found = Some(agent);
            }
        }
        found
    }
}

/// Where tokens come from.
pub enum Authenticator {
    /// `agents.toml`, re-read when it changes.
    File {
        /// The file.
        path: PathBuf,
        /// The last contents read and the modification time they had.
        cache: RwLock<(Option<SystemTime>, AgentsFile)>,
    },
    /// A fixed set of agents, for tests and embedding.
    Fixed(AgentsFile),
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authenticator::File { path, .. } => f.debug_tuple("File").field(path).finish(),
            Authenticator::Fixed(file) => f.debug_tuple("Fixed").field(&file.agents.len()).finish(),
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|meta| meta.modified()).ok()
}

impl Authenticator {
    /// Tokens from `path`, which must be readable now.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, AgentsError> {
        let path = path.into();
        let stamp = modified(&path);
        let file = AgentsFile::load(&path)?;
        Ok(Authenticator::File {
            path,
            cache: RwLock::new((stamp, file)),
        })
    }

    /// The principal behind `token`, if it is valid and not revoked.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let to_principal = |agent: &AgentEntry| Principal::new(agent.id.clone(), agent.roles.iter().copied());
        match self {
            Authenticator::Fixed(file) => file.find(token).map(to_principal),
            Authenticator::File { path, cache } => {
                let stamp = modified(path);
                {
                    let cached = cache.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if cached.0 == stamp {
                        return cached.1.find(token).map(to_principal);
                    }
                }
                match AgentsFile::load(path) {
                    Ok(file) => {
                        // Said once, when it goes: from then on the cached
                        // (missing) stamp matches until the file is back.
                        if stamp.is_none() {
                            tracing::warn!(
                                path = %path.display(),
                                "the agents file is gone: every token is refused until it is back"
                            );
                        }
                        let principal = file.find(token).map(to_principal);
                        *cache.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = (stamp, file);
                        principal
                    }
                    Err(error) => {
                        // Keep serving with what was last read rather than
                        // lock everyone out over a half-edited file.
                        tracing::warn!(%error, "cannot re-read the agents file; using the last good copy");
                        let cached = cache.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                        cached.1.find(token).map(to_principal)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_found_by_hash() {
        let mut file = AgentsFile::default();
        let token = file.add("classifier-1", &[Role::Classifier]).expect("added");
        assert!(token.starts_with("trg_") && token.len() == 68);
        let text = toml::to_string(&file).expect("serializes");
        assert!(!text.contains(&token), "the token itself must never be stored");
        assert!(text.contains(&hash_token(&token)));
        assert_eq!(file.find(&token).map(|a| a.id.as_str()), Some("classifier-1"));
        assert!(file.find("trg_wrong").is_none());
    }

    #[test]
    fn agent_ids_with_control_characters_are_refused_when_added_and_when_loaded() {
        let mut file = AgentsFile::default();
        assert!(matches!(
            file.add("bad\0id", &[Role::Drafter]),
            Err(AgentsError::Bad(_))
        ));
        assert!(matches!(
            file.add("bad\u{1b}id", &[Role::Drafter]),
            Err(AgentsError::Bad(_))
        ));
        file.add("good", &[Role::Drafter]).expect("added");
        // A hand-edited file is checked when it is read.
        file.agents[0].id = "bad\0id".to_owned();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agents.toml");
        file.save(&path).expect("saved");
        let error = AgentsFile::load(&path).expect_err("refused");
        assert!(error.to_string().contains("U+0000"), "{error}");
    }

    #[test]
    fn revoked_tokens_are_refused_and_ids_can_be_reused() {
        let mut file = AgentsFile::default();
        let token = file.add("a", &[Role::Drafter]).expect("added");
        assert!(matches!(file.add("a", &[Role::Drafter]), Err(AgentsError::Exists(_))));
        assert_eq!(file.revoke("a").expect("revoked"), 1);
        assert!(file.find(&token).is_none());
        assert!(matches!(file.revoke("a"), Err(AgentsError::Unknown(_))));
        let again = file.add("a", &[Role::Drafter]).expect("re-added");
        assert_eq!(file.find(&again).map(|a| a.id.as_str()), Some("a"));
    }

    #[test]
    fn new_agent_ids_without_whitespace_and_not_triages_own() {
        let mut file = AgentsFile::default();
        for bad in ["lease-sweeper", "cli", "two words", "tab\there"] {
            assert!(
                matches!(file.add(bad, &[Role::Drafter]), Err(AgentsError::Bad(_))),
                "{bad:?}"
            );
        }
        file.add("drafter-7", &[Role::Drafter]).expect("an ordinary id");
        // A file written before the rule still loads.
        let old = "[[agent]]\nid = \"two words\"\nroles = [\"drafter\"]\ntoken_sha256 = \"00\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n";
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agents.toml");
        std::fs::write(&path, old).unwrap();
        let loaded = AgentsFile::load(&path).expect("loads");
        assert_eq!(loaded.agents[0].id, "two words");
        // A misspelt table is an error, not an empty file that refuses
        // every token.
        std::fs::write(&path, old.replace("[[agent]]", "[[agents]]")).unwrap();
        assert!(matches!(AgentsFile::load(&path), Err(AgentsError::Invalid { .. })));
    }

    #[test]
    fn the_system_role_is_never_given_to_a_token() {
        let mut file = AgentsFile::default();
        assert!(matches!(file.add("s", &[Role::System]), Err(AgentsError::Bad(_))));
        assert!(matches!(file.add("s", &[]), Err(AgentsError::Bad(_))));
    }

    #[test]
    fn the_file_round_trips_and_is_re_read_when_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agents.toml");
        let mut file = AgentsFile::default();
        let token = file.add("op", &[Role::Operator, Role::Intake]).expect("added");
        file.save(&path).expect("saved");
        let auth = Authenticator::from_file(&path).expect("loads");
        assert_eq!(
            auth.authenticate(&token),
            Some(Principal::new("op", [Role::Operator, Role::Intake]))
        );
        file.revoke("op").expect("revoked");
        // Make sure the modification time moves even on coarse clocks.
        std::thread::sleep(std::time::Duration::from_millis(20));
        file.save(&path).expect("saved");
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(later))
            .expect("touch");
        assert_eq!(auth.authenticate(&token), None);
    }
}
