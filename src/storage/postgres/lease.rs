//! Leases with fencing, the storage's half of the cluster (`src/cluster/`, docs/cluster.md).
//!
//! In cluster mode every [`super::PgStorage`] of a node serves a document only under its
//! lease row in `collab_leases`: a load first acquires the lease (free, expired, or held by an
//! incarnation that is no longer a node's current one; the fence is then incremented) or finds
//! it already held by this incarnation, and keeps its fencing token; every commit and snapshot
//! of the document checks, in the same statement (hence the same transaction), that the lease
//! row still names this incarnation and that fence, with a share lock on the row so that a
//! takeover cannot commit in between. A document that fails the check is *fenced*: nothing of
//! it is written, and the shard drops it.
//!
//! [`LeaseBook`] is what the node's directory thread sees of the leases its storages hold: the
//! documents and their fences (it renews exactly those), plus the cluster's counters. It is
//! touched only on loads, releases and fencing refusals (never per op), under a lock that is
//! never held across a database call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// A node process's identity in the cluster: a fresh value from the database's
/// `collab_incarnations` sequence at every start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Incarnation(pub i64);

/// The leases a node's storages hold (document → fence) and the cluster's counters; cheap to
/// clone (shared).
#[derive(Clone, Debug, Default)]
pub struct LeaseBook(Arc<BookInner>);

#[derive(Debug, Default)]
struct BookInner {
    held: Mutex<HashMap<String, i64>>,
    counters: LeaseCounters,
    /// Cleared by the directory thread while the node must not take documents (its
    /// renewals failed for too long); loads then refuse to acquire.
    stopped: AtomicBool,
}

/// What `/metrics` shows of the leases (monotonic counters).
#[derive(Debug, Default)]
pub struct LeaseCounters {
    /// Leases acquired (or found held by this incarnation) by a load.
    pub acquisitions: AtomicU64,
    /// Leases this node lost: taken over by another node, or given up because renewal failed.
    pub losses: AtomicU64,
    /// Commits and snapshots of a document refused by the fence check (nothing written).
    pub fencing_refusals: AtomicU64,
}

impl LeaseBook {
    /// An empty book.
    pub fn new() -> LeaseBook {
        LeaseBook::default()
    }

    /// Records that `doc` is held with `fence`.
    pub fn insert(&self, doc: &str, fence: i64) {
        self.0.held.lock().insert(doc.to_owned(), fence);
    }

    /// Forgets `doc` (released, lost or fenced).
    pub fn remove(&self, doc: &str) {
        self.0.held.lock().remove(doc);
    }

    /// `doc`'s fence when a storage of this node holds its lease.
    pub fn fence(&self, doc: &str) -> Option<i64> {
        self.0.held.lock().get(doc).copied()
    }

    /// Every lease held, with its fence (what the directory renews).
    pub fn held(&self) -> Vec<(String, i64)> {
        self.0
            .held
            .lock()
            .iter()
            .map(|(doc, fence)| (doc.clone(), *fence))
            .collect()
    }

    /// How many leases are held.
    pub fn len(&self) -> usize {
        self.0.held.lock().len()
    }

    /// Whether no lease is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every lease (the node stopped serving).
    pub fn clear(&self) {
        self.0.held.lock().clear();
    }

    /// Whether loads may acquire leases (the directory's renewals are on time).
    pub fn may_acquire(&self) -> bool {
        !self.0.stopped.load(Ordering::Acquire)
    }

    /// Allows or forbids acquisitions by loads (set by the directory thread).
    pub fn set_may_acquire(&self, allowed: bool) {
        self.0.stopped.store(!allowed, Ordering::Release);
    }

    /// The counters.
    pub fn counters(&self) -> &LeaseCounters {
        &self.0.counters
    }

    pub(super) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Cluster mode of a [`super::PgStorage`]: who it is and the leases it holds.
#[derive(Debug)]
pub(super) struct LeaseMode {
    /// This process's incarnation.
    pub holder: Incarnation,
    /// Shared with the directory thread.
    pub book: LeaseBook,
    /// Documents this storage holds, with their fence (a subset of `book`).
    pub fences: HashMap<String, i64>,
    /// Documents the last sync refused by their fence, for [`super::Storage::take_fenced`].
    pub fenced: Vec<String>,
}

/// Takes `$1`'s lease for incarnation `$2`, when this incarnation is its node's current one
/// and not draining, and the lease is free, expired, held by an incarnation that is not a
/// live node's current one (no heartbeat within its TTL), or already ours. Another holder's
/// lease is taken with the fence incremented; ours keeps its fence. A loaded document's lease
/// does not expire by itself (`infinity`): it lasts as long as its holder's heartbeat, which
/// renews every lease of a node at once. No row: someone else holds it (or we may take none).
pub(super) const SQL_ACQUIRE: &str = "
INSERT INTO collab_leases AS l (name, holder, fence, expires_at)
SELECT $1::bytea, $2::bigint, 1, 'infinity'
WHERE EXISTS (SELECT 1 FROM collab_nodes WHERE incarnation = $2 AND NOT draining)
ON CONFLICT (name) DO UPDATE SET
    holder = EXCLUDED.holder,
    fence = CASE WHEN l.holder = EXCLUDED.holder THEN l.fence ELSE l.fence + 1 END,
    expires_at = EXCLUDED.expires_at
WHERE l.holder = EXCLUDED.holder OR l.holder IS NULL OR l.expires_at < now()
    OR NOT EXISTS (SELECT 1 FROM collab_nodes n WHERE n.incarnation = l.holder
        AND n.heartbeat > now() - n.lease_ttl_ms * interval '1 millisecond')
RETURNING fence";

/// Gives `$1`'s lease up when incarnation `$2` holds it (its fence stays, so the next holder's
/// is higher).
pub(super) const SQL_RELEASE: &str = "UPDATE collab_leases SET holder = NULL, expires_at = now() \
     WHERE name = $1 AND holder = $2";

/// The group commit of [`super::SQL_COMMIT`] with the fence check: `held` locks the lease rows
/// of the documents (`$16` names, `$17` fences) that incarnation `$15` still holds with those
/// fences (`$18`: the ops' acceptance times, as `$15` of the plain commit) (FOR SHARE: a takeover waits for this transaction, and one that committed first
/// makes the row fail the check); every write is limited to those documents. Returns the ids
/// of new documents (`true`) and the names of the documents refused (`false`, id NULL).
/// `$5` carries every op's document name (not only new documents').
pub(super) const SQL_COMMIT_FENCED: &str = "
WITH held AS MATERIALIZED (
    SELECT l.name FROM collab_leases l
    JOIN unnest($16::bytea[], $17::bigint[]) AS f (name, fence) ON l.name = f.name
    WHERE l.holder = $15::bigint AND l.fence = f.fence
    FOR SHARE OF l
), new_docs AS (
    INSERT INTO collab_docs (name, epoch, replicas_reserved)
    SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[]) AS n (name, epoch, reserved)
    WHERE n.name IN (SELECT name FROM held)
    ON CONFLICT (name) DO UPDATE SET replicas_reserved =
        GREATEST(collab_docs.replicas_reserved, EXCLUDED.replicas_reserved)
    RETURNING id, name
), new_ops AS (
    INSERT INTO collab_ops (doc_id, server_seq, crc, echo, accepted_ms)
    SELECT coalesce(o.doc_id, n.id), o.server_seq, o.crc, o.echo, o.accepted_ms
    FROM unnest($4::bigint[], $5::bytea[], $6::bigint[], $7::integer[], $8::text[],
                $18::bigint[])
        AS o (doc_id, name, server_seq, crc, echo, accepted_ms)
    LEFT JOIN new_docs n ON n.name = o.name
    WHERE o.name IN (SELECT name FROM held)
), reservations AS (
    UPDATE collab_docs d SET replicas_reserved = GREATEST(d.replicas_reserved, r.last)
    FROM unnest($9::bigint[], $10::bigint[]) AS r (id, last)
    WHERE d.id = r.id AND d.name IN (SELECT name FROM held)
), new_owners AS (
    INSERT INTO collab_replica_owners (doc_id, replica, owner)
    SELECT coalesce(w.doc_id, n.id), w.replica, w.owner
    FROM unnest($11::bigint[], $12::bytea[], $13::bigint[], $14::text[])
        AS w (doc_id, name, replica, owner)
    LEFT JOIN new_docs n ON n.name = w.name
    WHERE w.name IN (SELECT name FROM held)
    ON CONFLICT (doc_id, replica) DO NOTHING
)
SELECT id, name, true FROM new_docs
UNION ALL
SELECT NULL::bigint, f.name, false FROM unnest($16::bytea[]) AS f (name)
WHERE f.name NOT IN (SELECT name FROM held)";

/// [`super::SQL_SNAPSHOT`] with the fence check (`$7` holder, `$8` fence): no row when the
/// lease is not held with that fence, and then nothing is written.
pub(super) const SQL_SNAPSHOT_FENCED: &str = "
WITH held AS MATERIALIZED (
    SELECT name FROM collab_leases
    WHERE name = $1::bytea AND holder = $7::bigint AND fence = $8::bigint
    FOR SHARE
), doc AS (
    INSERT INTO collab_docs AS d
        (name, epoch, replicas_reserved, snapshot_head, snapshot_reserved, snapshot_runs, snapshot_crc)
    SELECT $1::bytea, $2::text, $4::bigint, $3::bigint, $4::bigint, $5::text, $6::integer
    WHERE EXISTS (SELECT 1 FROM held)
    ON CONFLICT (name) DO UPDATE SET
        replicas_reserved = GREATEST(d.replicas_reserved, EXCLUDED.replicas_reserved),
        snapshot_head = EXCLUDED.snapshot_head,
        snapshot_reserved = EXCLUDED.snapshot_reserved,
        snapshot_runs = EXCLUDED.snapshot_runs,
        snapshot_crc = EXCLUDED.snapshot_crc
    RETURNING id
), compacted AS (
    DELETE FROM collab_ops o USING doc WHERE o.doc_id = doc.id AND o.server_seq <= $3::bigint
)
SELECT id FROM doc";
