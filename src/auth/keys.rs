//! [`KeySet`]: the verification keys from `--auth-key-file`, and [`KeySet::verify`], the one
//! function that turns a compact JWT into [`Claims`].
//!
//! A key file holds either a raw HS256 secret (the whole file, byte for byte, at least
//! [`HS256_SECRET_BYTES_MIN`] bytes) or an Ed25519 public key in PEM. A key's id is its file
//! name without extension; a token's `kid`, when present, must name one. Each key verifies
//! only its own algorithm, so an HS256 token "signed" with a public key's bytes never meets
//! an HMAC key made from them (algorithm confusion).
//!
//! Reads files only in [`KeySet::load`]; verification is pure.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{AuthError, Claims};

/// Shortest HS256 secret accepted: 256 bits, as RFC 7518 section 3.2 asks.
pub const HS256_SECRET_BYTES_MIN: usize = 32;

/// Longest token looked at; longer ones are refused before any decoding.
pub const TOKEN_BYTES_MAX: usize = 8 * 1024;

/// The algorithm a key verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// Ed25519 signatures, checked with a public key.
    EdDsa,
}

impl KeyKind {
    fn algorithm(self) -> Algorithm {
        match self {
            KeyKind::Hs256 => Algorithm::HS256,
            KeyKind::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// One verification key.
struct Key {
    /// The file name without extension.
    id: String,
    kind: KeyKind,
    decoding: DecodingKey,
}

/// Why the key files could not be loaded (startup fails; a SIGHUP reload keeps the old keys).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("reading key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file holds no usable key.
    #[error("key file {path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Two files have the same name without extension, so a `kid` could not tell them apart.
    #[error("key files {first} and {second} have the same id {id:?} (the name without extension)")]
    DuplicateId {
        /// The id.
        id: String,
        /// The first file.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
    },
}

/// Every verification key of the server.
pub struct KeySet {
    keys: Vec<Key>,
    /// Where each key came from, in `keys` order (for reload and messages).
    paths: Vec<PathBuf>,
    validations: [Validation; 2],
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("ids", &self.keys.iter().map(|k| &k.id).collect::<Vec<_>>())
            .finish()
    }
}

/// The part of a JOSE header looked at before verification.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The id of the key in `path`: its file name without extension.
pub fn key_id(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `bytes` look like PEM (an Ed25519 key) rather than a raw secret.
fn is_pem(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"-----BEGIN")
}

fn validation(alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    // The time and scope rules are ours (claims.rs): exp without leeway, nbf and iat with
    // 30 s. The crate checks the signature and the algorithm only.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    validation
}

impl KeySet {
    /// Reads every key file.
    ///
    /// # Errors
    /// When a file cannot be read, holds no valid key (a secret under 32 bytes, PEM that is
    /// not an Ed25519 public key), or two files share an id.
    pub fn load(paths: &[PathBuf]) -> Result<KeySet, KeyError> {
        let mut keys: Vec<Key> = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })?;
            let invalid = |detail: String| KeyError::Invalid {
                path: path.clone(),
                detail,
            };
            let (kind, decoding) = if is_pem(&bytes) {
                let decoding = DecodingKey::from_ed_pem(&bytes).map_err(|e| {
                    invalid(format!(
                        "PEM that is not an Ed25519 public key ({e}); the server takes the public key, the token issuer keeps the private one"
                    ))
                })?;
                (KeyKind::EdDsa, decoding)
            } else {
                if bytes.len() < HS256_SECRET_BYTES_MIN {
                    return Err(invalid(format!(
                        "an HS256 secret of {} bytes; at least {HS256_SECRET_BYTES_MIN} are needed",
                        bytes.len()
                    )));
                }
                let decoding = DecodingKey::from_secret(&bytes)
                    .map_err(|e| invalid(format!("not a usable HS256 secret: {e}")))?;
                (KeyKind::Hs256, decoding)
            };
            let id = key_id(path);
            if let Some(idx) = keys.iter().position(|k| k.id == id) {
                return Err(KeyError::DuplicateId {
                    id,
                    first: paths[idx].clone(),
                    second: path.clone(),
                });
            }
            keys.push(Key { id, kind, decoding });
        }
        Ok(KeySet {
            keys,
            paths: paths.to_vec(),
            validations: [validation(Algorithm::HS256), validation(Algorithm::EdDSA)],
        })
    }

    /// Whether no key is configured (the server then runs open).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The files the keys came from.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The ids and kinds of the keys, for the startup log.
    pub fn describe(&self) -> Vec<(String, KeyKind)> {
        self.keys.iter().map(|k| (k.id.clone(), k.kind)).collect()
    }

    /// Verifies a compact JWT's size, header and signature and returns its claims. The time,
    /// scope and revocation rules are the caller's ([`super::Grant::from_claims`]).
    ///
    /// # Errors
    /// `TooLarge` over [`TOKEN_BYTES_MAX`] (nothing decoded); `Malformed` when it is not a
    /// JWT; `Algorithm` for `none` and every alg but HS256 and EdDSA; `UnknownKey` for a `kid`
    /// no file has, or an alg no key (or not the `kid`'s key) verifies; `BadSignature`;
    /// `BadClaims` when the payload lacks a claim or has one of the wrong type.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AuthError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| AuthError::Malformed)?;
        let header: RawHeader =
            serde_json::from_slice(&header_json).map_err(|_| AuthError::Malformed)?;
        let kind = match header.alg.as_str() {
            "HS256" => KeyKind::Hs256,
            "EdDSA" => KeyKind::EdDsa,
            "none" | "None" | "NONE" => return Err(AuthError::AlgNone),
            _ => return Err(AuthError::Algorithm),
        };
        let validation = &self.validations[match kind {
            KeyKind::Hs256 => 0,
            KeyKind::EdDsa => 1,
        }];
        debug_assert_eq!(validation.algorithms, [kind.algorithm()]);
        let mut candidates = self
            .keys
            .iter()
            .filter(|key| header.kid.as_deref().map_or(true, |kid| kid == key.id))
            .peekable();
        if candidates.peek().is_none() {
            return Err(AuthError::UnknownKey);
        }
        let mut tried = 0;
        for key in candidates.filter(|key| key.kind == kind) {
            tried += 1;
            match jsonwebtoken::decode::<Claims>(token, &key.decoding, validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => continue,
                    ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                        return Err(AuthError::BadClaims(
                            "claims are not JSON with string sub, doc and role and integer exp",
                        ))
                    }
                    ErrorKind::InvalidAlgorithm => return Err(AuthError::Algorithm),
                    _ => return Err(AuthError::Malformed),
                },
            }
        }
        if tried == 0 {
            // A kid naming a key of the other kind, or an alg no key verifies: never try a
            // key with an algorithm it was not made for.
            return Err(AuthError::UnknownKey);
        }
        Err(AuthError::BadSignature)
    }
}
