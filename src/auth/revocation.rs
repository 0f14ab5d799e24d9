//! [`Revocations`]: the revoked token ids and users, the rules that refuse tokens because of
//! them, and the file that keeps them across restarts (`revocations.json` in the data
//! directory, replaced by write, fsync, rename, fsync of the directory).
//!
//! Semantics: a revoked `jti` is refused (until the token expires, after which it is refused
//! anyway); a revoked `sub`, or `sub` on a `doc` scope, refuses that user's tokens issued
//! (`iat`) at or before the revocation second, and every one of its tokens without `iat`.
//! Entries are never dropped; at most [`REVOCATIONS_MAX`] are kept.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{AuthError, DocScope, Grant};

/// Entries the list holds at most; a revocation past it is refused (rotate the keys instead).
pub const REVOCATIONS_MAX: usize = 100_000;

/// The file in the data directory.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// One revocation, as `POST /admin/revoke` takes it and the file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// A token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// A user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// With `sub`: only on the documents this covers (an exact name, `prefix*` or `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
}

/// A checked revocation rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Every token with this `jti`.
    Jti(String),
    /// The user's tokens issued at or before `at` (and those without `iat`), on the
    /// documents `scope` covers.
    Sub {
        /// The user.
        sub: String,
        /// Where (`All` for a plain `{"sub":...}`).
        scope: DocScope,
        /// When it was revoked, unix seconds.
        at: u64,
    },
}

impl Rule {
    /// Checks a request: exactly `{jti}`, `{sub}` or `{sub, doc}`, none of them empty.
    ///
    /// # Errors
    /// A static reason for the 400 answer.
    pub fn from_request(request: &RevokeRequest, at: u64) -> Result<Rule, &'static str> {
        match (&request.jti, &request.sub, &request.doc) {
            (Some(jti), None, None) if !jti.is_empty() => Ok(Rule::Jti(jti.clone())),
            (None, Some(sub), doc) if !sub.is_empty() => {
                let scope = match doc {
                    None => DocScope::All,
                    Some(doc) => DocScope::parse(doc).map_err(|_| "doc must not be empty")?,
                };
                Ok(Rule::Sub {
                    sub: sub.clone(),
                    scope,
                    at,
                })
            }
            _ => Err("expected {\"jti\":...}, {\"sub\":...} or {\"sub\":...,\"doc\":...}"),
        }
    }

    /// Whether this rule refuses `grant` for `doc` (a new token, or one being refreshed).
    pub fn refuses(&self, grant: &Grant, doc: &str) -> bool {
        match self {
            Rule::Jti(jti) => grant.jti.as_deref() == Some(jti.as_str()),
            Rule::Sub { sub, scope, at } => {
                *sub == grant.user && scope.covers(doc) && grant.iat.map_or(true, |iat| iat <= *at)
            }
        }
    }

    /// Whether a live connection of `grant` on `doc` must be closed now that this rule is in
    /// force (every such connection was admitted before it).
    pub fn closes(&self, grant: &Grant, doc: &str) -> bool {
        match self {
            Rule::Jti(jti) => grant.jti.as_deref() == Some(jti.as_str()),
            Rule::Sub { sub, scope, .. } => *sub == grant.user && scope.covers(doc),
        }
    }

    fn to_stored(&self) -> StoredRule {
        match self {
            Rule::Jti(jti) => StoredRule {
                jti: Some(jti.clone()),
                sub: None,
                doc: None,
                at: 0,
            },
            Rule::Sub { sub, scope, at } => StoredRule {
                jti: None,
                sub: Some(sub.clone()),
                doc: match scope {
                    DocScope::All => None,
                    DocScope::Exact(name) => Some(name.clone()),
                    DocScope::Prefix(prefix) => Some(format!("{prefix}*")),
                },
                at: *at,
            },
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    doc: Option<String>,
    #[serde(default)]
    at: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredFile {
    version: u32,
    rules: Vec<StoredRule>,
}

/// Why the revocation list could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// Reading, writing, syncing or renaming failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// [`REVOCATIONS_MAX`] entries are kept already.
    #[error("the revocation list is full ({REVOCATIONS_MAX} entries); rotate the keys")]
    Full,
}

/// Every revocation in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    rules: Vec<Rule>,
}

impl Revocations {
    /// No revocation.
    pub fn new() -> Revocations {
        Revocations::default()
    }

    /// The rules, oldest first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether no rule is in force.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Refuses a revoked grant.
    ///
    /// # Errors
    /// `Revoked` when a rule refuses `grant` on `doc`.
    pub fn check(&self, grant: &Grant, doc: &str) -> Result<(), AuthError> {
        if self.rules.iter().any(|rule| rule.refuses(grant, doc)) {
            Err(AuthError::Revoked)
        } else {
            Ok(())
        }
    }

    /// The list with `rule` added.
    ///
    /// # Errors
    /// `Full` at [`REVOCATIONS_MAX`].
    pub fn with(&self, rule: Rule) -> Result<Revocations, RevocationError> {
        if self.rules.len() >= REVOCATIONS_MAX {
            return Err(RevocationError::Full);
        }
        let mut next = self.clone();
        if !next.rules.contains(&rule) {
            next.rules.push(rule);
        }
        Ok(next)
    }

    /// Reads `dir/revocations.json`; a missing file is an empty list.
    ///
    /// # Errors
    /// When it cannot be read or does not parse.
    pub fn load(dir: &Path) -> Result<Revocations, RevocationError> {
        let path = dir.join(REVOCATIONS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Revocations::new()),
            Err(source) => {
                return Err(RevocationError::Io {
                    context: format!("reading {}", path.display()),
                    source,
                })
            }
        };
        let corrupt = |detail: String| RevocationError::Corrupt {
            path: path.clone(),
            detail,
        };
        let file: StoredFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if file.version != 1 {
            return Err(corrupt(format!("unknown version {}", file.version)));
        }
        let mut rules = Vec::with_capacity(file.rules.len());
        for stored in file.rules {
            let request = RevokeRequest {
                jti: stored.jti,
                sub: stored.sub,
                doc: stored.doc,
            };
            let rule =
                Rule::from_request(&request, stored.at).map_err(|why| corrupt(why.to_owned()))?;
            rules.push(rule);
        }
        Ok(Revocations { rules })
    }

    /// Replaces `dir/revocations.json` durably: a temporary file written and fsynced, renamed
    /// over the old one, then the directory fsynced.
    ///
    /// # Errors
    /// When any step fails; the old file is then still in place.
    pub fn save(&self, dir: &Path) -> Result<(), RevocationError> {
        let io = |context: String| move |source| RevocationError::Io { context, source };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let path = dir.join(REVOCATIONS_FILE);
        let tmp = dir.join(format!("{REVOCATIONS_FILE}.tmp"));
        let file = StoredFile {
            version: 1,
            rules: self.rules.iter().map(Rule::to_stored).collect(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| RevocationError::Io {
            context: "encoding the revocation list".to_owned(),
            source: std::io::Error::other(e),
        })?;
        let mut out =
            std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        out.write_all(&bytes)
            .map_err(io(format!("writing {}", tmp.display())))?;
        out.sync_all()
            .map_err(io(format!("syncing {}", tmp.display())))?;
        drop(out);
        std::fs::rename(&tmp, &path).map_err(io(format!("renaming {}", tmp.display())))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing directory {}", dir.display())))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn grant(user: &str, iat: Option<u64>, jti: Option<&str>) -> Grant {
        Grant {
            user: user.into(),
            name: None,
            role: Role::Write,
            scope: DocScope::All,
            exp: 10_000,
            iat,
            jti: jti.map(str::to_owned),
        }
    }

    fn req(jti: Option<&str>, sub: Option<&str>, doc: Option<&str>) -> RevokeRequest {
        RevokeRequest {
            jti: jti.map(str::to_owned),
            sub: sub.map(str::to_owned),
            doc: doc.map(str::to_owned),
        }
    }

    #[test]
    fn request_shapes() {
        assert!(Rule::from_request(&req(Some("j"), None, None), 5).is_ok());
        assert!(Rule::from_request(&req(None, Some("a"), None), 5).is_ok());
        assert!(Rule::from_request(&req(None, Some("a"), Some("d")), 5).is_ok());
        assert!(Rule::from_request(&req(Some("j"), Some("a"), None), 5).is_err());
        assert!(Rule::from_request(&req(None, None, Some("d")), 5).is_err());
        assert!(Rule::from_request(&req(None, None, None), 5).is_err());
        assert!(Rule::from_request(&req(Some(""), None, None), 5).is_err());
        assert!(Rule::from_request(&req(None, Some("a"), Some("")), 5).is_err());
    }

    #[test]
    fn semantics() {
        let set = Revocations::new()
            .with(Rule::Jti("j1".into()))
            .and_then(|s| s.with(Rule::from_request(&req(None, Some("bob"), None), 100).unwrap()))
            .and_then(|s| {
                s.with(
                    Rule::from_request(&req(None, Some("carol"), Some("team-7/*")), 100).unwrap(),
                )
            })
            .expect("rules");
        assert!(set
            .check(&grant("alice", Some(1), Some("j1")), "d")
            .is_err());
        assert!(set.check(&grant("alice", Some(1), Some("j2")), "d").is_ok());
        // A user: tokens issued at or before the revocation, and those without iat.
        assert!(set.check(&grant("bob", Some(100), None), "d").is_err());
        assert!(set.check(&grant("bob", None, None), "d").is_err());
        assert!(set.check(&grant("bob", Some(101), None), "d").is_ok());
        // A user on some documents only.
        assert!(set
            .check(&grant("carol", Some(50), None), "team-7/x")
            .is_err());
        assert!(set
            .check(&grant("carol", Some(50), None), "team-70")
            .is_ok());
        let rule = &set.rules()[2];
        assert!(rule.closes(&grant("carol", Some(150), None), "team-7/a"));
        assert!(!rule.closes(&grant("carol", Some(150), None), "team-8"));
    }

    #[test]
    fn survives_a_save_and_load() {
        let dir = std::env::temp_dir().join(format!("collab-revocations-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            Revocations::load(&dir).expect("missing is empty"),
            Revocations::new()
        );
        let set = Revocations::new()
            .with(Rule::Jti("j1".into()))
            .and_then(|s| {
                s.with(Rule::from_request(&req(None, Some("carol"), Some("team-7/*")), 9).unwrap())
            })
            .expect("rules");
        set.save(&dir).expect("save");
        assert_eq!(Revocations::load(&dir).expect("load"), set);
        std::fs::write(dir.join(REVOCATIONS_FILE), b"{nope").expect("write");
        assert!(Revocations::load(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
