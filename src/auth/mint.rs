//! Signing tokens: the `collab-engine token` command, `collab-load --mint-key-file` and the
//! tests. HS256 from a secret file (read exactly as the server reads it), EdDSA from an
//! Ed25519 private key in PEM.

use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::{Role, HS256_SECRET_BYTES_MIN};

/// A signing key.
pub struct MintKey {
    algorithm: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for MintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// The claims a minted token carries.
#[derive(Clone, Debug, Serialize)]
pub struct MintClaims {
    /// The user.
    pub sub: String,
    /// The document or `prefix*` or `*`.
    pub doc: String,
    /// `read`, `write` or `admin`.
    pub role: &'static str,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Expiry (unix seconds).
    pub exp: u64,
    /// Token id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl MintClaims {
    /// Claims for `sub` on `doc` with `role`, issued `now`, valid for `ttl_secs`.
    pub fn new(sub: &str, doc: &str, role: Role, now: u64, ttl_secs: u64) -> MintClaims {
        MintClaims {
            sub: sub.to_owned(),
            doc: doc.to_owned(),
            role: role.as_str(),
            iat: now,
            exp: now.saturating_add(ttl_secs),
            jti: None,
            name: None,
        }
    }
}

/// Why a key could not sign.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Reading the key file.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Not a usable key.
    #[error("{0}")]
    Invalid(String),
}

impl MintKey {
    /// An HS256 key from secret bytes (at least 32).
    ///
    /// # Errors
    /// A shorter secret.
    pub fn hs256(secret: &[u8]) -> Result<MintKey, MintError> {
        if secret.len() < HS256_SECRET_BYTES_MIN {
            return Err(MintError::Invalid(format!(
                "an HS256 secret of {} bytes; at least {HS256_SECRET_BYTES_MIN} are needed",
                secret.len()
            )));
        }
        let key = EncodingKey::from_secret(secret)
            .map_err(|e| MintError::Invalid(format!("not a usable HS256 secret: {e}")))?;
        Ok(MintKey {
            algorithm: Algorithm::HS256,
            key,
        })
    }

    /// An EdDSA key from an Ed25519 private key in PEM (PKCS#8).
    ///
    /// # Errors
    /// PEM that is not an Ed25519 private key.
    pub fn ed25519_pem(pem: &[u8]) -> Result<MintKey, MintError> {
        let key = EncodingKey::from_ed_pem(pem).map_err(|e| {
            MintError::Invalid(format!("PEM that is not an Ed25519 private key: {e}"))
        })?;
        Ok(MintKey {
            algorithm: Algorithm::EdDSA,
            key,
        })
    }

    /// A key from a file: PEM is an Ed25519 private key, anything else an HS256 secret (the
    /// whole file, a trailing newline included, as the server reads it).
    ///
    /// # Errors
    /// When the file cannot be read or holds no usable key.
    pub fn from_file(path: &Path) -> Result<MintKey, MintError> {
        let bytes = std::fs::read(path).map_err(|source| MintError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            MintKey::ed25519_pem(&bytes)
        } else {
            MintKey::hs256(&bytes)
        }
    }

    /// The algorithm name (`HS256` or `EdDSA`).
    pub fn algorithm(&self) -> &'static str {
        match self.algorithm {
            Algorithm::HS256 => "HS256",
            _ => "EdDSA",
        }
    }

    /// Signs `claims` into a compact JWT; `kid` goes into the header when given.
    ///
    /// # Errors
    /// When signing fails (it does not for valid keys).
    pub fn sign<C: Serialize>(&self, claims: &C, kid: Option<&str>) -> Result<String, MintError> {
        let mut header = Header::new(self.algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.key)
            .map_err(|e| MintError::Invalid(format!("signing failed: {e}")))
    }
}

/// An Ed25519 key pair from a 32-byte seed, as PEM: `(private PKCS#8, public SPKI)`. For
/// tests and load runs that need a key pair without an external tool; production keys come
/// from the token issuer (e.g. `openssl genpkey -algorithm ed25519`).
pub fn ed25519_pem_pair(seed: &[u8; 32]) -> (String, String) {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    // RFC 8410: the DER of a PKCS#8 Ed25519 private key and of its SPKI public key are a
    // fixed prefix followed by the 32 key bytes.
    const PRIVATE_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const PUBLIC_PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let public = ed25519_dalek::SigningKey::from_bytes(seed)
        .verifying_key()
        .to_bytes();
    let pem = |label: &str, prefix: &[u8], key: &[u8]| {
        let der: Vec<u8> = prefix.iter().chain(key).copied().collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            STANDARD.encode(der)
        )
    };
    (
        pem("PRIVATE KEY", &PRIVATE_PREFIX, seed),
        pem("PUBLIC KEY", &PUBLIC_PREFIX, &public),
    )
}
