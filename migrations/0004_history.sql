-- collab-engine schema version 4: when the server accepted each op message (the `time` of
-- the document API's history entries, LogRecord::Accepted), in unix milliseconds. NULL for
-- ops written before this column existed. Independent of the other migrations; applied like
-- 0001 (src/storage/postgres/migrate.rs).
ALTER TABLE collab_ops ADD COLUMN accepted_ms bigint CHECK (accepted_ms >= 0);
