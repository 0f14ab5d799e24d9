//! The shared secret of `--webhook-secret-file` and the `X-Collab-Signature` of a body.
//!
//! The secret is the whole file, byte for byte (no trimming, as with the token key files), so
//! the receiver signs exactly what the operator wrote. Never logged.

use std::io::Read;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Shortest secret accepted: 256 bits, as for an HS256 token key.
pub const SECRET_BYTES_MIN: usize = 32;
/// Longest secret file read (a mistyped path to a huge file must not be slurped).
pub const SECRET_BYTES_MAX: usize = 64 * 1024;

/// The key every delivery is signed with.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read --webhook-secret-file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Too short (or empty) to sign with.
    #[error(
        "--webhook-secret-file {path} holds {len} bytes; at least {SECRET_BYTES_MIN} are needed \
         (e.g. `head -c 32 /dev/urandom > {path}`)"
    )]
    TooShort {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// Larger than [`SECRET_BYTES_MAX`].
    #[error("--webhook-secret-file {path} is larger than {SECRET_BYTES_MAX} bytes")]
    TooLong {
        /// The file.
        path: String,
    },
}

impl Secret {
    /// The secret `bytes` (at least [`SECRET_BYTES_MIN`] of them).
    ///
    /// # Errors
    /// `TooShort` for fewer bytes; `path` only names the source in the message.
    pub fn from_bytes(bytes: Vec<u8>, path: &str) -> Result<Secret, SecretError> {
        if bytes.len() < SECRET_BYTES_MIN {
            return Err(SecretError::TooShort {
                path: path.to_owned(),
                len: bytes.len(),
            });
        }
        Ok(Secret(bytes))
    }

    /// Reads the whole file as the secret.
    ///
    /// # Errors
    /// When it cannot be read, is shorter than [`SECRET_BYTES_MIN`] or longer than
    /// [`SECRET_BYTES_MAX`].
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let shown = path.display().to_string();
        let io = |source| SecretError::Io {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        file.take(SECRET_BYTES_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() > SECRET_BYTES_MAX {
            return Err(SecretError::TooLong { path: shown });
        }
        Secret::from_bytes(bytes, &shown)
    }

    /// The `X-Collab-Signature` value of `body`: `sha256=` and the lower-case hex HMAC-SHA256
    /// of the exact bytes.
    pub fn signature(&self, body: &[u8]) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            // HMAC takes keys of any length; the constructor only fails for fixed-size MACs.
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        };
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256=");
        for byte in digest.iter() {
            use std::fmt::Write;
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2_and_a_long_key() {
        // RFC 4231 test case 2 has a 4-byte key, below our floor: check the MAC itself.
        let secret = Secret(b"Jefe".to_vec());
        assert_eq!(
            secret.signature(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a 131-byte key (longer than the block) is hashed first.
        let secret = Secret(vec![0xaa; 131]);
        assert_eq!(
            secret.signature(b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "sha256=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn short_and_empty_secrets_are_refused() {
        for len in [0, 1, SECRET_BYTES_MIN - 1] {
            let err = Secret::from_bytes(vec![7; len], "s").expect_err("short");
            assert!(
                err.to_string().contains(&format!("holds {len} bytes")),
                "{err}"
            );
        }
        assert!(Secret::from_bytes(vec![7; SECRET_BYTES_MIN], "s").is_ok());
        let dir = std::env::temp_dir().join(format!("collab-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("secret");
        // Byte for byte: a trailing newline is part of the secret.
        std::fs::write(&path, b"0123456789abcdef0123456789abcdef\n").expect("write");
        let secret = Secret::from_file(&path).expect("33 bytes");
        assert_eq!(secret.0.len(), 33);
        std::fs::write(&path, b"").expect("write");
        assert!(matches!(
            Secret::from_file(&path),
            Err(SecretError::TooShort { len: 0, .. })
        ));
        assert!(matches!(
            Secret::from_file(&dir.join("missing")),
            Err(SecretError::Io { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
