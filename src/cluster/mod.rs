//! The cluster's control plane (issue 11, docs/cluster.md): nodes sharing one PostgreSQL
//! database, each document served by the one node holding its fenced lease.
//!
//! - [`route`]: [`Route`](route::Route) and [`Router`](route::Router), the question the
//!   acceptor asks (shared with the data plane, the relay).
//! - [`placement`]: rendezvous hashing of unowned documents over the live nodes.
//! - `view.rs`: what the directory publishes (membership, owners, lookup answers) and
//!   [`ClusterRouter`], the router over it, with the `/cluster` answers.
//! - `directory.rs`: the directory thread: heartbeat, renewal, the self-stop, lookups, drain.
//! - [`relay`]: the data plane of any-node entry, a byte relay to the owner on its own thread.
//! - [`forwarded`]: the client's real address passed to the owner, authenticated between peers.
//! - The storage's half (acquire on load, the fence check in every commit and snapshot) is
//!   `storage/postgres/lease.rs`.
//!
//! Never on the hot path: shards never talk to the directory (it tells them about lost
//! leases through their inboxes), and the acceptor only reads what it published.

mod config;
mod directory;
pub mod forwarded;
pub mod placement;
pub mod relay;
mod revocations;
pub mod route;
mod view;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::Mutex;

pub use config::{ClusterConfig, LEASE_TTL_MIN};
pub use directory::{OWNERS_PUBLISHED_MAX, ROUNDS_PER_TTL, STOP_AFTER_TTL_FRACTION};
pub use route::{Route, Router};
pub use view::{ClusterRouter, NodeView};

use crate::acceptor::ShardInbox;
use crate::config::Config;
use crate::storage::postgres::{Incarnation, LeaseBook, PgOptions, PgStorage};
use directory::Directory;
use view::{DirectoryMsg, RouterState, Shared};

/// Longest node names accepted.
const NODE_NAME_BYTES_MAX: usize = 64;

/// This node's membership in a cluster: its incarnation, its leases' book, the directory
/// thread. Dropping it without [`Cluster::leave`] stops the thread without releasing leases
/// (they expire).
pub struct Cluster {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Not left (a start that failed half-way): the thread stops; the leases and the
        // heartbeat simply expire.
        if self.thread.take().is_some() {
            let _ = self.shared.requests.send(DirectoryMsg::Stop);
        }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.shared.me)
            .field("incarnation", &self.shared.incarnation)
            .finish()
    }
}

/// Checks the cluster flags of `config`: `Ok(None)` without `--cluster-node`.
///
/// # Errors
/// When `--cluster-node` lacks `--database-url` or `--advertise`, or a value is unusable.
pub fn validate(config: &Config) -> anyhow::Result<Option<(&str, &str)>> {
    let cluster = &config.cluster;
    let Some(name) = cluster.node.as_deref() else {
        anyhow::ensure!(
            cluster.advertise.is_none(),
            "--advertise is only used with --cluster-node"
        );
        return Ok(None);
    };
    anyhow::ensure!(
        !name.is_empty() && name.len() <= NODE_NAME_BYTES_MAX,
        "--cluster-node must be 1 to {NODE_NAME_BYTES_MAX} bytes"
    );
    anyhow::ensure!(
        config.database_url.is_some(),
        "--cluster-node needs --database-url (the cluster's state lives in PostgreSQL)"
    );
    let Some(advertise) = cluster.advertise.as_deref() else {
        anyhow::bail!(
            "--cluster-node needs --advertise HOST:PORT (where the other nodes reach this one)"
        );
    };
    anyhow::ensure!(
        advertise.rsplit_once(':').is_some_and(
            |(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        ),
        "--advertise {advertise:?} is not HOST:PORT"
    );
    Ok(Some((name, advertise)))
}

impl Cluster {
    /// Joins the cluster named by `config` (`None` without `--cluster-node`): registers a new
    /// incarnation of this node in the database and starts the directory thread.
    ///
    /// # Errors
    /// When the flags are unusable or the database cannot be reached.
    pub fn join(config: &Config) -> anyhow::Result<Option<Cluster>> {
        let Some((name, advertise)) = validate(config)? else {
            return Ok(None);
        };
        let ttl = config.cluster.lease_ttl;
        let url = config.database_url.clone().unwrap_or_default();
        // Every directory statement must end within a round, so that the stop is never late.
        let mut db = PgStorage::open(&PgOptions {
            url,
            timeout: (ttl / ROUNDS_PER_TTL).min(config.database_timeout),
            synchronous_commit: true,
            ca_file: config.database_ca_file.clone(),
        })
        .context("cluster: connecting to the database")?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let rows = db
            .query(directory::SQL_REGISTER, &[&name, &advertise, &ttl_ms])
            .context("cluster: registering this node")?;
        let incarnation = Incarnation(
            rows.first()
                .map(|row| row.get::<_, i64>(0))
                .context("cluster: registration returned no incarnation")?,
        );
        log::info!(
            "cluster: node {name:?} incarnation {} advertised at {advertise}",
            incarnation.0
        );
        let (requests, receiver) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            me: name.to_owned(),
            incarnation,
            ttl,
            book: LeaseBook::new(),
            state: Mutex::new(RouterState {
                serving: true,
                ..RouterState::default()
            }),
            waker: Mutex::new(None),
            requests,
            relay: Default::default(),
        });
        let directory = Directory {
            shared: shared.clone(),
            db,
            requests: receiver,
            shards: Vec::new(),
            last_round_ok: Some(sent),
            next_round: Instant::now(),
            lookups: Vec::new(),
            rechecks: Vec::new(),
            draining: false,
            resolved: Default::default(),
            auth: None,
            revocations_seen: Default::default(),
            revocations_after: 0,
            next_revocation_poll: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("cluster-directory".to_owned())
            .spawn(move || directory.run())
            .context("spawning the cluster directory thread")?;
        Ok(Some(Cluster {
            shared,
            thread: Some(thread),
        }))
    }

    /// This process's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.shared.incarnation
    }

    /// `--lease-ttl`.
    pub fn lease_ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The book every storage of this node records its leases in.
    pub fn book(&self) -> LeaseBook {
        self.shared.book.clone()
    }

    /// The router for the acceptor (and the status answers).
    pub fn router(&self) -> ClusterRouter {
        ClusterRouter(self.shared.clone())
    }

    /// Gives the directory the shards' inboxes (to drop documents whose lease is lost) and
    /// access control (to share revocations with the other nodes).
    pub fn attach(
        &self,
        shards: Vec<ShardInbox>,
        auth: Option<Arc<crate::auth::Auth>>,
        relay: Arc<relay::RelayCounters>,
    ) {
        let _ = self.shared.relay.set(relay);
        let _ = self
            .shared
            .requests
            .send(DirectoryMsg::Attach(shards, auth));
    }

    /// Marks this node draining (no new documents; routes go elsewhere), waiting at most
    /// `timeout` for the database to have it.
    pub fn drain(&self, timeout: Duration) {
        let (reply, done) = crossbeam_channel::bounded(1);
        if self
            .shared
            .requests
            .send(DirectoryMsg::Drain(reply))
            .is_ok()
            && done.recv_timeout(timeout).is_err()
        {
            log::warn!("cluster: drain not confirmed within {timeout:?}");
        }
    }

    /// Releases every lease of this incarnation at once (call after the shards have made
    /// their last commits) and stops the directory thread, waiting at most `timeout`.
    pub fn leave(mut self, timeout: Duration) {
        let (reply, done) = crossbeam_channel::bounded(1);
        if self
            .shared
            .requests
            .send(DirectoryMsg::Finish(reply))
            .is_ok()
            && done.recv_timeout(timeout).is_ok()
        {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        } else {
            log::warn!(
                "cluster: leases not released within {timeout:?}; they expire by themselves"
            );
        }
    }
}
