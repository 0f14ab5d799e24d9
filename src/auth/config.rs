//! [`AuthConfig`]: the access-control flags, flattened into the server's `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Access control flags.
#[derive(Clone, Debug, Default, Args)]
pub struct AuthConfig {
    /// A token verification key: a raw HS256 secret (the whole file, at least 32 bytes) or an
    /// Ed25519 public key in PEM. Repeatable; the key's id (a token's `kid`) is the file name
    /// without extension. With at least one key every connection needs a valid token, and
    /// SIGHUP reloads the files. Without any the server is open to everyone.
    #[arg(
        long = "auth-key-file",
        value_name = "PATH",
        env = "COLLAB_AUTH_KEY_FILE",
        value_delimiter = ','
    )]
    pub key_files: Vec<PathBuf>,

    /// Serve `/metrics` without an admin token even when keys are configured.
    #[arg(long, env = "COLLAB_METRICS_PUBLIC")]
    pub metrics_public: bool,

    /// Serve `/metrics` and `/admin/*` on this address instead of the client port (keep it
    /// private: a loopback or internal address).
    #[arg(long, value_name = "ADDR", env = "COLLAB_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
}
