//! What a verified token says: [`Claims`] as they travel, [`Grant`] as the server keeps them,
//! [`Role`] and [`DocScope`], and the time rules (`exp` without leeway, `nbf`/`iat` with
//! [`CLOCK_SKEW_SECS`]).
//!
//! Pure: no clock is read here; every check takes `now` in unix seconds.

use serde::Deserialize;

use super::AuthError;

/// Leeway for `nbf` and `iat` (clock skew between the token issuer and this server). `exp`
/// gets none: a live connection is closed at `exp`, so a token is refused from then on too.
pub const CLOCK_SKEW_SECS: u64 = 30;

/// A token's claims as they travel (RFC 7519 names). Unknown claims are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Not before, unix seconds.
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Issued at, unix seconds.
    #[serde(default)]
    pub iat: Option<u64>,
    /// The document, or a prefix ending in `*`.
    pub doc: String,
    /// `read`, `write` or `admin`.
    pub role: String,
    /// Token id, for revocation.
    #[serde(default)]
    pub jti: Option<String>,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
}

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Join, read, set its own presence; every `op` is refused with `forbidden`.
    Read,
    /// Everything a client can do on the wire.
    Write,
    /// `write`, plus `/metrics` and `/admin/*` when the token covers `*`.
    Admin,
}

impl Role {
    /// The claim's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    /// The role a claim names.
    ///
    /// # Errors
    /// `BadClaims` for any other spelling.
    pub fn parse(text: &str) -> Result<Role, AuthError> {
        match text {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            _ => Err(AuthError::BadClaims("role must be read, write or admin")),
        }
    }

    /// Whether ops are allowed (`admin` implies `write`).
    pub fn can_write(self) -> bool {
        self >= Role::Write
    }
}

/// The documents a token covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DocScope {
    /// Exactly this name.
    Exact(String),
    /// Every name that starts with this (the claim without its final `*`).
    Prefix(String),
    /// `*`: every document.
    All,
}

impl DocScope {
    /// Reads a `doc` claim: `*`, `prefix*`, or an exact name.
    ///
    /// # Errors
    /// `BadClaims` when it is empty.
    pub fn parse(claim: &str) -> Result<DocScope, AuthError> {
        match claim {
            "" => Err(AuthError::BadClaims("doc must not be empty")),
            "*" => Ok(DocScope::All),
            _ => match claim.strip_suffix('*') {
                Some(prefix) => Ok(DocScope::Prefix(prefix.to_owned())),
                None => Ok(DocScope::Exact(claim.to_owned())),
            },
        }
    }

    /// Whether `doc` is covered: `team-7/*` covers `team-7/a` but not `team-70`.
    pub fn covers(&self, doc: &str) -> bool {
        match self {
            DocScope::Exact(name) => name == doc,
            DocScope::Prefix(prefix) => doc.starts_with(prefix.as_str()),
            DocScope::All => true,
        }
    }

    /// Whether this is `*`.
    pub fn is_all(&self) -> bool {
        matches!(self, DocScope::All)
    }
}

/// A verified token, as a connection keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The user (`sub`).
    pub user: String,
    /// Display name (`name`).
    pub name: Option<String>,
    /// The role.
    pub role: Role,
    /// The documents covered.
    pub scope: DocScope,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issued at, unix seconds, when the token said.
    pub iat: Option<u64>,
    /// Token id, when the token had one.
    pub jti: Option<String>,
}

impl Grant {
    /// Checks the claims' rules at `now` (unix seconds) and keeps what the server needs.
    ///
    /// # Errors
    /// `Expired` from the second `exp` names on; `NotYetValid` for an `nbf` or `iat` more
    /// than [`CLOCK_SKEW_SECS`] ahead; `BadClaims` for an empty `sub`, a bad `doc` or `role`.
    pub fn from_claims(claims: Claims, now: u64) -> Result<Grant, AuthError> {
        if claims.sub.is_empty() {
            return Err(AuthError::BadClaims("sub must not be empty"));
        }
        let role = Role::parse(&claims.role)?;
        let scope = DocScope::parse(&claims.doc)?;
        if claims.nbf.is_some_and(|nbf| nbf > now + CLOCK_SKEW_SECS) {
            return Err(AuthError::NotYetValid);
        }
        if claims.iat.is_some_and(|iat| iat > now + CLOCK_SKEW_SECS) {
            return Err(AuthError::IssuedInFuture);
        }
        let grant = Grant {
            user: claims.sub,
            name: claims.name,
            role,
            scope,
            exp: claims.exp,
            iat: claims.iat,
            jti: claims.jti,
        };
        grant.check_time(now)?;
        Ok(grant)
    }

    /// Whether the grant is still valid at `now`.
    ///
    /// # Errors
    /// `Expired` once `now >= exp`.
    pub fn check_time(&self, now: u64) -> Result<(), AuthError> {
        if now >= self.exp {
            Err(AuthError::Expired)
        } else {
            Ok(())
        }
    }

    /// Whether the grant opens `doc`.
    ///
    /// # Errors
    /// `WrongDoc` when its scope does not cover `doc`.
    pub fn check_doc(&self, doc: &str) -> Result<(), AuthError> {
        if self.scope.covers(doc) {
            Ok(())
        } else {
            Err(AuthError::WrongDoc)
        }
    }

    /// Whether this grant may use `/metrics` and `/admin/*`: role `admin` covering `*`.
    pub fn is_server_admin(&self) -> bool {
        self.role == Role::Admin && self.scope.is_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(doc: &str, role: &str, exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            nbf: None,
            iat: None,
            doc: doc.into(),
            role: role.into(),
            jti: None,
            name: None,
        }
    }

    #[test]
    fn prefix_edges() {
        let scope = DocScope::parse("team-7/*").expect("scope");
        assert!(scope.covers("team-7/a"));
        assert!(scope.covers("team-7/"));
        assert!(!scope.covers("team-70"));
        assert!(!scope.covers("team-7"));
        assert!(!scope.covers("team-70/a"));
        let exact = DocScope::parse("team-7").expect("scope");
        assert!(exact.covers("team-7") && !exact.covers("team-7/a"));
        assert!(DocScope::parse("*").expect("all").covers("anything"));
        assert!(DocScope::parse("").is_err());
    }

    #[test]
    fn time_rules() {
        let now = 1_000_000;
        assert!(Grant::from_claims(claims("d", "write", now + 1), now).is_ok());
        assert_eq!(
            Grant::from_claims(claims("d", "write", now), now),
            Err(AuthError::Expired)
        );
        let mut c = claims("d", "write", now + 100);
        c.nbf = Some(now + CLOCK_SKEW_SECS);
        assert!(Grant::from_claims(c.clone(), now).is_ok());
        c.nbf = Some(now + CLOCK_SKEW_SECS + 1);
        assert_eq!(Grant::from_claims(c, now), Err(AuthError::NotYetValid));
        let mut c = claims("d", "write", now + 100);
        c.iat = Some(now + CLOCK_SKEW_SECS + 1);
        assert_eq!(Grant::from_claims(c, now), Err(AuthError::IssuedInFuture));
    }

    #[test]
    fn bad_claims() {
        let now = 10;
        assert!(Grant::from_claims(claims("d", "owner", 100), now).is_err());
        assert!(Grant::from_claims(claims("", "read", 100), now).is_err());
        let mut c = claims("d", "read", 100);
        c.sub = String::new();
        assert!(Grant::from_claims(c, now).is_err());
        let g = Grant::from_claims(claims("*", "admin", 100), now).expect("grant");
        assert!(g.is_server_admin() && g.role.can_write());
        let g = Grant::from_claims(claims("a*", "admin", 100), now).expect("grant");
        assert!(!g.is_server_admin());
        assert!(!Role::Read.can_write());
    }
}
