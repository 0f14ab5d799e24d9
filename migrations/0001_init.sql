-- collab-engine schema version 1: documents, their snapshots and their op logs.
-- Applied by the server at start (src/storage/postgres/migrate.rs) inside one transaction,
-- recorded in collab_schema_version. Nothing here depends on the shard count or the node.

-- One row per document. The name is bytea: document names are arbitrary UTF-8 and may hold
-- NUL, which text cannot.
CREATE TABLE collab_docs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name bytea NOT NULL UNIQUE,
    -- Names this incarnation of the document's history (contract: epoch).
    epoch text NOT NULL CHECK (epoch <> ''),
    -- Highest replica id reserved so far; the next one handed out is above it.
    replicas_reserved bigint NOT NULL DEFAULT 0 CHECK (replicas_reserved >= 0),
    -- The newest snapshot: server_seq it includes, replicas reserved then, the contract's
    -- snapshot object {"runs":[...]}, and CRC32C of snapshot_runs. All NULL when none.
    snapshot_head bigint CHECK (snapshot_head >= 0),
    snapshot_reserved bigint,
    snapshot_runs text,
    snapshot_crc integer,
    CHECK ((snapshot_head IS NULL) = (snapshot_runs IS NULL))
);

-- The op log after the snapshot: one row per accepted op message, its op_echo JSON exactly as
-- broadcast. crc is CRC32C of the big-endian server_seq followed by echo's bytes. Rows the
-- snapshot covers are deleted when it is written.
CREATE TABLE collab_ops (
    doc_id bigint NOT NULL REFERENCES collab_docs (id) ON DELETE CASCADE,
    server_seq bigint NOT NULL CHECK (server_seq > 0),
    crc integer NOT NULL,
    echo text NOT NULL,
    PRIMARY KEY (doc_id, server_seq)
);
