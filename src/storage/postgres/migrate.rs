//! The schema of the PostgreSQL backend: the SQL files under `migrations/`, embedded in the
//! binary, applied in order and recorded in `collab_schema_version`.
//!
//! [`migrate`] runs in one transaction under a transaction-scoped advisory lock, so servers
//! (or shards) starting at once against the same database apply each migration exactly once,
//! and a failure leaves the schema as it was. A database whose schema is newer than this
//! binary knows is refused: an older binary must not write into a layout it does not know.

use tokio_postgres::Client;

/// Every migration, in order: `(version, file name, SQL)`. Versions increase; a new schema
/// change is a new file and a new entry, never an edit of a shipped one. Each migration is
/// independent of the others, and every one not yet recorded is applied (not only those above
/// the highest recorded), so features merged in any order all reach every database.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "0001_init.sql",
        include_str!("../../../migrations/0001_init.sql"),
    ),
    (
        2,
        "0002_replica_owners.sql",
        include_str!("../../../migrations/0002_replica_owners.sql"),
    ),
    (
        3,
        "0003_cluster.sql",
        include_str!("../../../migrations/0003_cluster.sql"),
    ),
    (
        4,
        "0004_history.sql",
        include_str!("../../../migrations/0004_history.sql"),
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Key of the advisory lock held while migrating ("collab" in ASCII).
const MIGRATION_LOCK: i64 = 0x636f_6c6c_6162;

/// Why the schema could not be brought to [`SCHEMA_VERSION`].
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database said no (or the connection failed).
    #[error("applying the schema failed: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The database's schema is newer than this binary.
    #[error(
        "the database schema is version {found}, newer than the version {known} this \
         collab-engine knows: upgrade collab-engine (it never writes into a schema it does not know)"
    )]
    TooNew {
        /// Highest version recorded in the database.
        found: i32,
        /// [`SCHEMA_VERSION`].
        known: i32,
    },
}

/// Brings the database's schema to [`SCHEMA_VERSION`]; returns the versions it applied.
///
/// # Errors
/// [`MigrateError::TooNew`] when the database is ahead of this binary; `Db` when a statement
/// fails (nothing is then applied).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS collab_schema_version (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let recorded: Vec<i32> = tx
        .query("SELECT version FROM collab_schema_version", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let found = recorded.iter().copied().max().unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(MigrateError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| !recorded.contains(v)) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO collab_schema_version (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_are_named_after_their_file() {
        let mut last = 0;
        for (version, name, sql) in MIGRATIONS {
            assert!(*version > last, "{name}");
            last = *version;
            assert!(name.starts_with(&format!("{version:04}_")), "{name}");
            assert!(!sql.trim().is_empty());
        }
    }
}
