//! [`PgStorage`]: the [`Storage`] kept in PostgreSQL (`--database-url`), with the same
//! semantics as [`DiskStorage`](super::DiskStorage): an op log with `server_seq`, snapshots that
//! compact the log they cover, the epoch, durable replica reservations, per-document
//! corruption refused with [`StorageError::Corrupt`].
//!
//! Schema (`migrations/*.sql`, applied by [`migrate`]): `collab_docs` holds one row per
//! document (name as bytea, epoch, replicas reserved, the newest snapshot), `collab_ops` one
//! row per accepted op message after the snapshot (`doc_id`, `server_seq`, CRC32C, the
//! `op_echo` JSON). Nothing depends on the shard count or the node. Document names only ever
//! travel as statement parameters.
//!
//! Group commit: [`Storage::append`] only buffers; [`Storage::sync`] sends every record
//! appended since the previous sync as one statement (arrays expanded with `unnest`, new
//! documents created in the same statement by a data-modifying CTE) in autocommit mode: one
//! round trip, one transaction, one WAL flush. The records count as durable when that
//! statement has returned success, i.e. after PostgreSQL's COMMIT (`synchronous_commit=on`,
//! or `off` with `--fsync never`).
//!
//! Blocking by design: the calls wait for the database (each bounded by `--database-timeout`).
//! The driver is tokio-postgres on a private single-threaded runtime, so every statement has a
//! client-side deadline that the blocking `postgres` wrapper cannot give.
//!
//! Failures are values: an unreachable database makes calls fail fast (a reconnect is tried
//! with exponential backoff, 100 ms to 2 s); a commit that the server refused is an
//! [`StorageError::Io`] (nothing of it is durable); a commit whose answer never came (the
//! connection dropped, a FATAL error, or the deadline passed, after which the query is
//! cancelled and the connection dropped) is [`StorageError::OutcomeUnknown`]: it may or may
//! not have committed, and the documents it touched must be reloaded before they serve again.

pub mod lease;
mod migrate;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};
use tungstenite::Utf8Bytes;

pub use lease::{Incarnation, LeaseBook, LeaseCounters};
pub use migrate::{migrate, MigrateError, MIGRATIONS, SCHEMA_VERSION};
pub use tls::{PgTls, TlsConfigError};

use super::{LogRecord, Storage, StorageError, StoredDoc, StoredSnapshot};

/// First wait before reconnecting after a failed connection attempt; doubled per failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts, so a database that is back is used within it.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest wait for the cancel request sent after a deadline passed.
const CANCEL_WAIT_MAX: Duration = Duration::from_secs(1);
/// Buffers kept across syncs up to this many records; bigger ones are freed.
const RECORDS_KEPT_MAX: usize = 4096;

/// How to reach the database and how long to wait for it.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?...]` or a libpq key=value string.
    pub url: String,
    /// Deadline of every statement, COMMIT and connection attempt (`--database-timeout`).
    pub timeout: Duration,
    /// `synchronous_commit` of the session: `on` unless `--fsync never`.
    pub synchronous_commit: bool,
    /// PEM CA the server's certificate must chain to (`--database-ca-file`); TLS is used only
    /// with one (see [`tls`] for how it combines with the URL's `sslmode`).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Why the database could not be used at all (bad URL, unreachable at start, schema refused).
#[derive(Debug, thiserror::Error)]
pub enum PgOpenError {
    /// The URL did not parse.
    #[error("invalid --database-url: {0}")]
    Url(tokio_postgres::Error),
    /// The TLS settings (`sslmode`, `--database-ca-file`) cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// Connecting or preparing the session failed.
    #[error("connecting to the database {target}: {detail}")]
    Connect {
        /// Host, port and database (never the password).
        target: String,
        /// What went wrong.
        detail: String,
    },
    /// The schema could not be brought to this binary's version.
    #[error("database {target}: {source}")]
    Schema {
        /// Host, port and database.
        target: String,
        /// Why.
        source: MigrateError,
    },
    /// The private runtime could not be created.
    #[error("creating the database client's runtime: {0}")]
    Runtime(std::io::Error),
}

/// The prepared statements of one connection.
struct Statements {
    load_doc: Statement,
    load_ops: Statement,
    load_owners: Statement,
    commit: Statement,
    snapshot: Statement,
}

/// A live connection: the client, the task driving its socket, its statements.
struct Conn {
    client: Client,
    driver: JoinHandle<()>,
    stmts: Statements,
    /// Statements of [`PgStorage::query`], prepared on first use (the cluster's directory
    /// runs the same few every round).
    prepared: HashMap<&'static str, Statement>,
    /// The server process of this session.
    backend: Backend,
}

/// A server process, named so that a reused pid is never mistaken for it.
#[derive(Clone, Debug, PartialEq)]
struct Backend {
    pid: i32,
    /// `pg_stat_activity.backend_start`, as text (exact, and no date type needed).
    started: String,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closes the socket now instead of whenever the runtime next runs the task.
        self.driver.abort();
    }
}

/// What one loaded or written document looks like to this storage.
#[derive(Debug, Default)]
struct DocState {
    /// `collab_docs.id`, once known (the row may not exist yet).
    id: Option<i64>,
    /// Epoch given with the first record of a document not yet in the database.
    epoch: String,
    /// Ops appended since the last sync, in order.
    pending_ops: Vec<(u64, Utf8Bytes)>,
    /// Highest reservation appended since the last sync.
    pending_reserved: Option<u64>,
    /// Replica owners (`LogRecord::ReplicaOwner`) appended since the last sync.
    pending_owners: Vec<(u64, String)>,
    /// Acceptance times (`LogRecord::Accepted`) of pending ops, by `server_seq`.
    pending_times: Vec<(u64, u64)>,
    /// Listed in `PgStorage::touched`.
    touched: bool,
    /// `release` came while records were pending: drop after the next sync.
    release_after_sync: bool,
}

/// How a database call failed.
enum CallError {
    /// The server refused with an ERROR: the statement (and its transaction) had no effect,
    /// and the connection is still usable.
    Refused(tokio_postgres::Error),
    /// No complete answer: the connection dropped, the server sent FATAL, or the deadline
    /// passed. The statement may or may not have taken effect; the connection is dropped.
    Lost(String),
}

/// The document log and snapshots in PostgreSQL, one value (and one connection) per shard.
pub struct PgStorage {
    rt: Runtime,
    config: tokio_postgres::Config,
    /// TLS policy of every connection and cancel request.
    tls: PgTls,
    /// `host:port/db` for messages (never the password).
    target: String,
    timeout: Duration,
    synchronous_commit: bool,
    conn: Option<Conn>,
    /// No connection attempt before this instant.
    next_attempt: Instant,
    /// Wait after the next failed attempt.
    backoff: Duration,
    /// Whether the last attempt failed (so a recovery is logged once).
    was_down: bool,
    /// The session of a call whose answer never came. It may still be running (a paused
    /// server, a slow COMMIT): nothing is read or written before it is gone, or a reload could
    /// miss a commit that lands after it and the document would reuse its `server_seq`s.
    zombie: Option<Backend>,
    docs: HashMap<String, DocState>,
    /// Documents with pending records, in first-append order; drained by `sync`.
    touched: Vec<String>,
    /// `<data_dir>/LOCK` when the server keeps local files beside the database
    /// ([`PgStorage::keep_lock`]).
    _lock: Option<std::fs::File>,
    /// Cluster mode ([`PgStorage::with_leases`]): documents are served under fenced leases.
    leases: Option<lease::LeaseMode>,
}

impl PgStorage {
    /// Connects, applies the schema migrations this binary knows (refusing a newer schema),
    /// and prepares the session. Later connection losses are retried with backoff instead.
    ///
    /// # Errors
    /// When the URL is invalid, the database is unreachable, or the schema is refused.
    pub fn open(options: &PgOptions) -> Result<PgStorage, PgOpenError> {
        let mut config: tokio_postgres::Config = options.url.parse().map_err(PgOpenError::Url)?;
        config
            .connect_timeout(options.timeout)
            .tcp_user_timeout(options.timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("collab-engine");
        }
        let tls = PgTls::new(&mut config, options.ca_file.as_deref())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(PgOpenError::Runtime)?;
        let target = describe_target(&config);
        let mut storage = PgStorage {
            rt,
            config,
            tls,
            target,
            timeout: options.timeout,
            synchronous_commit: options.synchronous_commit,
            conn: None,
            next_attempt: Instant::now(),
            backoff: BACKOFF_MIN,
            was_down: false,
            zombie: None,
            docs: HashMap::new(),
            touched: Vec::new(),
            _lock: None,
            leases: None,
        };
        let conn = storage.try_connect()?;
        storage.conn = Some(conn);
        Ok(storage)
    }

    /// Holds `lock` (the data directory's LOCK, see [`super::lock_data_dir`]) as long as this
    /// storage lives, as `DiskStorage` does: documents are in the database, but the data
    /// directory still holds the server's local files and belongs to one process.
    pub fn keep_lock(&mut self, lock: std::fs::File) {
        self._lock = Some(lock);
    }

    /// Cluster mode: this storage serves a document only under its lease, held by incarnation
    /// `holder` (acquired by `load`, valid while the node's heartbeat is), and every commit
    /// and snapshot checks the lease's fence in its own transaction (`lease.rs`). Leases held
    /// are recorded in `book`.
    pub fn with_leases(mut self, holder: Incarnation, book: LeaseBook) -> PgStorage {
        self.leases = Some(lease::LeaseMode {
            holder,
            book,
            fences: HashMap::new(),
            fenced: Vec::new(),
        });
        self
    }

    /// Runs one statement on this storage's connection, with its deadline, reconnecting when
    /// the backoff allows (the cluster's directory thread uses a `PgStorage` of its own for
    /// its connection).
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached or the answer did not come (the
    /// statement may or may not have taken effect); `Io` when the server refused it.
    pub fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StorageError> {
        self.conn()?;
        let mut conn = self
            .take_conn()
            .map_err(|e| call_error("a cluster statement", e))?;
        let result = self.rt.block_on(with_deadline(self.timeout, async {
            let statement = match conn.prepared.get(sql) {
                Some(statement) => statement.clone(),
                None => {
                    let statement = conn.client.prepare(sql).await?;
                    conn.prepared.insert(sql, statement.clone());
                    statement
                }
            };
            conn.client.query(&statement, params).await
        }));
        self.settle(conn, result)
            .map_err(|e| call_error("a cluster statement", e))
    }

    /// Takes (or finds held by us) `doc`'s lease; its fence.
    fn acquire(&mut self, doc: &str) -> Result<i64, StorageError> {
        let Some(mode) = &self.leases else {
            return Ok(0);
        };
        if !mode.book.may_acquire() {
            return Err(StorageError::Fenced {
                reason: "this node cannot renew its leases; it takes no document".to_owned(),
            });
        }
        let holder = mode.holder.0;
        let name = doc.as_bytes();
        let rows = self.query(lease::SQL_ACQUIRE, &[&name, &holder])?;
        let Some(mode) = self.leases.as_mut() else {
            return Ok(0);
        };
        match rows.first() {
            Some(row) => {
                let fence: i64 = row.get(0);
                mode.fences.insert(doc.to_owned(), fence);
                mode.book.insert(doc, fence);
                LeaseBook::count(&mode.book.counters().acquisitions);
                Ok(fence)
            }
            None => Err(StorageError::Fenced {
                reason: "another node holds the document's lease (or this node is draining)"
                    .to_owned(),
            }),
        }
    }

    /// Gives `doc`'s lease up, when this storage holds it (best effort: an unreleased lease
    /// simply expires, since the directory renews only the leases in the book).
    fn release_lease(&mut self, doc: &str) {
        let Some(mode) = self.leases.as_mut() else {
            return;
        };
        if mode.fences.remove(doc).is_none() {
            return;
        }
        mode.book.remove(doc);
        let holder = mode.holder.0;
        let name = doc.as_bytes();
        if let Err(e) = self.query(lease::SQL_RELEASE, &[&name, &holder]) {
            log::warn!("releasing a document's lease failed (it expires by itself): {e}");
        }
    }

    /// `host:port/db` of the database (never the password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Every document stored, by name, sorted (for `collab-engine copy`).
    ///
    /// # Errors
    /// `Io` when the database cannot be read; `Corrupt` for a name that is not UTF-8.
    pub fn list_docs(&mut self) -> Result<Vec<String>, StorageError> {
        self.conn()?;
        let conn = self
            .take_conn()
            .map_err(|e| call_error("listing documents", e))?;
        let result = self.rt.block_on(with_deadline(
            self.timeout * 10,
            conn.client
                .query("SELECT id, name FROM collab_docs ORDER BY name", &[]),
        ));
        let rows = self
            .settle(conn, result)
            .map_err(|e| call_error("listing documents", e))?;
        let mut names = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.get(0);
            let name: Vec<u8> = row.get(1);
            let name = String::from_utf8(name).map_err(|_| {
                corrupt(&format!("collab_docs row id {id}"), 0, "name is not UTF-8")
            })?;
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// Whether a connection is open right now (it may still turn out to be dead).
    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.client.is_closed())
    }

    /// One connection attempt: connect, migrate, set the session up, prepare statements.
    fn try_connect(&mut self) -> Result<Conn, PgOpenError> {
        let connect_error = |detail: String| PgOpenError::Connect {
            target: self.target.clone(),
            detail,
        };
        let connecting = self.config.connect(self.tls.clone());
        let (mut client, connection) =
            match self.rt.block_on(with_deadline(self.timeout, connecting)) {
                Some(Ok(pair)) => pair,
                Some(Err(e)) => return Err(connect_error(describe(&e))),
                None => {
                    return Err(connect_error(format!(
                        "no answer within {:?}",
                        self.timeout
                    )))
                }
            };
        let driver = self.rt.spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("database connection ended: {e}");
            }
        });
        let timeout_ms = self.timeout.as_millis().max(1);
        let sync_commit = if self.synchronous_commit { "on" } else { "off" };
        let setup = async {
            let encoding: String = client
                .query_one("SHOW server_encoding", &[])
                .await
                .map_err(|e| describe(&e))?
                .get(0);
            if encoding != "UTF8" {
                return Err(format!(
                    "the database encoding is {encoding}; collab-engine needs UTF8 \
                     (CREATE DATABASE ... ENCODING 'UTF8')"
                ));
            }
            client
                .batch_execute(&format!(
                    "SET client_min_messages = warning; \
                     SET statement_timeout = {timeout_ms}; \
                     SET lock_timeout = {timeout_ms}; \
                     SET idle_in_transaction_session_timeout = {}; \
                     SET synchronous_commit = {sync_commit}",
                    timeout_ms * 2
                ))
                .await
                .map_err(|e| describe(&e))?;
            let row = client
                .query_one(
                    "SELECT pid, backend_start::text FROM pg_stat_activity \
                     WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| describe(&e))?;
            Ok(Backend {
                pid: row.get(0),
                started: row.get(1),
            })
        };
        let backend = match self.rt.block_on(with_deadline(self.timeout, setup)) {
            Some(Ok(backend)) => backend,
            Some(Err(detail)) => return Err(connect_error(detail)),
            None => return Err(connect_error("session setup timed out".to_owned())),
        };
        if let Some(zombie) = self.zombie.clone() {
            let ending = end_session(&client, zombie.clone(), self.timeout);
            match self.rt.block_on(with_deadline(self.timeout, ending)) {
                Some(Ok(())) => {
                    log::info!(
                        "database {}: the session {} of an unanswered call has ended",
                        self.target,
                        zombie.pid
                    );
                    self.zombie = None;
                }
                Some(Err(e)) => {
                    return Err(connect_error(format!(
                        "ending session {}: {}",
                        zombie.pid,
                        describe(&e)
                    )))
                }
                None => {
                    return Err(connect_error(format!(
                        "the session {} of an unanswered call is still running; \
                         waiting for it before using the database again",
                        zombie.pid
                    )))
                }
            }
        }
        match self
            .rt
            .block_on(with_deadline(self.timeout * 4, migrate(&mut client)))
        {
            Some(Ok(applied)) => {
                if !applied.is_empty() {
                    log::info!(
                        "database {}: applied schema migrations {applied:?}",
                        self.target
                    );
                }
            }
            Some(Err(source)) => {
                return Err(PgOpenError::Schema {
                    target: self.target.clone(),
                    source,
                })
            }
            None => return Err(connect_error("schema migration timed out".to_owned())),
        }
        let prepare = async {
            Ok::<_, tokio_postgres::Error>(Statements {
                load_doc: client.prepare(SQL_LOAD_DOC).await?,
                load_ops: client.prepare(SQL_LOAD_OPS).await?,
                load_owners: client.prepare(SQL_LOAD_OWNERS).await?,
                commit: client.prepare(SQL_COMMIT).await?,
                snapshot: client.prepare(SQL_SNAPSHOT).await?,
            })
        };
        let stmts = match self.rt.block_on(with_deadline(self.timeout, prepare)) {
            Some(Ok(stmts)) => stmts,
            Some(Err(e)) => {
                return Err(connect_error(format!(
                    "preparing statements: {}",
                    describe(&e)
                )))
            }
            None => return Err(connect_error("preparing statements timed out".to_owned())),
        };
        Ok(Conn {
            client,
            driver,
            stmts,
            prepared: HashMap::new(),
            backend,
        })
    }

    /// The live connection, reconnecting when the backoff allows; fails fast otherwise.
    fn conn(&mut self) -> Result<(), StorageError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            log::warn!("database {}: connection closed; reconnecting", self.target);
            self.conn = None;
        }
        if self.conn.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if now < self.next_attempt {
            return Err(unavailable(format!(
                "database {} unreachable; next connection attempt in {} ms",
                self.target,
                (self.next_attempt - now).as_millis()
            )));
        }
        match self.try_connect() {
            Ok(conn) => {
                if self.was_down {
                    log::warn!("database {}: connected again", self.target);
                }
                self.was_down = false;
                self.backoff = BACKOFF_MIN;
                self.conn = Some(conn);
                Ok(())
            }
            Err(e) => {
                if !self.was_down {
                    log::error!("{e}; retrying with backoff");
                }
                self.was_down = true;
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                Err(unavailable(e.to_string()))
            }
        }
    }

    /// Takes the connection out for one call (see [`PgStorage::settle`]).
    fn take_conn(&mut self) -> Result<Conn, CallError> {
        self.conn
            .take()
            .ok_or_else(|| CallError::Lost("not connected".to_owned()))
    }

    /// The outcome of one call made on `conn` (taken out with [`PgStorage::take_conn`]): the
    /// connection is put back unless the answer did not come, in which case the query is
    /// cancelled (best effort) and the connection dropped.
    fn settle<T>(
        &mut self,
        conn: Conn,
        result: Option<Result<T, tokio_postgres::Error>>,
    ) -> Result<T, CallError> {
        match result {
            Some(Ok(value)) => {
                self.conn = Some(conn);
                Ok(value)
            }
            Some(Err(e)) if is_plain_error(&e) => {
                self.conn = Some(conn);
                Err(CallError::Refused(e))
            }
            Some(Err(e)) => {
                self.zombie = Some(conn.backend.clone());
                Err(CallError::Lost(describe(&e)))
            }
            None => {
                self.zombie = Some(conn.backend.clone());
                let token = conn.client.cancel_token();
                drop(conn);
                let cancelled = self.rt.block_on(with_deadline(
                    CANCEL_WAIT_MAX,
                    token.cancel_query(self.tls.clone()),
                ));
                if !matches!(cancelled, Some(Ok(()))) {
                    log::warn!("database {}: cancel request not delivered", self.target);
                }
                Err(CallError::Lost(format!(
                    "no answer within {:?} (--database-timeout); cancelled",
                    self.timeout
                )))
            }
        }
    }

    /// Drops every pending record and the cached state of the documents that had some: their
    /// next use reads the database again.
    fn abort_pending(&mut self) {
        for name in std::mem::take(&mut self.touched) {
            self.docs.remove(&name);
        }
    }

    fn load_inner(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        self.conn()?;
        let name = doc.as_bytes();
        let conn = self
            .take_conn()
            .map_err(|e| call_error("loading a document", e))?;
        let result = self.rt.block_on(with_deadline(
            self.timeout,
            conn.client.query_opt(&conn.stmts.load_doc, &[&name]),
        ));
        let row = self
            .settle(conn, result)
            .map_err(|e| call_error("loading a document", e))?;
        let Some(row) = row else {
            self.docs.insert(doc.to_owned(), DocState::default());
            return Ok(None);
        };
        let id: i64 = row.get(0);
        let epoch: String = row.get(1);
        let reserved: i64 = row.get(2);
        let snapshot_head: Option<i64> = row.get(3);
        let snapshot_reserved: Option<i64> = row.get(4);
        let snapshot_runs: Option<String> = row.get(5);
        let snapshot_crc: Option<i32> = row.get(6);
        let doc_file = format!("collab_docs row id {id}");
        if epoch.is_empty() {
            return Err(corrupt(&doc_file, 0, "empty epoch"));
        }
        let reserved = non_negative(reserved, &doc_file, "replicas_reserved")?;
        let snapshot = match (snapshot_head, snapshot_runs) {
            (None, None) => None,
            (Some(head), Some(runs)) => {
                let head = non_negative(head, &doc_file, "snapshot_head")?;
                let Some(snap_reserved) = snapshot_reserved else {
                    return Err(corrupt(
                        &doc_file,
                        head,
                        "snapshot without snapshot_reserved",
                    ));
                };
                let snap_reserved = non_negative(snap_reserved, &doc_file, "snapshot_reserved")?;
                if snapshot_crc != Some(crc_snapshot(&runs)) {
                    return Err(corrupt(&doc_file, head, "snapshot_runs fails its checksum"));
                }
                Some(StoredSnapshot {
                    epoch: epoch.clone(),
                    head,
                    replicas_reserved: snap_reserved,
                    // Owners live in collab_replica_owners and come back as tail records.
                    owners: Vec::new(),
                    runs_json: Utf8Bytes::from(runs),
                })
            }
            _ => return Err(corrupt(&doc_file, 0, "half a snapshot")),
        };
        let head = snapshot.as_ref().map_or(0, |s| s.head);
        let covered_reserved = snapshot.as_ref().map_or(0, |s| s.replicas_reserved);
        let head_param = head as i64;
        let conn = self
            .take_conn()
            .map_err(|e| call_error("loading a document's log", e))?;
        let result = self.rt.block_on(with_deadline(
            self.timeout,
            conn.client.query(&conn.stmts.load_ops, &[&id, &head_param]),
        ));
        let rows = self
            .settle(conn, result)
            .map_err(|e| call_error("loading a document's log", e))?;
        let conn = self
            .take_conn()
            .map_err(|e| call_error("loading a document's replica owners", e))?;
        let result = self.rt.block_on(with_deadline(
            self.timeout,
            conn.client.query(&conn.stmts.load_owners, &[&id]),
        ));
        let owner_rows = self
            .settle(conn, result)
            .map_err(|e| call_error("loading a document's replica owners", e))?;
        let ops_file = format!("collab_ops of document id {id}");
        let owners_file = format!("collab_replica_owners of document id {id}");
        let mut tail = Vec::with_capacity(rows.len() + owner_rows.len() + 1);
        if reserved > covered_reserved {
            tail.push(LogRecord::ReplicasReserved { last: reserved });
        }
        for row in owner_rows {
            let replica: i64 = row.get(0);
            let user: String = row.get(1);
            let replica = non_negative(replica, &owners_file, "replica")?;
            tail.push(LogRecord::ReplicaOwner { replica, user });
        }
        let mut last_seq = head;
        for row in rows {
            let seq: i64 = row.get(0);
            let crc: i32 = row.get(1);
            let echo: String = row.get(2);
            let seq = non_negative(seq, &ops_file, "server_seq")?;
            if seq != last_seq + 1 {
                return Err(corrupt(
                    &ops_file,
                    seq,
                    format!("server_seq {seq} follows {last_seq}"),
                ));
            }
            if crc != crc_op(seq, &echo) {
                return Err(corrupt(&ops_file, seq, "op record fails its checksum"));
            }
            last_seq = seq;
            let accepted_ms: Option<i64> = row.get(3);
            tail.push(LogRecord::Ops {
                server_seq: seq,
                echo: Utf8Bytes::from(echo),
            });
            if let Some(ms) = accepted_ms {
                tail.push(LogRecord::Accepted {
                    server_seq: seq,
                    time_ms: non_negative(ms, &ops_file, "accepted_ms")?,
                });
            }
        }
        self.docs.insert(
            doc.to_owned(),
            DocState {
                id: Some(id),
                epoch: epoch.clone(),
                ..DocState::default()
            },
        );
        Ok(Some(StoredDoc {
            epoch,
            snapshot,
            tail,
        }))
    }

    /// Sends every pending record as one autocommit statement.
    fn commit(&mut self) -> Result<(), StorageError> {
        if self.leases.is_some() {
            return self.commit_fenced();
        }
        let conn = self
            .take_conn()
            .map_err(|_| unavailable("not connected".to_owned()))?;
        // Documents not yet known to exist: created (or found) by the statement itself.
        let mut new_names: Vec<&[u8]> = Vec::new();
        let mut new_epochs: Vec<&str> = Vec::new();
        let mut new_reserved: Vec<i64> = Vec::new();
        let mut op_ids: Vec<Option<i64>> = Vec::new();
        let mut op_names: Vec<Option<&[u8]>> = Vec::new();
        let mut op_seqs: Vec<i64> = Vec::new();
        let mut op_crcs: Vec<i32> = Vec::new();
        let mut op_echoes: Vec<&str> = Vec::new();
        let mut op_times: Vec<Option<i64>> = Vec::new();
        let mut res_ids: Vec<i64> = Vec::new();
        let mut res_last: Vec<i64> = Vec::new();
        let mut own_ids: Vec<Option<i64>> = Vec::new();
        let mut own_names: Vec<Option<&[u8]>> = Vec::new();
        let mut own_replicas: Vec<i64> = Vec::new();
        let mut own_users: Vec<&str> = Vec::new();
        for name in &self.touched {
            let Some(state) = self.docs.get(name) else {
                continue;
            };
            match state.id {
                Some(id) => {
                    if let Some(last) = state.pending_reserved {
                        res_ids.push(id);
                        res_last.push(to_i64(last));
                    }
                }
                None => {
                    new_names.push(name.as_bytes());
                    new_epochs.push(&state.epoch);
                    new_reserved.push(to_i64(state.pending_reserved.unwrap_or(0)));
                }
            }
            for (replica, user) in &state.pending_owners {
                own_ids.push(state.id);
                own_names.push(state.id.is_none().then_some(name.as_bytes()));
                own_replicas.push(to_i64(*replica));
                own_users.push(user.as_str());
            }
            for (seq, echo) in &state.pending_ops {
                op_ids.push(state.id);
                op_names.push(state.id.is_none().then_some(name.as_bytes()));
                op_seqs.push(to_i64(*seq));
                op_crcs.push(crc_op(*seq, echo));
                op_echoes.push(echo.as_str());
                op_times.push(pending_time(state, *seq));
            }
        }
        let result = self.rt.block_on(with_deadline(
            self.timeout,
            conn.client.query(
                &conn.stmts.commit,
                &[
                    &new_names,
                    &new_epochs,
                    &new_reserved,
                    &op_ids,
                    &op_names,
                    &op_seqs,
                    &op_crcs,
                    &op_echoes,
                    &res_ids,
                    &res_last,
                    &own_ids,
                    &own_names,
                    &own_replicas,
                    &own_users,
                    &op_times,
                ],
            ),
        ));
        let rows = match self.settle(conn, result) {
            Ok(rows) => rows,
            Err(CallError::Refused(e)) => {
                // An ERROR answer: the statement, its own transaction, had no effect.
                return Err(StorageError::Io {
                    context: format!("commit refused by the database: {}", describe(&e)),
                    source: std::io::Error::other("commit refused"),
                });
            }
            Err(CallError::Lost(detail)) => {
                return Err(StorageError::OutcomeUnknown {
                    reason: format!("database {}: COMMIT: {detail}", self.target),
                })
            }
        };
        for row in rows {
            let id: i64 = row.get(0);
            let name: Vec<u8> = row.get(1);
            if let Some(state) = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| self.docs.get_mut(n))
            {
                state.id = Some(id);
            }
        }
        Ok(())
    }
}

/// The acceptance time (`LogRecord::Accepted`) pending for op `seq` of `state`, if any.
fn pending_time(state: &DocState, seq: u64) -> Option<i64> {
    state
        .pending_times
        .iter()
        .find(|(s, _)| *s == seq)
        .map(|(_, ms)| to_i64(*ms))
}

impl PgStorage {
    /// [`PgStorage::commit`] in cluster mode: the same statement with the fence check
    /// (`lease::SQL_COMMIT_FENCED`); documents that fail it are written not at all and
    /// listed for [`Storage::take_fenced`], the others are committed.
    fn commit_fenced(&mut self) -> Result<(), StorageError> {
        let conn = self
            .take_conn()
            .map_err(|_| unavailable("not connected".to_owned()))?;
        let Some(mode) = self.leases.as_ref() else {
            self.conn = Some(conn);
            return Err(unavailable("not in cluster mode".to_owned()));
        };
        let holder = mode.holder.0;
        let mut refused_now: Vec<String> = Vec::new();
        let mut lease_names: Vec<&[u8]> = Vec::new();
        let mut lease_fences: Vec<i64> = Vec::new();
        let mut new_names: Vec<&[u8]> = Vec::new();
        let mut new_epochs: Vec<&str> = Vec::new();
        let mut new_reserved: Vec<i64> = Vec::new();
        let mut op_ids: Vec<Option<i64>> = Vec::new();
        let mut op_names: Vec<&[u8]> = Vec::new();
        let mut op_seqs: Vec<i64> = Vec::new();
        let mut op_crcs: Vec<i32> = Vec::new();
        let mut op_echoes: Vec<&str> = Vec::new();
        let mut op_times: Vec<Option<i64>> = Vec::new();
        let mut res_ids: Vec<i64> = Vec::new();
        let mut res_last: Vec<i64> = Vec::new();
        let mut own_ids: Vec<Option<i64>> = Vec::new();
        let mut own_names: Vec<&[u8]> = Vec::new();
        let mut own_replicas: Vec<i64> = Vec::new();
        let mut own_users: Vec<&str> = Vec::new();
        for name in &self.touched {
            let Some(state) = self.docs.get(name) else {
                continue;
            };
            let Some(&fence) = mode.fences.get(name) else {
                // Never loaded under a lease (or the lease is gone): nothing of it is written.
                refused_now.push(name.clone());
                continue;
            };
            lease_names.push(name.as_bytes());
            lease_fences.push(fence);
            match state.id {
                Some(id) => {
                    if let Some(last) = state.pending_reserved {
                        res_ids.push(id);
                        res_last.push(to_i64(last));
                    }
                }
                None => {
                    new_names.push(name.as_bytes());
                    new_epochs.push(&state.epoch);
                    new_reserved.push(to_i64(state.pending_reserved.unwrap_or(0)));
                }
            }
            for (replica, user) in &state.pending_owners {
                own_ids.push(state.id);
                own_names.push(name.as_bytes());
                own_replicas.push(to_i64(*replica));
                own_users.push(user.as_str());
            }
            for (seq, echo) in &state.pending_ops {
                op_ids.push(state.id);
                op_names.push(name.as_bytes());
                op_seqs.push(to_i64(*seq));
                op_crcs.push(crc_op(*seq, echo));
                op_echoes.push(echo.as_str());
                op_times.push(pending_time(state, *seq));
            }
        }
        let mut rows = Vec::new();
        if lease_names.is_empty() {
            self.conn = Some(conn);
        } else {
            let result = self.rt.block_on(with_deadline(
                self.timeout,
                conn.client.query(
                    lease::SQL_COMMIT_FENCED,
                    &[
                        &new_names,
                        &new_epochs,
                        &new_reserved,
                        &op_ids,
                        &op_names,
                        &op_seqs,
                        &op_crcs,
                        &op_echoes,
                        &res_ids,
                        &res_last,
                        &own_ids,
                        &own_names,
                        &own_replicas,
                        &own_users,
                        &holder,
                        &lease_names,
                        &lease_fences,
                        &op_times,
                    ],
                ),
            ));
            rows = match self.settle(conn, result) {
                Ok(rows) => rows,
                Err(CallError::Refused(e)) => {
                    return Err(StorageError::Io {
                        context: format!("commit refused by the database: {}", describe(&e)),
                        source: std::io::Error::other("commit refused"),
                    });
                }
                Err(CallError::Lost(detail)) => {
                    return Err(StorageError::OutcomeUnknown {
                        reason: format!("database {}: COMMIT: {detail}", self.target),
                    })
                }
            };
        }
        for row in rows {
            let id: Option<i64> = row.get(0);
            let name: Vec<u8> = row.get(1);
            let written: bool = row.get(2);
            let Ok(name) = String::from_utf8(name) else {
                continue;
            };
            if written {
                if let (Some(id), Some(state)) = (id, self.docs.get_mut(&name)) {
                    state.id = Some(id);
                }
            } else {
                refused_now.push(name);
            }
        }
        if let Some(mode) = self.leases.as_mut() {
            for name in refused_now {
                log::warn!(
                    "database {}: a commit was refused by its document's fence (another node \
                     took the lease); nothing of it was written",
                    self.target
                );
                LeaseBook::count(&mode.book.counters().fencing_refusals);
                mode.fences.remove(&name);
                mode.book.remove(&name);
                mode.fenced.push(name);
            }
        }
        Ok(())
    }
}

impl Storage for PgStorage {
    fn load(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        if self.docs.remove(doc).is_some_and(|old| old.touched) {
            // The shard reloads a document only after dropping it; records it appended but
            // never synced were never acknowledged.
            log::warn!("dropping unsynced records of a document on reload");
            self.touched.retain(|name| name != doc);
        }
        if self.leases.is_some() {
            // Served only under its lease: acquired (or found ours) before anything is read.
            self.acquire(doc)?;
        }
        let loaded = self.load_inner(doc);
        if loaded.is_err() {
            self.docs.remove(doc);
            self.release_lease(doc);
        }
        loaded
    }

    fn append(&mut self, doc: &str, epoch: &str, record: &LogRecord) -> Result<(), StorageError> {
        let state = self.docs.entry(doc.to_owned()).or_default();
        if state.id.is_none() && state.epoch.is_empty() {
            state.epoch = epoch.to_owned();
        }
        match record {
            LogRecord::Ops { server_seq, echo } => {
                state.pending_ops.push((*server_seq, echo.clone()));
            }
            LogRecord::ReplicasReserved { last } => {
                state.pending_reserved = Some(state.pending_reserved.unwrap_or(0).max(*last));
            }
            LogRecord::Accepted {
                server_seq,
                time_ms,
            } => state.pending_times.push((*server_seq, *time_ms)),
            LogRecord::ReplicaOwner { replica, user } => {
                state.pending_owners.push((*replica, user.clone()));
            }
        }
        if !state.touched {
            state.touched = true;
            self.touched.push(doc.to_owned());
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        if self.touched.is_empty() {
            return Ok(());
        }
        let result = self.conn().and_then(|()| self.commit());
        if let Err(e) = result {
            self.abort_pending();
            return Err(e);
        }
        for name in std::mem::take(&mut self.touched) {
            let Some(state) = self.docs.get_mut(&name) else {
                continue;
            };
            state.touched = false;
            state.pending_reserved = None;
            state.pending_owners.clear();
            state.pending_ops.clear();
            if state.pending_ops.capacity() > RECORDS_KEPT_MAX {
                state.pending_ops = Vec::new();
            }
            if state.release_after_sync {
                self.docs.remove(&name);
                self.release_lease(&name);
            }
        }
        Ok(())
    }

    fn take_fenced(&mut self) -> Vec<String> {
        match self.leases.as_mut() {
            Some(mode) => std::mem::take(&mut mode.fenced),
            None => Vec::new(),
        }
    }

    fn write_snapshot(&mut self, doc: &str, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        if self.docs.get(doc).is_some_and(|state| state.touched) {
            // A snapshot must never cover records that could still be refused.
            self.sync()?;
        }
        self.conn()?;
        let name = doc.as_bytes();
        let epoch = snapshot.epoch.as_str();
        let head = to_i64(snapshot.head);
        let reserved = to_i64(snapshot.replicas_reserved);
        let runs = snapshot.runs_json.as_str();
        let crc = crc_snapshot(runs);
        let id: i64 = if let Some(mode) = &self.leases {
            let holder = mode.holder.0;
            let Some(fence) = mode.fences.get(doc).copied() else {
                return Err(StorageError::Fenced {
                    reason: "snapshot of a document whose lease this node does not hold".to_owned(),
                });
            };
            let rows = self.query(
                lease::SQL_SNAPSHOT_FENCED,
                &[
                    &name, &epoch, &head, &reserved, &runs, &crc, &holder, &fence,
                ],
            )?;
            match rows.first() {
                Some(row) => row.get(0),
                None => {
                    if let Some(mode) = self.leases.as_mut() {
                        LeaseBook::count(&mode.book.counters().fencing_refusals);
                    }
                    return Err(StorageError::Fenced {
                        reason: "snapshot refused by the document's fence (another node took \
                                 the lease); nothing written"
                            .to_owned(),
                    });
                }
            }
        } else {
            let conn = self
                .take_conn()
                .map_err(|e| call_error("writing a snapshot", e))?;
            let result = self.rt.block_on(with_deadline(
                self.timeout,
                conn.client.query_one(
                    &conn.stmts.snapshot,
                    &[&name, &epoch, &head, &reserved, &runs, &crc],
                ),
            ));
            self.settle(conn, result)
                .map_err(|e| call_error("writing a snapshot", e))?
                .get(0)
        };
        let state = self.docs.entry(doc.to_owned()).or_default();
        state.id = Some(id);
        if !snapshot.owners.is_empty() {
            // Owners normally arrive as records (already committed); a snapshot that carries
            // some (a document copied from the disk backend) records them too, idempotently.
            let replicas: Vec<i64> = snapshot.owners.iter().map(|(r, _)| to_i64(*r)).collect();
            let users: Vec<&str> = snapshot.owners.iter().map(|(_, u)| u.as_str()).collect();
            let conn = self
                .take_conn()
                .map_err(|e| call_error("writing a snapshot's replica owners", e))?;
            let result = self.rt.block_on(with_deadline(
                self.timeout,
                conn.client
                    .execute(SQL_SNAPSHOT_OWNERS, &[&id, &replicas, &users]),
            ));
            self.settle(conn, result)
                .map_err(|e| call_error("writing a snapshot's replica owners", e))?;
        }
        Ok(())
    }

    fn probe(&mut self) -> Result<(), StorageError> {
        self.conn()?;
        let conn = self
            .take_conn()
            .map_err(|e| call_error("probing the database", e))?;
        let result = self.rt.block_on(with_deadline(
            self.timeout,
            conn.client.simple_query("SELECT 1"),
        ));
        self.settle(conn, result)
            .map(drop)
            .map_err(|e| call_error("probing the database", e))
    }

    fn delete(&mut self, doc: &str) -> Result<bool, StorageError> {
        self.conn()?;
        self.docs.remove(doc);
        let name = doc.as_bytes();
        let conn = self
            .take_conn()
            .map_err(|e| call_error("deleting a document", e))?;
        // One autocommit statement; the log, the owners (and any history) go with it
        // through ON DELETE CASCADE.
        let result = self.rt.block_on(with_deadline(
            self.timeout,
            conn.client
                .execute("DELETE FROM collab_docs WHERE name = $1", &[&name]),
        ));
        let n = self
            .settle(conn, result)
            .map_err(|e| call_error("deleting a document", e))?;
        Ok(n > 0)
    }

    fn list_names(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<String>, bool), StorageError> {
        let names = self.list_docs()?;
        Ok(super::page_of_names(names, prefix, after, limit, keep))
    }

    fn release(&mut self, doc: &str) {
        match self.docs.get_mut(doc) {
            Some(state) if state.touched => state.release_after_sync = true,
            Some(_) => {
                self.docs.remove(doc);
                self.release_lease(doc);
            }
            None => self.release_lease(doc),
        }
    }
}

/// A document's row by name.
const SQL_LOAD_DOC: &str = "SELECT id, epoch, replicas_reserved, snapshot_head, \
     snapshot_reserved, snapshot_runs, snapshot_crc FROM collab_docs WHERE name = $1";

/// A document's replica owners (access control's replica binding).
const SQL_LOAD_OWNERS: &str =
    "SELECT replica, owner FROM collab_replica_owners WHERE doc_id = $1 ORDER BY replica";

/// Records the owners a snapshot carries; a binding already there stays (the first user wins).
const SQL_SNAPSHOT_OWNERS: &str = "
INSERT INTO collab_replica_owners (doc_id, replica, owner)
SELECT $1, r.replica, r.owner FROM unnest($2::bigint[], $3::text[]) AS r (replica, owner)
ON CONFLICT (doc_id, replica) DO NOTHING";

/// A document's log after its snapshot.
const SQL_LOAD_OPS: &str = "SELECT server_seq, crc, echo, accepted_ms FROM collab_ops \
     WHERE doc_id = $1 AND server_seq > $2 ORDER BY server_seq";

/// The group commit: new documents (created, or found when they exist), every op of the
/// turn, the reservations of known documents and new replica owners, in one statement. Data-modifying CTEs see
/// one snapshot, so reservations of new documents go into their INSERT. Returns the ids of the
/// new documents.
const SQL_COMMIT: &str = "
WITH new_docs AS (
    INSERT INTO collab_docs (name, epoch, replicas_reserved)
    SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[])
    ON CONFLICT (name) DO UPDATE SET replicas_reserved =
        GREATEST(collab_docs.replicas_reserved, EXCLUDED.replicas_reserved)
    RETURNING id, name
), new_ops AS (
    INSERT INTO collab_ops (doc_id, server_seq, crc, echo, accepted_ms)
    SELECT coalesce(o.doc_id, n.id), o.server_seq, o.crc, o.echo, o.accepted_ms
    FROM unnest($4::bigint[], $5::bytea[], $6::bigint[], $7::integer[], $8::text[],
                $15::bigint[])
        AS o (doc_id, name, server_seq, crc, echo, accepted_ms)
    LEFT JOIN new_docs n ON n.name = o.name
), reservations AS (
    UPDATE collab_docs d SET replicas_reserved = GREATEST(d.replicas_reserved, r.last)
    FROM unnest($9::bigint[], $10::bigint[]) AS r (id, last)
    WHERE d.id = r.id
), new_owners AS (
    INSERT INTO collab_replica_owners (doc_id, replica, owner)
    SELECT coalesce(w.doc_id, n.id), w.replica, w.owner
    FROM unnest($11::bigint[], $12::bytea[], $13::bigint[], $14::text[])
        AS w (doc_id, name, replica, owner)
    LEFT JOIN new_docs n ON n.name = w.name
    ON CONFLICT (doc_id, replica) DO NOTHING
)
SELECT id, name FROM new_docs";

/// Replaces a document's snapshot and deletes the log it covers, atomically.
const SQL_SNAPSHOT: &str = "
WITH doc AS (
    INSERT INTO collab_docs AS d
        (name, epoch, replicas_reserved, snapshot_head, snapshot_reserved, snapshot_runs, snapshot_crc)
    VALUES ($1, $2, $4, $3, $4, $5, $6)
    ON CONFLICT (name) DO UPDATE SET
        replicas_reserved = GREATEST(d.replicas_reserved, EXCLUDED.replicas_reserved),
        snapshot_head = EXCLUDED.snapshot_head,
        snapshot_reserved = EXCLUDED.snapshot_reserved,
        snapshot_runs = EXCLUDED.snapshot_runs,
        snapshot_crc = EXCLUDED.snapshot_crc
    RETURNING id
), compacted AS (
    DELETE FROM collab_ops o USING doc WHERE o.doc_id = doc.id AND o.server_seq <= $3
)
SELECT id FROM doc";

/// Terminates the session `zombie` (only that exact one: pid and start time) and waits until
/// it is gone, polling; the caller bounds the wait.
async fn end_session(
    client: &Client,
    zombie: Backend,
    poll: Duration,
) -> Result<(), tokio_postgres::Error> {
    let poll = (poll / 50).clamp(Duration::from_millis(10), Duration::from_millis(100));
    loop {
        let alive = client
            .query_opt(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE pid = $1 AND backend_start::text = $2",
                &[&zombie.pid, &zombie.started],
            )
            .await?;
        if alive.is_none() {
            return Ok(());
        }
        tokio::time::sleep(poll).await;
    }
}

/// Runs `future` to completion or gives up after `deadline` (`None`).
async fn with_deadline<T>(deadline: Duration, future: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(deadline, future).await.ok()
}

/// `e` with the server's message when there is one (tokio-postgres shows only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => {
            // With its causes: "error performing TLS handshake" alone does not say that the
            // certificate did not verify.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// Whether `e` is an ERROR the server sent for a statement (which then had no effect and left
/// the connection usable), not a closed connection, an I/O error or a FATAL termination.
fn is_plain_error(e: &tokio_postgres::Error) -> bool {
    !e.is_closed() && e.as_db_error().is_some_and(|db| db.severity() == "ERROR")
}

/// CRC32C of an op row: big-endian `server_seq`, then the echo's bytes.
fn crc_op(seq: u64, echo: &str) -> i32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&seq.to_be_bytes()), echo.as_bytes());
    i32::from_ne_bytes(crc.to_ne_bytes())
}

/// CRC32C of a snapshot's runs JSON.
fn crc_snapshot(runs: &str) -> i32 {
    i32::from_ne_bytes(crc32c::crc32c(runs.as_bytes()).to_ne_bytes())
}

/// A `u64` counter as PostgreSQL's bigint. Counters never reach 2^63; saturate if one did.
fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn non_negative(n: i64, file: &str, column: &str) -> Result<u64, StorageError> {
    u64::try_from(n).map_err(|_| corrupt(file, 0, format!("negative {column}")))
}

fn corrupt(file: &str, offset: u64, detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        file: file.to_owned(),
        offset,
        detail: detail.into(),
    }
}

/// The database cannot be reached: nothing was done (the pipeline refuses ops with
/// `unavailable` and probes until it answers again).
fn unavailable(reason: String) -> StorageError {
    StorageError::Unavailable { reason }
}

/// A read, snapshot or probe that failed: an ERROR answer changed nothing (`Io`); a lost
/// answer means the database is not usable right now (`Unavailable`: none of these calls
/// acknowledges anything, so an unknown outcome costs nothing but a retry).
fn call_error(what: &str, e: CallError) -> StorageError {
    match e {
        CallError::Refused(e) => StorageError::Io {
            context: format!("{what}: refused by the database: {}", describe(&e)),
            source: std::io::Error::other("refused by the database"),
        },
        CallError::Lost(detail) => unavailable(format!("{what}: {detail}")),
    }
}

/// `host:port/db` of a configuration.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_cover_seq_and_bytes() {
        assert_ne!(crc_op(1, "x"), crc_op(2, "x"));
        assert_ne!(crc_op(1, "x"), crc_op(1, "y"));
        assert_eq!(crc_snapshot("{}"), crc_snapshot("{}"));
    }

    #[test]
    fn target_never_shows_the_password() {
        let config: tokio_postgres::Config = "postgres://u:secret@db.example:6543/collab"
            .parse()
            .expect("url");
        let target = describe_target(&config);
        assert_eq!(target, "db.example:6543/collab");
        assert!(!target.contains("secret"));
    }
}
