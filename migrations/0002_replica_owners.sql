-- collab-engine schema version 2: which user first used each replica of a document (access
-- control's replica binding, LogRecord::ReplicaOwner). Never compacted: a binding lives as long
-- as the document. Applied like 0001 (src/storage/postgres/migrate.rs).
CREATE TABLE collab_replica_owners (
    doc_id bigint NOT NULL REFERENCES collab_docs (id) ON DELETE CASCADE,
    replica bigint NOT NULL CHECK (replica > 0),
    -- The token's `sub` that first used the replica.
    owner text NOT NULL,
    PRIMARY KEY (doc_id, replica)
);
