//! Access control: signed per-document tokens (JWT, HS256 or EdDSA), roles, expiry and
//! revocation. What a token grants is decided here, once, for the acceptor (at the upgrade
//! or the first `hello`), the shard (at `hello`, `auth` refresh and on its timer) and the
//! admin surface alike.
//!
//! - `claims.rs`: [`Claims`], [`Grant`], [`Role`], [`DocScope`], the time rules.
//! - `keys.rs`: [`KeySet`], the key files and [`KeySet::verify`].
//! - `revocation.rs`: [`Revocations`] and its durable file.
//! - `mint.rs`: signing tokens (the `token` command, `collab-load`, tests).
//! - `config.rs`: [`AuthConfig`], the flags.
//!
//! Pure: no socket, no thread. The only shared state is [`Auth`]: the key set and the
//! revocation list, each an `Arc` swapped under a lock that is taken when a connection is
//! admitted, refreshed or revoked, never per message.

mod claims;
pub mod config;
mod keys;
pub mod mint;
mod revocation;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

pub use claims::{Claims, DocScope, Grant, Role, CLOCK_SKEW_SECS};
pub use config::AuthConfig;
pub use keys::{key_id, KeyError, KeyKind, KeySet, HS256_SECRET_BYTES_MIN, TOKEN_BYTES_MAX};
pub use revocation::{
    RevocationError, Revocations, RevokeRequest, Rule, REVOCATIONS_FILE, REVOCATIONS_MAX,
};

/// Why a token was refused. Each variant has a fixed human message (the `error` frame's
/// `message`) and a close reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No token anywhere (query, `Authorization`, `hello.token`).
    Missing,
    /// The query, the header and `hello.token` carry different tokens.
    Conflict,
    /// Over [`TOKEN_BYTES_MAX`].
    TooLarge,
    /// Not a compact JWT (three base64url parts, a JSON header).
    Malformed,
    /// `alg: none`.
    AlgNone,
    /// Another algorithm than HS256 and EdDSA.
    Algorithm,
    /// No configured key matches the `kid` and the algorithm.
    UnknownKey,
    /// The signature does not verify with any candidate key.
    BadSignature,
    /// A claim is missing or wrong.
    BadClaims(&'static str),
    /// `exp` has passed.
    Expired,
    /// `nbf` is more than 30 s ahead.
    NotYetValid,
    /// `iat` is more than 30 s ahead.
    IssuedInFuture,
    /// `doc` does not cover the document.
    WrongDoc,
    /// A revocation refuses it.
    Revoked,
    /// An `auth` refresh for another user than the connection's.
    OtherUser,
}

impl AuthError {
    /// The `message` of the `error` frame.
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "a token is required",
            AuthError::Conflict => {
                "the token in the query, the Authorization header and hello.token differ"
            }
            AuthError::TooLarge => "token is longer than 8 KiB",
            AuthError::Malformed => "token is not a JWT",
            AuthError::AlgNone => "unsigned tokens (alg none) are refused",
            AuthError::Algorithm => "only HS256 and EdDSA tokens are accepted",
            AuthError::UnknownKey => "no key of this server verifies this token's kid and alg",
            AuthError::BadSignature => "token signature does not verify",
            AuthError::BadClaims(why) => why,
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token is not valid yet (nbf)",
            AuthError::IssuedInFuture => "token was issued in the future (iat)",
            AuthError::WrongDoc => "token does not cover this document",
            AuthError::Revoked => "token revoked",
            AuthError::OtherUser => "refresh token is for another user",
        }
    }

    /// The reason of the close 1008 that follows.
    pub fn close_reason(self) -> &'static str {
        match self {
            AuthError::Expired => "token expired",
            AuthError::Revoked => "revoked",
            _ => "unauthorized",
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for AuthError {}

/// The current time in unix seconds (0 before 1970, which no token predates).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The one token of a request: every source given must carry the same one.
///
/// # Errors
/// `Conflict` when two sources differ.
pub fn pick_token<'a>(sources: &[Option<&'a str>]) -> Result<Option<&'a str>, AuthError> {
    let mut picked: Option<&'a str> = None;
    for token in sources.iter().flatten() {
        match picked {
            Some(seen) if seen != *token => return Err(AuthError::Conflict),
            _ => picked = Some(token),
        }
    }
    Ok(picked)
}

/// Why an admin request was refused: 401 (no valid token) or 403 (valid, not an admin of `*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminRefusal {
    /// No token, or one that does not verify.
    Unauthorized(AuthError),
    /// A valid token without role `admin` on `*`.
    Forbidden,
}

/// The server's access control state, shared by the acceptor, every shard and the admin
/// worker. Exists only when at least one key is configured.
pub struct Auth {
    keys: RwLock<Arc<KeySet>>,
    revocations: RwLock<Arc<Revocations>>,
    /// Serialises revocations: read, add, write the file, swap.
    revoke_lock: Mutex<()>,
    /// Where `revocations.json` lives; `None` keeps the list in memory (`--storage memory`).
    revocations_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &*self.keys.read())
            .field("revocations", &self.revocations.read().rules().len())
            .finish()
    }
}

/// Why access control could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuthStartError {
    /// A key file.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The revocation list.
    #[error(transparent)]
    Revocations(#[from] RevocationError),
}

impl Auth {
    /// Loads the key files and the revocation list; `Ok(None)` when no key file is given
    /// (the server then runs open). `revocations_dir`: where the list is kept.
    ///
    /// # Errors
    /// A key file that cannot be used, or a revocation list that cannot be read.
    pub fn open(
        key_files: &[PathBuf],
        revocations_dir: Option<PathBuf>,
    ) -> Result<Option<Arc<Auth>>, AuthStartError> {
        if key_files.is_empty() {
            return Ok(None);
        }
        let keys = KeySet::load(key_files)?;
        let revocations = match &revocations_dir {
            Some(dir) => Revocations::load(dir)?,
            None => Revocations::new(),
        };
        Ok(Some(Arc::new(Auth {
            keys: RwLock::new(Arc::new(keys)),
            revocations: RwLock::new(Arc::new(revocations)),
            revoke_lock: Mutex::new(()),
            revocations_dir,
        })))
    }

    /// An in-memory `Auth` over given keys (tests, benches).
    pub fn with_keys(keys: KeySet) -> Arc<Auth> {
        Arc::new(Auth {
            keys: RwLock::new(Arc::new(keys)),
            revocations: RwLock::new(Arc::new(Revocations::new())),
            revoke_lock: Mutex::new(()),
            revocations_dir: None,
        })
    }

    /// Reads the key files again (SIGHUP). On any error the old keys stay in force.
    ///
    /// # Errors
    /// As [`KeySet::load`]; also when the files now hold no key at all.
    pub fn reload_keys(&self) -> Result<Arc<KeySet>, KeyError> {
        let paths = self.keys.read().paths().to_vec();
        let keys = Arc::new(KeySet::load(&paths)?);
        *self.keys.write() = keys.clone();
        Ok(keys)
    }

    /// The keys in force.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().clone()
    }

    /// The revocations in force.
    pub fn revocations(&self) -> Arc<Revocations> {
        self.revocations.read().clone()
    }

    /// Verifies `token` at `now`: signature, claims and time rules (no document yet).
    ///
    /// # Errors
    /// Every [`AuthError`] but `WrongDoc`, `Revoked`, `Conflict` and `OtherUser`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, AuthError> {
        let claims = self.keys().verify(token)?;
        Grant::from_claims(claims, now)
    }

    /// Admits `token` to `doc` at `now`: [`Auth::verify`], then [`Auth::recheck`].
    ///
    /// # Errors
    /// Any [`AuthError`].
    pub fn authorize(&self, token: Option<&str>, doc: &str, now: u64) -> Result<Grant, AuthError> {
        let grant = self.verify(token.ok_or(AuthError::Missing)?, now)?;
        self.recheck(&grant, doc, now)?;
        Ok(grant)
    }

    /// Checks an already verified grant again, for `doc` at `now`: time, scope, revocation.
    ///
    /// # Errors
    /// `Expired`, `WrongDoc` or `Revoked`.
    pub fn recheck(&self, grant: &Grant, doc: &str, now: u64) -> Result<(), AuthError> {
        grant.check_time(now)?;
        grant.check_doc(doc)?;
        self.revocations.read().check(grant, doc)
    }

    /// Admits an admin request carrying `bearer` (role `admin` on `*` needed).
    ///
    /// # Errors
    /// `Unauthorized` for a missing or invalid token, `Forbidden` for a valid non-admin one.
    pub fn authorize_admin(&self, bearer: Option<&str>, now: u64) -> Result<Grant, AdminRefusal> {
        let token = bearer.ok_or(AdminRefusal::Unauthorized(AuthError::Missing))?;
        let grant = self
            .verify(token, now)
            .map_err(AdminRefusal::Unauthorized)?;
        if self.revocations.read().check(&grant, "*").is_err() {
            return Err(AdminRefusal::Unauthorized(AuthError::Revoked));
        }
        if !grant.is_server_admin() {
            return Err(AdminRefusal::Forbidden);
        }
        Ok(grant)
    }

    /// Adds a revocation: written to `revocations.json` durably (when kept on disk) before
    /// it is in force for new connections. Returns the rule, for the shards to close the
    /// live connections it matches.
    ///
    /// # Errors
    /// A malformed request (`Err(Ok(reason))`), or the list could not be saved or is full
    /// (`Err(Err(..))`): nothing changed then.
    pub fn revoke(
        &self,
        request: &RevokeRequest,
        now: u64,
    ) -> Result<Rule, Result<&'static str, RevocationError>> {
        let rule = Rule::from_request(request, now).map_err(Ok)?;
        let _serial = self.revoke_lock.lock();
        let next = self.revocations().with(rule.clone()).map_err(Err)?;
        if let Some(dir) = &self.revocations_dir {
            next.save(dir).map_err(Err)?;
        }
        *self.revocations.write() = Arc::new(next);
        Ok(rule)
    }

    /// Puts a rule made elsewhere in force (a cluster node's revocation, `src/cluster/`),
    /// saved like [`Auth::revoke`]'s; a rule already in force changes nothing (`Ok(false)`).
    ///
    /// # Errors
    /// The list could not be saved or is full: nothing changed then.
    pub fn adopt(&self, rule: Rule) -> Result<bool, RevocationError> {
        let _serial = self.revoke_lock.lock();
        let current = self.revocations();
        if current.rules().contains(&rule) {
            return Ok(false);
        }
        let next = current.with(rule)?;
        if let Some(dir) = &self.revocations_dir {
            next.save(dir)?;
        }
        *self.revocations.write() = Arc::new(next);
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
