//! TLS to PostgreSQL: the URL's `sslmode` plus `--database-ca-file`, on rustls (ring provider).
//!
//! [`PgTls::new`] settles the policy once, at start, so that every connection (the first one,
//! each reconnect, the cancel request after a missed deadline) uses the same one:
//!
//! - `sslmode=disable`: plain TCP. A CA file as well is a contradiction and refused.
//! - `sslmode=prefer` (the default) without a CA file: plain TCP, as before TLS support, because
//!   there is nothing to verify a certificate against and an unverified session is never used.
//! - `sslmode=prefer` with a CA file: TLS when the server offers it, plain TCP when it refuses.
//! - `sslmode=require`: TLS or nothing; without a CA file the server refuses to start.
//!
//! Whenever TLS is used the server's certificate must chain to the CA file and name the host
//! of the URL (a DNS name or an IP address in its subjectAltName), like libpq's `verify-full`.
//! Channel binding (`SCRAM-SHA-256-PLUS`) is not offered; SCRAM-SHA-256 still works.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Why the TLS settings cannot be used (found at start, before any connection).
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// `sslmode=require` with nothing to verify the server against.
    #[error(
        "sslmode=require needs --database-ca-file (the PEM CA that signed the database server's \
         certificate); an unverified TLS session is never used"
    )]
    RequireWithoutCa,
    /// `sslmode=disable` and a CA file: one of them is a mistake.
    #[error("--database-ca-file {0} given but the database URL says sslmode=disable")]
    CaWithDisable(PathBuf),
    /// An `sslmode` this client does not implement.
    #[error("sslmode {0:?} is not supported (use disable, prefer or require)")]
    UnsupportedMode(String),
    /// The CA file could not be read or holds no usable certificate.
    #[error("--database-ca-file {path}: {detail}")]
    CaFile {
        /// The file named.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

/// The TLS policy of every connection to one database (cheap to clone).
///
/// `None` inside means plain TCP: the config's `sslmode` is then set to `disable`, so
/// tokio-postgres never asks for a TLS connector.
#[derive(Clone)]
pub struct PgTls {
    client: Option<Arc<ClientConfig>>,
}

impl PgTls {
    /// Settles the policy of `config`'s `sslmode` and `ca_file`, adjusting `config` (see the
    /// module documentation).
    ///
    /// # Errors
    /// `require` without a CA file, `disable` with one, an unreadable or empty CA file.
    pub fn new(
        config: &mut tokio_postgres::Config,
        ca_file: Option<&Path>,
    ) -> Result<PgTls, TlsConfigError> {
        let mode = config.get_ssl_mode();
        match (mode, ca_file) {
            (SslMode::Disable, None) => Ok(PgTls { client: None }),
            (SslMode::Disable, Some(path)) => Err(TlsConfigError::CaWithDisable(path.to_owned())),
            (SslMode::Prefer, None) => {
                config.ssl_mode(SslMode::Disable);
                Ok(PgTls { client: None })
            }
            (SslMode::Require, None) => Err(TlsConfigError::RequireWithoutCa),
            (SslMode::Prefer | SslMode::Require, Some(path)) => {
                let ca_error = |detail: String| TlsConfigError::CaFile {
                    path: path.to_owned(),
                    detail,
                };
                let roots = crate::tls::load_roots(path).map_err(ca_error)?;
                let client = crate::tls::client_config(roots).map_err(ca_error)?;
                Ok(PgTls {
                    client: Some(client),
                })
            }
            (other, _) => Err(TlsConfigError::UnsupportedMode(format!("{other:?}"))),
        }
    }

    /// Whether connections may use TLS (`false`: plain TCP only).
    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        // tokio-postgres asks for a connector even with sslmode=disable (it then never uses
        // it): hand out one that can only refuse.
        let Some(client) = &self.client else {
            return Ok(PgTlsConnect { tls: None });
        };
        let name = ServerName::try_from(domain.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("database host {domain:?} is not a TLS server name: {e}"),
            )
        })?;
        Ok(PgTlsConnect {
            tls: Some((tokio_rustls::TlsConnector::from(Arc::clone(client)), name)),
        })
    }
}

/// One TLS handshake to come, to the host it must be verified against (`None`: TLS is off,
/// and a handshake is refused rather than done unverified).
pub struct PgTlsConnect {
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let Some((connector, name)) = self.tls else {
                return Err(io::Error::other("TLS is not configured for this database"));
            };
            let stream = connector.connect(name, stream).await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A verified TLS session to the database.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> tokio_postgres::Config {
        url.parse().expect("url")
    }

    #[test]
    fn require_without_ca_is_refused() {
        let mut c = config("postgres://u@h/db?sslmode=require");
        assert!(matches!(
            PgTls::new(&mut c, None),
            Err(TlsConfigError::RequireWithoutCa)
        ));
    }

    #[test]
    fn prefer_without_ca_is_plain() {
        let mut c = config("postgres://u@h/db");
        let tls = PgTls::new(&mut c, None).expect("prefer");
        assert!(!tls.enabled());
        assert_eq!(c.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn disable_with_ca_is_refused() {
        let mut c = config("postgres://u@h/db?sslmode=disable");
        let err = PgTls::new(&mut c, Some(Path::new("/nonexistent.pem")));
        assert!(matches!(err, Err(TlsConfigError::CaWithDisable(_))));
    }

    #[test]
    fn bad_ca_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("collab-pgtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("missing.pem");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, b"just text\n").expect("write");
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        for path in [&missing, &empty, &garbage] {
            let mut c = config("postgres://u@h/db?sslmode=require");
            let err = PgTls::new(&mut c, Some(path)).err();
            assert!(
                matches!(err, Some(TlsConfigError::CaFile { .. })),
                "{}: {err:?}",
                path.display()
            );
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
