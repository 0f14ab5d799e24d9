//! The directory thread of a node: membership (its heartbeat), lease renewal, the self-stop
//! when renewal is overdue, lookups for the router, drain and the final release.
//!
//! It owns one database connection of its own (a [`PgStorage`] used only for
//! [`PgStorage::query`], so reconnects, deadlines and TLS are the storage's); it never runs
//! on a shard or on the acceptor thread, and nothing waits for it but a shutdown.
//!
//! Timing, by this process's monotonic clock only: a round (the heartbeat, which renews every
//! lease of the node at once, since a lease is valid while its holder's heartbeat is younger
//! than the holder's TTL; one statement, one row written) runs every `ttl / 5`, each
//! statement bounded by `ttl / 5`. When no round has succeeded for [`STOP_AFTER_TTL_FRACTION`] of the
//! TTL, measured from the moment the last successful one was *sent* (its leases expire no
//! earlier than a TTL after that by the database's clock), the node stops serving every
//! document: loads may no longer acquire, and every shard drops its documents and closes
//! their clients with 1013. The stop comes at the latest `0.6 + 0.2` TTL after that send
//! (one statement deadline late), so at least a fifth of the TTL before any lease could
//! expire. Safety does not rest on this: the fence refuses a stale owner's commits anyway;
//! the stop keeps a cut-off node from serving reads and taking writes it cannot commit.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, error, info, warn};

use super::placement;
use super::revocations;
use super::route::Route;
use super::view::{Cached, DirectoryMsg, NodeView, Shared, CACHED_ROUTES_MAX};
use crate::acceptor::{ShardInbox, ShardMsg};
use crate::storage::postgres::PgStorage;

/// A round runs every TTL divided by this (and each statement's deadline is as long).
pub const ROUNDS_PER_TTL: u32 = 5;

/// Without a successful round for this fraction of the TTL, the node stops serving.
pub const STOP_AFTER_TTL_FRACTION: f64 = 0.6;

/// Owners published per round for `/cluster/owner` and the router at most (the rest are
/// found by lookups).
pub const OWNERS_PUBLISHED_MAX: i64 = 50_000;

/// How often a document whose owner is dead or draining (its lease not expired yet) is
/// looked up again.
const RECHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Registers a new incarnation of node `$1` (advertised at `$2`, TTL `$3` ms).
pub(crate) const SQL_REGISTER: &str = "
INSERT INTO collab_nodes (name, incarnation, advertise, heartbeat, lease_ttl_ms, draining, started_at)
VALUES ($1, nextval('collab_incarnations'), $2, now(), $3, false, now())
ON CONFLICT (name) DO UPDATE SET incarnation = EXCLUDED.incarnation,
    advertise = EXCLUDED.advertise, heartbeat = now(), lease_ttl_ms = EXCLUDED.lease_ttl_ms,
    draining = false, started_at = now(), relayed = 0
RETURNING incarnation";

/// One round: the heartbeat of node `$1` incarnation `$2` (draining `$3`, relayed `$4`), which
/// is also the renewal of every lease it holds (a lease is valid while its holder's heartbeat
/// is younger than the holder's TTL, so a round writes one row whatever the number of
/// documents), and, only if that incarnation is still the node's current one, which of the
/// leases `$5` with fences `$6` it still holds (read by primary key, nothing written). Rows:
/// `(true, NULL)` when the heartbeat landed, then `(false, name)` per lease still held.
const SQL_ROUND: &str = "
WITH me AS (
    UPDATE collab_nodes SET heartbeat = now(), draining = $3, relayed = $4
    WHERE name = $1 AND incarnation = $2 RETURNING name
)
SELECT true, NULL::bytea FROM me
UNION ALL
SELECT false, l.name FROM collab_leases l
JOIN unnest($5::bytea[], $6::bigint[]) AS f (name, fence) ON l.name = f.name
WHERE l.holder = $2 AND l.fence = f.fence AND EXISTS (SELECT 1 FROM me)";

/// Whether node row `n` is alive: a heartbeat within its TTL, by the database's clock.
macro_rules! live {
    ($n:literal) => {
        concat!(
            $n,
            ".heartbeat > now() - ",
            $n,
            ".lease_ttl_ms * interval '1 millisecond'"
        )
    };
}

/// The membership, with each node's valid leases.
const SQL_NODES: &str = concat!(
    "SELECT n.name, n.incarnation, n.advertise, n.draining,
        GREATEST(0, extract(epoch FROM (now() - n.heartbeat)) * 1000)::bigint,
        n.lease_ttl_ms, n.relayed,
        (SELECT count(*) FROM collab_leases l
         WHERE l.holder = n.incarnation AND l.expires_at > now() AND ",
    live!("n"),
    ")
    FROM collab_nodes n ORDER BY n.name"
);

/// Owners of valid leases (unexpired, holder alive), at most `$1`.
const SQL_OWNERS: &str = concat!(
    "SELECT l.name, n.name, l.fence FROM collab_leases l
    JOIN collab_nodes n ON n.incarnation = l.holder
    WHERE l.expires_at > now() AND ",
    live!("n"),
    " LIMIT $1"
);

/// The leases of documents `$1`: holder, fence, whether valid (unexpired, holder alive), ms
/// until expiry, and the holder's node (when the holder is a node's current incarnation)
/// with whether it drains and whether it is alive.
const SQL_LOOKUP: &str = concat!(
    "SELECT f.name, l.holder, l.fence, coalesce(l.expires_at > now() AND ",
    live!("n"),
    ", false),
        CASE WHEN isfinite(l.expires_at)
            THEN GREATEST(0, least(extract(epoch FROM (l.expires_at - now())), 3600) * 1000)
            ELSE 3600000 END::bigint,
        n.name, n.advertise, n.draining, coalesce(",
    live!("n"),
    ", false)
    FROM unnest($1::bytea[]) AS f (name)
    LEFT JOIN collab_leases l ON l.name = f.name
    LEFT JOIN collab_nodes n ON n.incarnation = l.holder"
);

/// Writes the leases of the free documents `$1` for the live, non-draining incarnations `$2`,
/// expiring in `$3` ms unless the node loads them (its load makes the lease last as long as
/// its heartbeat): placement decided once, in the database. A row that is validly held
/// meanwhile is left alone. Returns the documents placed, with holder and fence.
const SQL_PLACE: &str = concat!(
    "INSERT INTO collab_leases AS l (name, holder, fence, expires_at)
    SELECT p.name, p.holder, 1, now() + $3::bigint * interval '1 millisecond'
    FROM unnest($1::bytea[], $2::bigint[]) AS p (name, holder)
    JOIN collab_nodes n ON n.incarnation = p.holder AND NOT n.draining AND ",
    live!("n"),
    "
    ON CONFLICT (name) DO UPDATE SET
        holder = EXCLUDED.holder, fence = l.fence + 1, expires_at = EXCLUDED.expires_at
    WHERE l.holder IS NULL OR l.expires_at < now()
        OR NOT EXISTS (SELECT 1 FROM collab_nodes o WHERE o.incarnation = l.holder AND ",
    live!("o"),
    ")
    RETURNING l.name, l.holder, l.fence"
);

/// One lookup's answer being built: document, route, owner, recheck delay, to be placed.
type Answer = (String, Route, Option<(String, i64)>, Option<Duration>, bool);

/// Marks node `$1` incarnation `$2` draining.
const SQL_DRAIN: &str =
    "UPDATE collab_nodes SET draining = true WHERE name = $1 AND incarnation = $2";

/// Releases every lease of incarnation `$2` at once and marks node `$1` gone.
const SQL_FINISH: &str = "
WITH released AS (
    UPDATE collab_leases SET holder = NULL, expires_at = now() WHERE holder = $2 RETURNING 1
), gone AS (
    UPDATE collab_nodes SET heartbeat = to_timestamp(0), draining = true
    WHERE name = $1 AND incarnation = $2 RETURNING 1
)
SELECT (SELECT count(*) FROM released)";

/// The directory thread's state.
pub(crate) struct Directory {
    pub shared: Arc<Shared>,
    pub db: PgStorage,
    pub requests: Receiver<DirectoryMsg>,
    pub shards: Vec<ShardInbox>,
    /// When the last successful round was sent (`None`: never since a stop).
    pub last_round_ok: Option<Instant>,
    pub next_round: Instant,
    /// Documents to look up in the next batch.
    pub lookups: Vec<String>,
    /// Documents to look up again at the given time (owner dead or draining).
    pub rechecks: Vec<(Instant, String)>,
    pub draining: bool,
    /// `--advertise` values resolved so far.
    pub resolved: HashMap<String, Option<SocketAddr>>,
    /// Access control, to share revocations (`None`: off, nothing to share).
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Published forms of the rules known to be both in the database and in force here.
    pub revocations_seen: std::collections::HashSet<String>,
    /// Highest `collab_revocations.id` read.
    pub revocations_after: i64,
    pub next_revocation_poll: Instant,
}

/// What a lookup found about one document's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LeaseSeen {
    /// No row, released, expired, or held by an incarnation that is no node's current one.
    Free,
    /// Held by this incarnation.
    Mine(i64),
    /// Held, unexpired, by another node's current incarnation.
    Held {
        node: String,
        advertise: String,
        fence: i64,
        alive: bool,
        draining: bool,
        expires_in: Duration,
    },
}

/// Where `doc` goes, given its lease and the live candidates `(name, addr)` for a new
/// placement (this node among them when it may take documents): the route, the owner to
/// report, and when to look again if it must wait.
pub(crate) fn decide(
    doc: &str,
    seen: &LeaseSeen,
    me: &str,
    candidates: &[(String, Option<SocketAddr>)],
    resolve: impl Fn(&str) -> Option<SocketAddr>,
) -> (Route, Option<(String, i64)>, Option<Duration>) {
    match seen {
        LeaseSeen::Mine(fence) => (Route::Local, Some((me.to_owned(), *fence)), None),
        LeaseSeen::Held {
            node,
            advertise,
            fence,
            alive,
            draining,
            expires_in,
        } => {
            let owner = Some((node.clone(), *fence));
            if *alive && !*draining {
                match resolve(advertise) {
                    Some(addr) => (Route::Relay(addr), owner, None),
                    None => (
                        Route::Unavailable(format!(
                            "the owner's address {advertise:?} does not resolve"
                        )),
                        owner,
                        None,
                    ),
                }
            } else {
                // Its owner is gone or leaving: wait for the release or the expiry.
                (
                    Route::Pending,
                    owner,
                    Some((*expires_in).min(RECHECK_INTERVAL)),
                )
            }
        }
        LeaseSeen::Free => {
            match placement::winner(doc, candidates.iter().map(|(name, _)| name.as_str())) {
                None => (
                    Route::Unavailable("no live node to place it on".into()),
                    None,
                    None,
                ),
                Some(name) if name == me => (Route::Local, None, None),
                Some(name) => match candidates.iter().find(|(n, _)| n == name).and_then(|c| c.1) {
                    Some(addr) => (Route::Relay(addr), None, None),
                    None => (
                        Route::Unavailable(format!("{name}'s address does not resolve")),
                        None,
                        None,
                    ),
                },
            }
        }
    }
}

impl Directory {
    fn round_interval(&self) -> Duration {
        self.shared.ttl / ROUNDS_PER_TTL
    }

    /// Runs until `Finish` (or until every sender is gone).
    pub fn run(mut self) {
        loop {
            let now = Instant::now();
            self.check_stop(now);
            let mut wake_at = self.next_round;
            if self.auth.is_some() {
                wake_at = wake_at.min(self.next_revocation_poll);
            }
            if let Some((at, _)) = self.rechecks.iter().min_by_key(|(at, _)| *at) {
                wake_at = wake_at.min(*at);
            }
            let timeout = wake_at.saturating_duration_since(now);
            let first = if self.lookups.is_empty() {
                match self.requests.recv_timeout(timeout) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                None
            };
            let mut msgs: Vec<DirectoryMsg> = first.into_iter().collect();
            msgs.extend(self.requests.try_iter());
            for msg in msgs {
                match msg {
                    DirectoryMsg::Lookup(doc) => self.lookups.push(doc),
                    DirectoryMsg::Attach(shards, auth) => {
                        self.shards = shards;
                        self.auth = auth;
                    }
                    DirectoryMsg::Drain(reply) => {
                        self.drain();
                        let _ = reply.send(());
                    }
                    DirectoryMsg::Finish(reply) => {
                        self.finish();
                        let _ = reply.send(());
                        return;
                    }
                    DirectoryMsg::Stop => return,
                }
            }
            let now = Instant::now();
            self.check_stop(now);
            if now >= self.next_round {
                self.round();
            }
            if self.auth.is_some() && Instant::now() >= self.next_revocation_poll {
                self.share_revocations();
            }
            let now = Instant::now();
            let mut due = Vec::new();
            self.rechecks.retain(|(at, doc)| {
                if *at <= now {
                    due.push(doc.clone());
                    false
                } else {
                    true
                }
            });
            self.lookups.extend(due);
            if !self.lookups.is_empty() {
                self.lookup();
            }
        }
        debug!("cluster: directory stopped");
    }

    /// Stops serving when the last successful round is too old (and again whenever leases
    /// appear while stopped).
    fn check_stop(&mut self, now: Instant) {
        let overdue = match self.last_round_ok {
            Some(sent) => {
                now.saturating_duration_since(sent)
                    > self.shared.ttl.mul_f64(STOP_AFTER_TTL_FRACTION)
            }
            None => true,
        };
        let serving = self.shared.state.lock().serving;
        if overdue && (serving || !self.shared.book.is_empty()) {
            self.stop_serving();
        }
    }

    fn stop_serving(&mut self) {
        let book = &self.shared.book;
        book.set_may_acquire(false);
        let lost = book.held();
        book.clear();
        book.counters()
            .losses
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        {
            let mut state = self.shared.state.lock();
            if state.serving {
                error!(
                    "cluster: no lease renewal for {:?}: this node stops serving its {} document(s) \
                     before their leases can expire",
                    self.shared.ttl.mul_f64(STOP_AFTER_TTL_FRACTION),
                    lost.len()
                );
            }
            state.serving = false;
            state.cache.clear();
        }
        self.last_round_ok = None;
        for inbox in &self.shards {
            let _ = inbox.send(ShardMsg::LeasesLost { docs: None });
        }
        self.shared.wake();
    }

    /// Heartbeat and renewal, then the membership and owners.
    fn round(&mut self) {
        let sent = Instant::now();
        self.next_round = sent + self.round_interval();
        let held = self.shared.book.held();
        let names: Vec<&[u8]> = held.iter().map(|(doc, _)| doc.as_bytes()).collect();
        let fences: Vec<i64> = held.iter().map(|(_, fence)| *fence).collect();
        let relayed = self
            .shared
            .relay
            .get()
            .map_or(0, |relay| i64::try_from(relay.active()).unwrap_or(i64::MAX));
        let me = self.shared.me.clone();
        let incarnation = self.shared.incarnation.0;
        let rows = match self.db.query(
            SQL_ROUND,
            &[&me, &incarnation, &self.draining, &relayed, &names, &fences],
        ) {
            Ok(rows) => rows,
            Err(e) => {
                warn!("cluster: heartbeat and lease renewal failed: {e}");
                return;
            }
        };
        let mut heartbeat = false;
        let mut renewed = std::collections::HashSet::new();
        for row in &rows {
            let is_me: bool = row.get(0);
            if is_me {
                heartbeat = true;
            } else {
                let name: Vec<u8> = row.get(1);
                renewed.insert(name);
            }
        }
        if !heartbeat {
            error!(
                "cluster: node {me:?} has a newer incarnation (another process started under \
                 this name): this process serves nothing any more"
            );
            self.stop_serving();
            return;
        }
        self.last_round_ok = Some(sent);
        self.shared.book.set_may_acquire(!self.draining);
        let mut lost_by_shard: HashMap<usize, Vec<String>> = HashMap::new();
        for (doc, fence) in held {
            if renewed.contains(doc.as_bytes()) {
                continue;
            }
            // Gone since (released by its shard) is no loss.
            if self.shared.book.fence(&doc) != Some(fence) {
                continue;
            }
            self.shared.book.remove(&doc);
            self.shared
                .book
                .counters()
                .losses
                .fetch_add(1, Ordering::Relaxed);
            if !self.shards.is_empty() {
                let shard = crate::ids::shard_for_doc(&doc, self.shards.len()).0;
                lost_by_shard.entry(shard).or_default().push(doc);
            }
        }
        for (shard, docs) in lost_by_shard {
            warn!(
                "cluster: {} lease(s) taken over by another node",
                docs.len()
            );
            let _ = self.shards[shard].send(ShardMsg::LeasesLost { docs: Some(docs) });
        }
        let nodes = match self.db.query(SQL_NODES, &[]) {
            Ok(rows) => rows,
            Err(e) => {
                warn!("cluster: reading the membership failed: {e}");
                return;
            }
        };
        let mut view = Vec::with_capacity(nodes.len());
        for row in nodes {
            let name: String = row.get(0);
            let advertise: String = row.get(2);
            let age_ms: i64 = row.get(4);
            let ttl_ms: i64 = row.get(5);
            let addr = self.resolve(&advertise);
            view.push(NodeView {
                alive: age_ms <= ttl_ms,
                incarnation: row.get(1),
                draining: row.get(3),
                heartbeat_age_ms: age_ms,
                relayed: row.get(6),
                documents: row.get(7),
                name,
                advertise,
                addr,
            });
        }
        let owners = match self.db.query(SQL_OWNERS, &[&OWNERS_PUBLISHED_MAX]) {
            Ok(rows) => rows,
            Err(e) => {
                warn!("cluster: reading the owners failed: {e}");
                return;
            }
        };
        let complete = (owners.len() as i64) < OWNERS_PUBLISHED_MAX;
        let owners: HashMap<String, (String, i64)> = owners
            .into_iter()
            .filter_map(|row| {
                let doc = String::from_utf8(row.get::<_, Vec<u8>>(0)).ok()?;
                Some((doc, (row.get::<_, String>(1), row.get::<_, i64>(2))))
            })
            .collect();
        {
            let mut state = self.shared.state.lock();
            if !state.serving {
                info!("cluster: lease renewal works again; serving");
            }
            state.serving = true;
            state.nodes = Arc::new(view);
            state.owners = owners;
            state.owners_complete = complete;
            let now = Instant::now();
            state.cache.retain(|_, cached| cached.until > now);
        }
        self.shared.wake();
    }

    /// Looks up every queued document in one statement and publishes the answers.
    fn lookup(&mut self) {
        let mut docs = std::mem::take(&mut self.lookups);
        docs.sort();
        docs.dedup();
        let names: Vec<&[u8]> = docs.iter().map(|d| d.as_bytes()).collect();
        let rows = match self.db.query(SQL_LOOKUP, &[&names]) {
            Ok(rows) => rows,
            Err(e) => {
                warn!("cluster: lease lookup failed: {e}");
                let mut state = self.shared.state.lock();
                for doc in &docs {
                    state.asked.remove(doc);
                }
                drop(state);
                self.shared.wake();
                return;
            }
        };
        let incarnation = self.shared.incarnation.0;
        let (nodes, serving, draining) = {
            let state = self.shared.state.lock();
            (state.nodes.clone(), state.serving, state.draining)
        };
        let mut candidates: Vec<(String, Option<SocketAddr>)> = nodes
            .iter()
            .filter(|n| n.alive && !n.draining && n.name != self.shared.me)
            .map(|n| (n.name.clone(), n.addr))
            .collect();
        if serving && !draining {
            candidates.push((self.shared.me.clone(), None));
        }
        let resolved = &self.resolved;
        let now = Instant::now();
        let cache_for = (self.shared.ttl / 2).min(Duration::from_secs(1));
        let mut answers = Vec::with_capacity(rows.len());
        for row in rows {
            let Ok(doc) = String::from_utf8(row.get::<_, Vec<u8>>(0)) else {
                continue;
            };
            let holder: Option<i64> = row.get(1);
            let fence: Option<i64> = row.get(2);
            let unexpired: bool = row.get(3);
            let expires_ms: Option<i64> = row.get(4);
            let node: Option<String> = row.get(5);
            let seen = match (holder, fence, node) {
                (Some(h), Some(fence), _) if h == incarnation && unexpired => {
                    LeaseSeen::Mine(fence)
                }
                (Some(_), Some(fence), Some(node)) if unexpired => LeaseSeen::Held {
                    node,
                    advertise: row.get(6),
                    fence,
                    alive: row.get(8),
                    draining: row.get(7),
                    expires_in: Duration::from_millis(
                        u64::try_from(expires_ms.unwrap_or(0)).unwrap_or(0),
                    ),
                },
                _ => LeaseSeen::Free,
            };
            let (route, owner, recheck) = decide(&doc, &seen, &self.shared.me, &candidates, |a| {
                resolved
                    .get(a)
                    .copied()
                    .flatten()
                    .or_else(|| a.parse().ok())
            });
            let placing = seen == LeaseSeen::Free
                && matches!(route, Route::Local | Route::Relay(_))
                && recheck.is_none();
            answers.push((doc, route, owner, recheck, placing));
        }
        self.place(&mut answers, &nodes);
        let mut state = self.shared.state.lock();
        for (doc, route, owner, recheck, _) in answers {
            match recheck {
                Some(after) => self.rechecks.push((now + after, doc)),
                None => {
                    state.asked.remove(&doc);
                    if state.cache.len() >= CACHED_ROUTES_MAX {
                        state.cache.retain(|_, cached| cached.until > now);
                        if state.cache.len() >= CACHED_ROUTES_MAX {
                            state.cache.clear();
                        }
                    }
                    state.cache.insert(
                        doc,
                        Cached {
                            route,
                            owner,
                            until: now + cache_for,
                        },
                    );
                }
            }
        }
        drop(state);
        self.shared.wake();
    }

    /// Places the free documents of `answers` (`placing`) on the nodes their route names, in
    /// one statement: the lease row is written for the chosen node's incarnation, so every
    /// node then sees the same owner and no two nodes relay a document to each other on
    /// differing views of the membership. A document someone else took meanwhile (or whose
    /// chosen node is no longer live) is looked up again shortly.
    fn place(&mut self, answers: &mut [Answer], nodes: &[NodeView]) {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut holders: Vec<i64> = Vec::new();
        for (doc, route, _, _, placing) in answers.iter() {
            if !*placing {
                continue;
            }
            let holder = match route {
                Route::Local => Some(self.shared.incarnation.0),
                Route::Relay(addr) => nodes
                    .iter()
                    .find(|n| n.addr == Some(*addr) && n.alive && !n.draining)
                    .map(|n| n.incarnation),
                _ => None,
            };
            if let Some(holder) = holder {
                names.push(doc.as_bytes());
                holders.push(holder);
            }
        }
        if names.is_empty() {
            return;
        }
        let ttl_ms = i64::try_from(self.shared.ttl.as_millis()).unwrap_or(i64::MAX);
        let placed = match self.db.query(SQL_PLACE, &[&names, &holders, &ttl_ms]) {
            Ok(rows) => rows,
            Err(e) => {
                warn!("cluster: placing documents failed: {e}");
                Vec::new()
            }
        };
        let placed: HashMap<Vec<u8>, (i64, i64)> = placed
            .iter()
            .map(|row| (row.get::<_, Vec<u8>>(0), (row.get(1), row.get(2))))
            .collect();
        for (doc, route, owner, recheck, placing) in answers.iter_mut() {
            if !*placing {
                continue;
            }
            match placed.get(doc.as_bytes()) {
                Some(&(holder, fence)) => {
                    let name = nodes
                        .iter()
                        .find(|n| n.incarnation == holder)
                        .map_or_else(|| self.shared.me.clone(), |n| n.name.clone());
                    *owner = Some((name, fence));
                }
                None => {
                    *route = Route::Pending;
                    *recheck = Some(RECHECK_INTERVAL);
                }
            }
        }
    }

    /// `--advertise` to an address, resolved once (by name when it is not an IP).
    fn resolve(&mut self, advertise: &str) -> Option<SocketAddr> {
        if let Some(addr) = self.resolved.get(advertise) {
            return *addr;
        }
        let addr = advertise
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| advertise.to_socket_addrs().ok().and_then(|mut a| a.next()));
        if addr.is_none() {
            warn!("cluster: a node's --advertise {advertise:?} does not resolve");
        }
        self.resolved.insert(advertise.to_owned(), addr);
        addr
    }

    /// Puts in force the revocations other nodes published, then publishes this node's new
    /// ones (`revocations.rs`).
    fn share_revocations(&mut self) {
        self.next_revocation_poll = Instant::now() + revocations::POLL_INTERVAL;
        let Some(auth) = self.auth.clone() else {
            return;
        };
        let rows = match self.db.query(
            "SELECT id, rule FROM collab_revocations WHERE id > $1 ORDER BY id",
            &[&self.revocations_after],
        ) {
            Ok(rows) => rows,
            Err(e) => {
                warn!("cluster: reading revocations failed: {e}");
                return;
            }
        };
        for row in rows {
            let id: i64 = row.get(0);
            let text: String = row.get(1);
            if self.revocations_seen.contains(&text) {
                self.revocations_after = self.revocations_after.max(id);
                continue;
            }
            let Some(rule) = revocations::from_json(&text) else {
                warn!("cluster: revocation {id} does not parse; ignored: {text:?}");
                self.revocations_after = self.revocations_after.max(id);
                continue;
            };
            match auth.adopt(rule.clone()) {
                Ok(_) => {
                    info!("cluster: revocation from another node in force: {rule:?}");
                    let rule = Arc::new(rule);
                    for shard in self.shards.iter().filter(|s| s.is_alive()) {
                        // Nobody waits for the count here.
                        let (reply, _) = crossbeam_channel::bounded(1);
                        let _ = shard.send(ShardMsg::Revoke {
                            rule: rule.clone(),
                            reply,
                        });
                    }
                    self.revocations_seen.insert(text);
                    self.revocations_after = self.revocations_after.max(id);
                }
                Err(e) => {
                    warn!("cluster: revocation {id} not saved here (retried): {e}");
                    return;
                }
            }
        }
        for rule in auth.revocations().rules() {
            let text = revocations::to_json(rule);
            if self.revocations_seen.contains(&text) {
                continue;
            }
            match self.db.query(
                "INSERT INTO collab_revocations (rule) VALUES ($1) RETURNING id",
                &[&text],
            ) {
                Ok(_) => {
                    self.revocations_seen.insert(text);
                }
                Err(e) => {
                    warn!("cluster: publishing a revocation failed (retried): {e}");
                    return;
                }
            }
        }
    }

    fn drain(&mut self) {
        self.draining = true;
        self.shared.book.set_may_acquire(false);
        {
            let mut state = self.shared.state.lock();
            state.draining = true;
            state.cache.clear();
        }
        let me = self.shared.me.clone();
        let incarnation = self.shared.incarnation.0;
        match self.db.query(SQL_DRAIN, &[&me, &incarnation]) {
            Ok(_) => info!("cluster: draining (no new documents here)"),
            Err(e) => warn!("cluster: marking the node draining failed: {e}"),
        }
        self.shared.wake();
    }

    fn finish(&mut self) {
        let me = self.shared.me.clone();
        let incarnation = self.shared.incarnation.0;
        match self.db.query(SQL_FINISH, &[&me, &incarnation]) {
            Ok(rows) => {
                let n: i64 = rows.first().map_or(0, |row| row.get(0));
                info!("cluster: released {n} lease(s); left the cluster");
            }
            Err(e) => {
                warn!("cluster: releasing the leases failed (they expire by themselves): {e}")
            }
        }
        self.shared.book.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn decisions_follow_the_lease() {
        let candidates = vec![("a".to_owned(), None), ("b".to_owned(), addr(2))];
        let resolve = |s: &str| s.parse().ok();
        let (route, owner, _) = decide("d", &LeaseSeen::Mine(7), "a", &candidates, resolve);
        assert_eq!((route, owner), (Route::Local, Some(("a".to_owned(), 7))));
        let held = |alive, draining| LeaseSeen::Held {
            node: "b".into(),
            advertise: "127.0.0.1:2".into(),
            fence: 3,
            alive,
            draining,
            expires_in: Duration::from_secs(2),
        };
        let (route, _, recheck) = decide("d", &held(true, false), "a", &candidates, resolve);
        assert_eq!(
            (route, recheck),
            (Route::Relay(addr(2).expect("addr")), None)
        );
        // A dead or draining owner's unexpired lease: wait, and look again soon.
        for (alive, draining) in [(false, false), (true, true)] {
            let (route, _, recheck) =
                decide("d", &held(alive, draining), "a", &candidates, resolve);
            assert_eq!((route, recheck), (Route::Pending, Some(RECHECK_INTERVAL)));
        }
        // Free: the rendezvous winner among the candidates.
        for doc in ["x", "y", "z", "w"] {
            let (route, owner, _) = decide(doc, &LeaseSeen::Free, "a", &candidates, resolve);
            let expected = match placement::winner(doc, ["a", "b"]) {
                Some("a") => Route::Local,
                _ => Route::Relay(addr(2).expect("addr")),
            };
            assert_eq!((route, owner), (expected, None), "{doc}");
        }
        let (route, _, _) = decide("x", &LeaseSeen::Free, "a", &[], resolve);
        assert!(matches!(route, Route::Unavailable(_)));
    }
}
