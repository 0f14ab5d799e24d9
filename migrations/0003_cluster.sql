-- collab-engine schema version 3: the cluster's control plane (src/cluster/, docs/cluster.md).
-- Independent of the other tables: nothing here references collab_docs, so documents and
-- their ownership evolve separately. Applied like 0001 (src/storage/postgres/migrate.rs).

-- Incarnation ids: every start of a node takes a fresh one, so a restarted node never
-- inherits the leases of its previous process.
CREATE SEQUENCE collab_incarnations;

-- One row per node name: the current incarnation, where the other nodes reach it, its
-- heartbeat (the database's clock, now()), and whether it is draining (takes no documents).
CREATE TABLE collab_nodes (
    name text PRIMARY KEY CHECK (name <> ''),
    incarnation bigint NOT NULL UNIQUE,
    advertise text NOT NULL,
    heartbeat timestamptz NOT NULL,
    lease_ttl_ms bigint NOT NULL CHECK (lease_ttl_ms > 0),
    draining boolean NOT NULL DEFAULT false,
    -- Connections it relayed to other nodes since it started (reported by its heartbeat).
    relayed bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- One row per document ever owned: the incarnation holding it (NULL when released), its
-- fencing token (incremented by every acquisition by another incarnation, never decreased)
-- and when the lease runs out (the database's clock; 'infinity' once the holder loaded the
-- document: it then lasts as long as the holder's heartbeat, which renews all of a node's
-- leases at once). A lease is valid while unexpired and held by a live node's current
-- incarnation. A commit of the document's records checks, in its own transaction, that
-- holder and fence are still the committer's.
CREATE TABLE collab_leases (
    name bytea PRIMARY KEY,
    holder bigint,
    fence bigint NOT NULL CHECK (fence > 0),
    expires_at timestamptz NOT NULL
);
CREATE INDEX collab_leases_holder ON collab_leases (holder);

-- Revocations published by any node's POST /admin/revoke, polled by every node's directory
-- thread and applied to its connections. `rule` is the revocation's JSON request.
CREATE TABLE collab_revocations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
