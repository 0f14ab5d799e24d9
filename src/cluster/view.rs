//! What the directory thread publishes and the acceptor reads: the membership, the owners it
//! knows, the answers of its lookups, and [`ClusterRouter`], the [`Router`] over them.
//!
//! Never touches the database: the acceptor thread only takes a short lock on
//! [`RouterState`] (never held by the directory across a database call) and asks the
//! directory thread, through a channel, to look up what it does not know.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use super::placement;
use super::route::{Route, Router};
use crate::storage::postgres::{Incarnation, LeaseBook};

/// Documents whose lookup may be outstanding at once; past it `route` answers `Unavailable`
/// (a flood of hellos for distinct documents must not grow the directory's queue unbounded).
pub const LOOKUPS_OUTSTANDING_MAX: usize = 10_000;

/// Lookup answers kept at most; the oldest are dropped first when it is reached.
pub const CACHED_ROUTES_MAX: usize = 100_000;

/// One node as the last heartbeat round saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// `--cluster-node`.
    pub name: String,
    /// Its current incarnation.
    pub incarnation: i64,
    /// `--advertise`, as given.
    pub advertise: String,
    /// `advertise` resolved (`None` when it does not resolve).
    pub addr: Option<SocketAddr>,
    /// Heartbeat within its lease TTL (the database's clock).
    pub alive: bool,
    /// Draining: takes no new document.
    pub draining: bool,
    /// Age of its heartbeat by the database's clock.
    pub heartbeat_age_ms: i64,
    /// Unexpired leases it holds.
    pub documents: i64,
    /// Connections it relayed to other nodes (reported by its heartbeat).
    pub relayed: i64,
}

/// A lookup's answer, valid until `until`.
#[derive(Clone, Debug)]
pub(crate) struct Cached {
    pub route: Route,
    /// The owner named by the lease row (node name, fence), for `/cluster/owner`.
    pub owner: Option<(String, i64)>,
    pub until: Instant,
}

/// Mutable state shared by the directory thread (writer) and the acceptor (reader).
#[derive(Debug, Default)]
pub(crate) struct RouterState {
    /// The membership of the last heartbeat round, by name.
    pub nodes: Arc<Vec<NodeView>>,
    /// Owners of unexpired leases (document → node name, fence) at the last round; at most
    /// `OWNERS_PUBLISHED_MAX` entries (`owners_complete` false when cut).
    pub owners: HashMap<String, (String, i64)>,
    /// Whether `owners` lists every owned document.
    pub owners_complete: bool,
    /// Lookup answers.
    pub cache: HashMap<String, Cached>,
    /// Documents whose lookup is queued or waiting for a recheck.
    pub asked: HashSet<String>,
    /// False while renewals are overdue (the node then serves nothing).
    pub serving: bool,
    /// Set by a drain: no document is served here any more, new ones go elsewhere.
    pub draining: bool,
}

/// What the directory thread asks itself to do, from other threads.
#[derive(Debug)]
pub(crate) enum DirectoryMsg {
    /// Find where `doc` is served (from `route`).
    Lookup(String),
    /// The shards' inboxes, to tell them about lost leases and revocations, and access
    /// control when it is on (sent once, after they start).
    Attach(
        Vec<crate::acceptor::ShardInbox>,
        Option<Arc<crate::auth::Auth>>,
    ),
    /// Mark this node draining; answered when the database has it.
    Drain(Sender<()>),
    /// Release every lease at once and leave; answered when done, then the thread exits.
    Finish(Sender<()>),
    /// Exit without releasing anything (the leases expire with the heartbeat).
    Stop,
}

/// Everything the directory thread, the router and the status endpoints share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub me: String,
    pub incarnation: Incarnation,
    pub ttl: Duration,
    pub book: LeaseBook,
    pub state: Mutex<RouterState>,
    pub waker: Mutex<Option<Arc<mio::Waker>>>,
    pub requests: Sender<DirectoryMsg>,
    /// The relay's counters (its open relayed connections are `/cluster`'s `relayed`, which
    /// the heartbeat reports); set when the server started.
    pub relay: std::sync::OnceLock<Arc<crate::cluster::relay::RelayCounters>>,
}

impl Shared {
    /// Wakes the acceptor: `Pending` answers may have changed.
    pub fn wake(&self) {
        if let Some(waker) = self.waker.lock().as_ref() {
            let _ = waker.wake();
        }
    }
}

/// The cluster's [`Router`]: answers from what the directory thread published, and asks it
/// to look up the rest (answering `Pending` meanwhile).
#[derive(Clone, Debug)]
pub struct ClusterRouter(pub(crate) Arc<Shared>);

/// The best other node for `doc`: the rendezvous winner among live, non-draining nodes
/// other than `me`, with its address.
fn winner_elsewhere(nodes: &[NodeView], me: &str, doc: &str) -> Option<SocketAddr> {
    let candidates = nodes
        .iter()
        .filter(|n| n.alive && !n.draining && n.name != me && n.addr.is_some());
    let name = placement::winner(doc, candidates.clone().map(|n| n.name.as_str()))?;
    candidates.filter(|n| n.name == name).find_map(|n| n.addr)
}

impl Router for ClusterRouter {
    fn route(&self, doc: &str) -> Route {
        let shared = &self.0;
        let mut state = shared.state.lock();
        if state.draining {
            return match winner_elsewhere(&state.nodes, &shared.me, doc) {
                Some(addr) => Route::Relay(addr),
                None => Route::Unavailable("this node is draining and no other is live".into()),
            };
        }
        if !state.serving {
            return Route::Unavailable("this node cannot reach the cluster's database".into());
        }
        if shared.book.fence(doc).is_some() {
            return Route::Local;
        }
        let now = Instant::now();
        if let Some(cached) = state.cache.get(doc) {
            if cached.until > now {
                return cached.route.clone();
            }
        }
        if let Some((owner, _)) = state.owners.get(doc) {
            let node = state.nodes.iter().find(|n| &n.name == owner);
            if let Some(addr) = node
                .filter(|n| n.alive && !n.draining && n.name != shared.me)
                .and_then(|n| n.addr)
            {
                return Route::Relay(addr);
            }
        }
        if state.asked.contains(doc) {
            return Route::Pending;
        }
        if state.asked.len() >= LOOKUPS_OUTSTANDING_MAX {
            return Route::Unavailable("too many documents being looked up".into());
        }
        state.asked.insert(doc.to_owned());
        drop(state);
        if shared
            .requests
            .send(DirectoryMsg::Lookup(doc.to_owned()))
            .is_err()
        {
            return Route::Unavailable("the cluster directory has stopped".into());
        }
        Route::Pending
    }

    fn set_waker(&self, waker: Arc<mio::Waker>) {
        *self.0.waker.lock() = Some(waker);
    }
}

impl ClusterRouter {
    /// `GET /cluster`: `{"nodes":[{"name","advertise","alive","heartbeat_age_ms","documents",
    /// "relayed"}]}` from the last heartbeat round (plus `"draining"`, `"self"`).
    pub fn nodes_json(&self) -> String {
        let nodes = self.0.state.lock().nodes.clone();
        let nodes: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "advertise": n.advertise,
                    "alive": n.alive,
                    "heartbeat_age_ms": n.heartbeat_age_ms,
                    "documents": n.documents,
                    "relayed": n.relayed,
                    "draining": n.draining,
                    "self": n.name == self.0.me,
                })
            })
            .collect();
        serde_json::json!({ "nodes": nodes }).to_string()
    }

    /// `GET /cluster/owner?doc=D`: `{"doc","owner","fence"}` (`owner` null when unowned, as
    /// far as the last round or lookup knows), plus `"placed"`: the node a new placement
    /// would choose now (the rendezvous winner among live, non-draining nodes).
    pub fn owner_json(&self, doc: &str) -> String {
        let shared = &self.0;
        let mut owner: Option<(String, i64)> = shared
            .book
            .fence(doc)
            .map(|fence| (shared.me.clone(), fence));
        let state = shared.state.lock();
        if owner.is_none() {
            owner = state.owners.get(doc).cloned();
        }
        if owner.is_none() {
            owner = state
                .cache
                .get(doc)
                .filter(|c| c.until > Instant::now())
                .and_then(|c| c.owner.clone());
        }
        let placed = placement::winner(
            doc,
            state
                .nodes
                .iter()
                .filter(|n| n.alive && !n.draining)
                .map(|n| n.name.as_str()),
        )
        .map(str::to_owned);
        drop(state);
        let (owner, fence) = match owner {
            Some((name, fence)) => (Some(name), Some(fence)),
            None => (None, None),
        };
        serde_json::json!({ "doc": doc, "owner": owner, "fence": fence, "placed": placed })
            .to_string()
    }

    /// The cluster's lines of `/metrics` (Prometheus text format).
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let counters = self.0.book.counters();
        let rows = [
            (
                "collab_cluster_lease_acquisitions_total",
                "Leases acquired by loads on this node.",
                counters.acquisitions.load(Ordering::Relaxed),
            ),
            (
                "collab_cluster_lease_losses_total",
                "Leases this node lost (taken over, or given up when renewal was overdue).",
                counters.losses.load(Ordering::Relaxed),
            ),
            (
                "collab_cluster_fencing_refusals_total",
                "Commits and snapshots refused by their document's fence (nothing written).",
                counters.fencing_refusals.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP collab_cluster_leases_held Leases this node holds now.\n\
             # TYPE collab_cluster_leases_held gauge\ncollab_cluster_leases_held {}",
            self.0.book.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, port: u16, alive: bool, draining: bool) -> NodeView {
        NodeView {
            name: name.to_owned(),
            incarnation: i64::from(port),
            advertise: format!("127.0.0.1:{port}"),
            addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            alive,
            draining,
            heartbeat_age_ms: 0,
            documents: 0,
            relayed: 0,
        }
    }

    fn router(nodes: Vec<NodeView>) -> (ClusterRouter, crossbeam_channel::Receiver<DirectoryMsg>) {
        let (requests, asked) = crossbeam_channel::unbounded();
        let shared = Shared {
            me: "a".to_owned(),
            incarnation: Incarnation(1),
            ttl: Duration::from_secs(2),
            book: LeaseBook::new(),
            state: Mutex::new(RouterState {
                nodes: Arc::new(nodes),
                serving: true,
                ..RouterState::default()
            }),
            waker: Mutex::new(None),
            requests,
            relay: Default::default(),
        };
        (ClusterRouter(Arc::new(shared)), asked)
    }

    #[test]
    fn routes_come_from_the_book_the_owners_and_lookups() {
        let b = node("b", 2, true, false);
        let b_addr = b.addr.expect("addr");
        let (router, asked) = router(vec![
            node("a", 1, true, false),
            b,
            node("c", 3, false, false),
        ]);
        router.0.book.insert("held", 4);
        assert_eq!(router.route("held"), Route::Local);
        // Unknown: one lookup, however often it is asked, until answered.
        assert_eq!(router.route("new"), Route::Pending);
        assert_eq!(router.route("new"), Route::Pending);
        assert!(matches!(asked.try_recv(), Ok(DirectoryMsg::Lookup(doc)) if doc == "new"));
        assert!(asked.try_recv().is_err());
        {
            let mut state = router.0.state.lock();
            state.asked.remove("new");
            state.cache.insert(
                "new".to_owned(),
                Cached {
                    route: Route::Relay(b_addr),
                    owner: Some(("b".to_owned(), 2)),
                    until: Instant::now() + Duration::from_secs(60),
                },
            );
            state.owners.insert("owned".to_owned(), ("b".to_owned(), 7));
            state.owners.insert("dead".to_owned(), ("c".to_owned(), 7));
        }
        assert_eq!(router.route("new"), Route::Relay(b_addr));
        assert_eq!(router.route("owned"), Route::Relay(b_addr));
        // An owner that is not alive is looked up instead (its lease is taken over).
        assert_eq!(router.route("dead"), Route::Pending);
        let owner: serde_json::Value =
            serde_json::from_str(&router.owner_json("owned")).expect("json");
        assert_eq!(owner["owner"], "b");
        assert_eq!(owner["fence"], 7);
        let held: serde_json::Value =
            serde_json::from_str(&router.owner_json("held")).expect("json");
        assert_eq!(
            (held["owner"].as_str(), held["fence"].as_i64()),
            (Some("a"), Some(4))
        );
        // Draining: nothing is local any more; everything goes to the live others.
        router.0.state.lock().draining = true;
        assert_eq!(router.route("held"), Route::Relay(b_addr));
        router.0.state.lock().draining = false;
        router.0.state.lock().serving = false;
        assert!(matches!(router.route("held"), Route::Unavailable(_)));
    }

    #[test]
    fn metrics_parse_strictly() {
        let (router, _asked) = router(Vec::new());
        router.0.book.insert("d", 1);
        let mut out = String::new();
        router.render_prometheus(&mut out);
        let families = crate::loadgen::prom::parse(&out).expect("valid exposition");
        assert_eq!(families.len(), 4, "{out}");
        assert!(out.contains("collab_cluster_leases_held 1"), "{out}");
    }

    #[test]
    fn a_draining_node_alone_has_nowhere_to_send() {
        let (router, _asked) = router(vec![node("a", 1, true, true), node("b", 2, true, true)]);
        router.0.state.lock().draining = true;
        assert!(matches!(router.route("x"), Route::Unavailable(_)));
    }
}
