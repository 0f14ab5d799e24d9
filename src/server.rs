//! Starting and stopping a whole server in-process: the acceptor thread, the shard threads,
//! their channels and wakers, storage construction, and the graceful shutdown.
//!
//! `main.rs` and the integration tests both go through [`start`]. Nothing here runs on the
//! hot path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};
use log::{debug, info, warn};
use tungstenite::protocol::WebSocketConfig;

use crate::acceptor::admin::spawn_admin_worker;
use crate::acceptor::routing::ClusterRouting;
use crate::acceptor::{
    shard_channel, Acceptor, AcceptorOptions, AcceptorStop, DoorLimits, PlainWs, ShardInbox,
    ShardMsg,
};
use crate::auth::{Auth, KeySet};
use crate::cluster::forwarded::ClusterSecret;
use crate::cluster::relay::{spawn_relay, RelayThread};
use crate::cluster::{Cluster, Router};
use crate::config::{Config, FsyncMode, StorageKind};
use crate::metrics::MetricsRegistry;
use crate::room::{Retention, RoomConfig};
use crate::shard::rate_limit::RateLimit;
use crate::shard::{self, Handler, NetLimits, RoomHost, WAKER_TOKEN};
use crate::storage::worker::{StorageAvailable, StorageWorker};
use crate::storage::{lock_data_dir, DiskStorage, MemoryStorage, PgOptions, PgStorage, Storage};
use crate::webhooks::Webhooks;

/// Each connection's initial read buffer, and the most tungstenite reads from a socket at once.
/// It is allocated (and zeroed, so resident) for every connection, idle or not, so it is sized
/// for density: 512 bytes hold a typical `op` or `presence` message, a larger message grows the
/// buffer as needed, and 4 KiB here cost 4 KiB of RSS per idle connection (docs/benchmarks.md).
pub const WS_READ_BUFFER_BYTES: usize = 512;
/// Bytes tungstenite collects before writing to the socket. It writes only control frames
/// (pings, pongs, closes) and the acceptor's refusals; the shard writes text frames itself, so
/// none is worth buffering (a buffer would keep its largest size for the connection's life).
pub const WS_WRITE_BUFFER_BYTES: usize = 0;

// Both buffers stay far below the smallest message limit the contract allows, so a
// connection's resting memory does not grow with `--message-bytes-max`.
const _: () = assert!(WS_READ_BUFFER_BYTES < crate::config::MESSAGE_BYTES_FLOOR);
const _: () = assert!(WS_WRITE_BUFFER_BYTES < crate::config::MESSAGE_BYTES_FLOOR);

/// A running server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    metrics: MetricsRegistry,
    acceptor_stop: AcceptorStop,
    acceptor: Option<JoinHandle<std::io::Result<()>>>,
    shard_inboxes: Vec<ShardInbox>,
    shards: Vec<JoinHandle<std::io::Result<()>>>,
    auth: Option<Arc<Auth>>,
    admin_addr: Option<SocketAddr>,
    admin_worker: Option<JoinHandle<()>>,
    /// The webhook delivery threads, stopped after the shards (their last changes go in first).
    webhooks: Option<Webhooks>,
    /// Cluster mode: this node's membership (drained and left on shutdown).
    cluster: Option<Cluster>,
    /// The relay thread of a cluster node (stopped after the acceptor, before the shards).
    relay: Option<RelayThread>,
}

/// What makes a server a cluster node's entry point: the router that says where each
/// document is served. `None` in the `start*` functions: a single node (every document local).
#[derive(Clone)]
pub struct RouterOptions {
    /// Where each document is served; its `set_waker` is called once, before the first
    /// connection, with the acceptor's waker.
    pub router: Arc<dyn Router>,
    /// How long a connection waits on `Route::Pending` before `unavailable` and close 1013:
    /// the lease TTL plus 1 s (see [`RouterOptions::for_lease_ttl`]).
    pub route_wait: Duration,
}

impl RouterOptions {
    /// Routing by `router` with the wait the issue asks for: `lease_ttl` plus 1 s, enough for
    /// a dead owner's lease to expire and a live node to take the document over.
    pub fn for_lease_ttl(router: Arc<dyn Router>, lease_ttl: Duration) -> RouterOptions {
        RouterOptions {
            router,
            route_wait: lease_ttl + Duration::from_secs(1),
        }
    }
}

impl std::fmt::Debug for RouterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterOptions")
            .field("route_wait", &self.route_wait)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The address the server listens on (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of `--admin-listen`, when given (the real port when 0 was asked for).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Access control, when keys are configured.
    pub fn auth(&self) -> Option<&Arc<Auth>> {
        self.auth.as_ref()
    }

    /// Reads the key files again (SIGHUP); `Ok(None)` when access control is off.
    ///
    /// # Errors
    /// When a file cannot be used; the old keys then stay in force.
    pub fn reload_keys(&self) -> anyhow::Result<Option<Arc<KeySet>>> {
        match &self.auth {
            Some(auth) => Ok(Some(auth.reload_keys()?)),
            None => Ok(None),
        }
    }

    /// The metrics the shards publish into.
    pub fn metrics(&self) -> &MetricsRegistry {
        &self.metrics
    }

    /// Cluster mode: this node's membership.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Graceful shutdown: stop accepting, close every client with 1001, finish pending
    /// writes, join every thread.
    ///
    /// # Errors
    /// When a thread failed or panicked.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        // A cluster node drains first: it takes no new document and the other nodes route
        // around it, then its shards commit and close their clients with 1001, then every
        // lease is released at once so the clients are served elsewhere without waiting for
        // the TTL.
        if let Some(cluster) = &self.cluster {
            cluster.drain(cluster.lease_ttl());
        }
        self.acceptor_stop.stop();
        if let Some(acceptor) = self.acceptor.take() {
            match acceptor.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(anyhow!(e).context("acceptor failed")),
                Err(_) => result = Err(anyhow!("acceptor panicked")),
            }
        }
        // No more connections come to the relay: close the relayed ones (1001 where it can).
        if let Some(mut relay) = self.relay.take() {
            if let Err(e) = relay.shutdown() {
                result = Err(anyhow!(e).context("relay failed"));
            }
        }
        // The acceptor dropped its job sender: the worker finishes its job and returns.
        if let Some(worker) = self.admin_worker.take() {
            if worker.join().is_err() {
                result = Err(anyhow!("admin worker panicked"));
            }
        }
        for inbox in &self.shard_inboxes {
            let _ = inbox.send(ShardMsg::Shutdown);
        }
        for (shard_idx, shard) in self.shards.drain(..).enumerate() {
            match shard.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(anyhow!(e).context(format!("shard {shard_idx} failed"))),
                Err(_) => result = Err(anyhow!("shard {shard_idx} panicked")),
            }
        }
        if let Some(webhooks) = self.webhooks.take() {
            webhooks.shutdown();
        }
        if let Some(cluster) = self.cluster.take() {
            let ttl = cluster.lease_ttl();
            cluster.leave(ttl);
        }
        debug!("server stopped");
        result
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.acceptor.is_some() || !self.shards.is_empty() {
            let _ = self.stop_and_join();
        }
    }
}

/// The WebSocket limits and buffer sizes of every connection.
pub fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        // Never reached: tungstenite is only given control frames and the acceptor's refusals.
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(config.message_bytes_max))
        .max_frame_size(Some(config.message_bytes_max))
}

/// Requests at least this large get their own `mmap` from glibc's allocator and go back to the
/// system when freed; see [`tune_allocator`].
pub const MALLOC_MMAP_THRESHOLD_BYTES: usize = 64 * 1024;

/// Makes freed large buffers leave the process. Large buffers come and go in bursts: a join
/// storm builds one `hello_ack` per joiner, each carrying a copy of the snapshot. glibc's
/// default mmap threshold rises to the largest block freed so far, after which such buffers
/// come from the heap and their pages stay resident once freed (1,000 joiners of a 105 KB
/// document: 19 to 43 KB of RSS per connection afterwards instead of about 2 KB,
/// docs/benchmarks.md). A fixed threshold keeps them mapped on their own. Small allocations,
/// the hot path's, are unaffected. Process-wide; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = MALLOC_MMAP_THRESHOLD_BYTES as libc::c_int;
        // SAFETY: mallopt only changes glibc's allocation policy for later requests; the
        // parameter is a documented one and the value is in range.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
        if ok != 1 {
            warn!("mallopt(M_MMAP_THRESHOLD) refused; large freed buffers may stay resident");
        }
    }
}

/// The connection-layer limits of a configuration.
pub fn net_limits(config: &Config) -> NetLimits {
    NetLimits {
        reads_per_turn_max: config.reads_per_turn_max.max(1),
        outbound_bytes_max: config.outbound_bytes_max,
        conns_max: config.conns_per_shard_max,
        idle_timeout: config.idle_timeout,
        close_linger: config.handshake_timeout,
    }
}

/// The storage of one shard. The one place that picks the backend:
/// `--database-url` selects PostgreSQL (one connection per shard); it conflicts with
/// `--storage memory`.
///
/// # Errors
/// When the backend cannot be opened.
pub fn open_storage(config: &Config, shard_idx: usize) -> anyhow::Result<Box<dyn Storage>> {
    open_storage_in(config, shard_idx, None)
}

/// [`open_storage`] for a cluster node: PostgreSQL under `cluster`'s leases (every load
/// acquires its document's lease, every commit checks its fence).
///
/// # Errors
/// When the backend cannot be opened.
pub fn open_storage_in(
    config: &Config,
    shard_idx: usize,
    cluster: Option<&Cluster>,
) -> anyhow::Result<Box<dyn Storage>> {
    if let Some(url) = &config.database_url {
        anyhow::ensure!(
            config.storage != StorageKind::Memory,
            "--database-url and --storage memory contradict each other"
        );
        // The data directory keeps the server's local files (and its LOCK) beside the database.
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let lock = lock_data_dir(&config.data_dir)?;
        let mut storage = PgStorage::open(&PgOptions {
            url: url.clone(),
            timeout: config.database_timeout,
            synchronous_commit: config.fsync == FsyncMode::Always,
            ca_file: config.database_ca_file.clone(),
        })?;
        storage.keep_lock(lock);
        if shard_idx == 0 {
            info!("documents are kept in PostgreSQL at {}", storage.target());
        }
        if let Some(cluster) = cluster {
            storage = storage.with_leases(cluster.incarnation(), cluster.book());
        }
        return Ok(Box::new(storage));
    }
    if cluster.is_some() {
        anyhow::bail!("cluster mode needs --database-url");
    }
    match config.storage {
        StorageKind::Memory => Ok(Box::new(MemoryStorage::new())),
        StorageKind::Disk => Ok(Box::new(DiskStorage::open(&config.data_dir, config.fsync)?)),
    }
}

/// Access control of a configuration: `None` without key files. With disk storage the
/// revocation list lives in `--data-dir`; with memory storage it lives in memory.
///
/// # Errors
/// When a key file or the revocation list cannot be used.
pub fn open_auth(config: &Config) -> anyhow::Result<Option<Arc<Auth>>> {
    let revocations_dir = match config.storage {
        StorageKind::Disk => Some(config.data_dir.clone()),
        StorageKind::Memory => None,
    };
    let auth = Auth::open(&config.auth.key_files, revocations_dir)?;
    match &auth {
        Some(auth) => {
            for (id, kind) in auth.keys().describe() {
                info!("access control: key {id:?} ({kind:?})");
            }
            let n = auth.revocations().rules().len();
            if n > 0 {
                info!("access control: {n} revocations in force");
            }
            if config.storage == StorageKind::Memory {
                warn!("access control with --storage memory: revocations last until the process exits");
            }
        }
        None if !config.listen.ip().is_loopback() => warn!(
            "no --auth-key-file: every client that reaches {} can read and write every document",
            config.listen
        ),
        None => {}
    }
    Ok(auth)
}

/// Starts the collaboration server: binds, spawns the acceptor and the shards, and returns
/// once the listener accepts connections.
///
/// # Errors
/// When binding, storage or thread creation fails.
pub fn start(config: Config) -> anyhow::Result<ServerHandle> {
    // With --cluster-node: a new incarnation joins the cluster, its storages serve documents
    // under its leases, and its router sends every other document to its owner.
    let cluster = Cluster::join(&config)?;
    let router = cluster.as_ref().map(|cluster| {
        RouterOptions::for_lease_ttl(Arc::new(cluster.router()), cluster.lease_ttl())
    });
    start_node(config, router, cluster)
}

/// [`start`] for a cluster node: documents are routed by `router` (`None`: a single node).
///
/// # Errors
/// As [`start`].
pub fn start_routed(config: Config, router: Option<RouterOptions>) -> anyhow::Result<ServerHandle> {
    start_node(config, router, None)
}

fn start_node(
    config: Config,
    router: Option<RouterOptions>,
    cluster: Option<Cluster>,
) -> anyhow::Result<ServerHandle> {
    let n_shards = config.shard_count();
    let mut storages = Vec::with_capacity(n_shards);
    for shard_idx in 0..n_shards {
        storages.push(
            open_storage_in(&config, shard_idx, cluster.as_ref())
                .with_context(|| format!("opening storage of shard {shard_idx}"))?,
        );
    }
    let mut server = start_with_storages_routed(&config, storages, router)?;
    if let Some(cluster) = cluster {
        cluster.attach(
            server.shard_inboxes.clone(),
            server.auth.clone(),
            server.metrics.relay(),
        );
        server.metrics.attach_cluster(cluster.router());
        server.cluster = Some(cluster);
    }
    Ok(server)
}

/// Starts the collaboration server with one given storage per shard (tests use this to inject
/// failing storage); the shard count is `storages.len()`. Each storage moves to its shard's
/// storage worker thread ([`StorageWorker`]).
///
/// # Errors
/// When binding or thread creation fails.
pub fn start_with_storages(
    config: &Config,
    storages: Vec<Box<dyn Storage>>,
) -> anyhow::Result<ServerHandle> {
    start_with_storages_routed(config, storages, None)
}

/// [`start_with_storages`] for a cluster node whose documents `router` routes.
///
/// # Errors
/// As [`start_with_storages`].
pub fn start_with_storages_routed(
    config: &Config,
    storages: Vec<Box<dyn Storage>>,
    router: Option<RouterOptions>,
) -> anyhow::Result<ServerHandle> {
    let auth = open_auth(config).context("access control")?;
    let webhooks = open_webhooks(config).context("webhooks")?;
    let sink = webhooks.sink();
    let n_shards = storages.len();
    let mut storages = storages.into_iter();
    let mut handle = start_with_seats_routed(
        config,
        PlainWs::AwaitHello,
        n_shards,
        auth.clone(),
        router,
        |seat| {
            let storage = storages
                .next()
                .ok_or_else(|| anyhow!("one storage per shard"))?;
            let worker = StorageWorker::spawn(
                format!("storage-{}", seat.shard_idx),
                storage,
                seat.waker,
                seat.storage_available,
            )
            .context("spawning a storage worker thread")?;
            Ok(
                RoomHost::new(worker, RoomConfig::from_config(config), config.idle_unload)
                    .with_docs_max(config.docs_per_shard_max)
                    .with_replay_window_bytes_max(config.replay_window_shard_bytes)
                    .with_rate_limit(RateLimit::new(
                        config.msgs_per_second_max,
                        config.msgs_burst_max,
                    ))
                    .with_auth(auth.clone())
                    .with_webhooks(sink.clone())
                    .with_history_retention(Retention {
                        ops: config.history_retain_ops,
                        ms: u64::try_from(config.history_retain.as_millis()).unwrap_or(u64::MAX),
                    }),
            )
        },
    )?;
    if sink.is_enabled() {
        handle.metrics.set_webhooks(webhooks.counters());
    }
    handle.webhooks = Some(webhooks);
    Ok(handle)
}

/// The webhook delivery threads of a configuration (none without `--webhook-url`). Pending
/// deliveries persist in `--data-dir` (also with `--database-url`, whose server keeps its local
/// files there), not with `--storage memory`.
///
/// # Errors
/// When the secret or the persisted state cannot be used.
pub fn open_webhooks(config: &Config) -> anyhow::Result<Webhooks> {
    let state_dir = match (config.storage, &config.database_url) {
        (StorageKind::Memory, None) => None,
        _ => Some(config.data_dir.clone()),
    };
    Webhooks::start(&config.webhooks, state_dir)
}

/// Starts a server whose shards run the given handlers (one per shard): what the echo example
/// does with its echo handler.
///
/// # Errors
/// When binding or thread creation fails.
pub fn start_with<H: Handler + Send + 'static>(
    config: &Config,
    plain_ws: PlainWs,
    handlers: Vec<H>,
) -> anyhow::Result<ServerHandle> {
    start_with_auth(config, plain_ws, handlers, None)
}

/// [`start_with`] with access control (the handlers must share the same `auth`).
///
/// # Errors
/// When binding or thread creation fails.
pub fn start_with_auth<H: Handler + Send + 'static>(
    config: &Config,
    plain_ws: PlainWs,
    handlers: Vec<H>,
    auth: Option<Arc<Auth>>,
) -> anyhow::Result<ServerHandle> {
    let n_shards = handlers.len();
    let mut handlers = handlers.into_iter();
    start_with_seats(config, plain_ws, n_shards, auth, |_seat| {
        handlers
            .next()
            .ok_or_else(|| anyhow!("one handler per shard"))
    })
}

/// What a shard's handler may hold of its shard before the shard starts.
pub struct ShardSeat {
    /// The shard's index.
    pub shard_idx: usize,
    /// Wakes the shard's `Poll` (its storage worker uses it after each completion).
    pub waker: Arc<mio::Waker>,
    /// The shard's storage availability flag, which `/health` reads.
    pub storage_available: StorageAvailable,
}

/// Starts a server of `n_shards` shards whose handlers `make` builds, one per shard, given
/// its [`ShardSeat`]; [`start`], [`start_with_storages`] and [`start_with`] go through it.
/// `auth` (access control, `None` to run open) must be the one the handlers were given.
///
/// # Errors
/// When `make` fails, or binding or thread creation fails.
pub fn start_with_seats<H: Handler + Send + 'static>(
    config: &Config,
    plain_ws: PlainWs,
    n_shards: usize,
    auth: Option<Arc<Auth>>,
    make: impl FnMut(ShardSeat) -> anyhow::Result<H>,
) -> anyhow::Result<ServerHandle> {
    start_with_seats_routed(config, plain_ws, n_shards, auth, None, make)
}

/// [`start_with_seats`] for a cluster node: with `router`, the acceptor routes each document
/// (serves it here, relays it to its owner on the relay thread, or waits for the router) and
/// `--cluster-secret-file` signs and checks the relayed clients' addresses.
///
/// # Errors
/// As [`start_with_seats`], and when the cluster secret cannot be read.
pub fn start_with_seats_routed<H: Handler + Send + 'static>(
    config: &Config,
    plain_ws: PlainWs,
    n_shards: usize,
    auth: Option<Arc<Auth>>,
    router: Option<RouterOptions>,
    mut make: impl FnMut(ShardSeat) -> anyhow::Result<H>,
) -> anyhow::Result<ServerHandle> {
    anyhow::ensure!(n_shards > 0, "at least one shard");
    let cluster_secret = match &config.cluster_secret_file {
        Some(path) => Some(ClusterSecret::from_file(path).context("--cluster-secret-file")?),
        None => None,
    };
    tune_allocator();
    let metrics = MetricsRegistry::new(n_shards);
    let core_ids = if !config.no_pin_cores {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut shard_inboxes = Vec::with_capacity(n_shards);
    let mut parts = Vec::with_capacity(n_shards);
    for shard_idx in 0..n_shards {
        let poll = mio::Poll::new().context("creating a shard poll")?;
        let waker = Arc::new(
            mio::Waker::new(poll.registry(), WAKER_TOKEN).context("creating a shard waker")?,
        );
        let (inbox, receiver) = shard_channel(waker);
        let handler = make(ShardSeat {
            shard_idx,
            waker: inbox.waker(),
            storage_available: inbox.storage_available(),
        })?;
        let alive = inbox.alive();
        shard_inboxes.push(inbox);
        parts.push((poll, receiver, alive, handler));
    }
    // Bind before spawning the shards (storage workers, already started, stop when their
    // handlers are dropped).
    let (cluster, relay) = match &router {
        Some(router) => {
            if cluster_secret.is_none() {
                warn!("no --cluster-secret-file: owners count the clients this node relays against its address");
            }
            let (sender, thread) = spawn_relay(
                config.relay_conns_max.max(1),
                metrics.relay(),
                router.router.clone(),
                router.route_wait,
            )
            .context("spawning the relay thread")?;
            let routing = ClusterRouting {
                router: router.router.clone(),
                route_wait: router.route_wait,
                relay: sender,
                self_addr: None,
            };
            (Some(routing), Some(thread))
        }
        None => (None, None),
    };
    let options = AcceptorOptions {
        handshake_timeout: config.handshake_timeout,
        ws_config: ws_config(config),
        plain_ws,
        door: DoorLimits::from_config(config).map_err(anyhow::Error::msg)?,
        auth: auth.clone(),
        metrics_public: config.auth.metrics_public,
        admin_listen: config.auth.admin_listen,
        cluster,
        cluster_secret,
    };
    let mut acceptor = Acceptor::bind(
        config.listen,
        shard_inboxes.clone(),
        metrics.clone(),
        options,
    )
    .with_context(|| format!("binding {}", config.listen))?;
    if let Some(router) = &router {
        router.router.set_waker(acceptor.waker());
    }
    let admin_addr = acceptor.admin_addr();
    let admin_worker = match &auth {
        Some(auth) => {
            let (jobs, done, thread) =
                spawn_admin_worker(auth.clone(), shard_inboxes.clone(), acceptor.waker())
                    .context("spawning the admin worker")?;
            acceptor.attach_admin(jobs, done);
            Some(thread)
        }
        None => None,
    };
    let mut shards = Vec::with_capacity(n_shards);
    for (shard_idx, (poll, receiver, alive, mut handler)) in parts.into_iter().enumerate() {
        let limits = net_limits(config);
        let shard_metrics = metrics.shard(shard_idx);
        let core = if core_ids.is_empty() {
            None
        } else {
            Some(core_ids[shard_idx % core_ids.len()])
        };
        let spawned = std::thread::Builder::new()
            .name(format!("shard-{shard_idx}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        warn!("shard {shard_idx}: could not pin to core {}", core.id);
                    }
                }
                shard::run(poll, receiver, &mut handler, alive, limits, shard_metrics)
            });
        match spawned {
            Ok(thread) => shards.push(thread),
            Err(e) => {
                for inbox in &shard_inboxes {
                    let _ = inbox.send(ShardMsg::Shutdown);
                }
                return Err(anyhow!(e).context("spawning a shard thread"));
            }
        }
    }
    let local_addr = acceptor.local_addr();
    let acceptor_stop = acceptor.stopper();
    let acceptor = std::thread::Builder::new()
        .name("acceptor".to_owned())
        .spawn(move || acceptor.run())
        .context("spawning the acceptor thread")?;
    let shards_word = if n_shards == 1 { "shard" } else { "shards" };
    info!("listening on {local_addr} with {n_shards} {shards_word}");
    Ok(ServerHandle {
        local_addr,
        metrics,
        acceptor_stop,
        acceptor: Some(acceptor),
        shard_inboxes,
        shards,
        auth,
        admin_addr,
        admin_worker,
        webhooks: None,
        cluster: None,
        relay,
    })
}
