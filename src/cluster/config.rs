//! [`ClusterConfig`]: the cluster flags, flattened at the end of the server's `Config`.

use std::time::Duration;

use clap::Args;

/// Shortest `--lease-ttl`: renewal runs every third of it, and the node stops serving a
/// safety margin before it; below this a busy database or machine would make nodes give up
/// their documents for nothing.
pub const LEASE_TTL_MIN: Duration = Duration::from_millis(600);

/// Cluster flags (docs/cluster.md).
#[derive(Clone, Debug, Default, Args)]
pub struct ClusterConfig {
    /// Join a cluster under this node name (unique per node; needs --database-url and
    /// --advertise). Nodes sharing a database form a cluster: each document is served by the
    /// one node holding its lease, and a restart under the same name is a new incarnation.
    #[arg(
        long = "cluster-node",
        value_name = "NAME",
        env = "COLLAB_CLUSTER_NODE"
    )]
    pub node: Option<String>,

    /// HOST:PORT where the other nodes reach this node's listener (relayed connections).
    #[arg(long, value_name = "HOST:PORT", env = "COLLAB_ADVERTISE")]
    pub advertise: Option<String>,

    /// How long a node's leases and heartbeat last without renewal. A node that stops (dies,
    /// pauses, loses the database) makes its documents wait up to this long (plus 1 s) before
    /// another node serves them; renewal runs every third of it. 5 s rides out a busy database.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "5s",
        env = "COLLAB_LEASE_TTL",
        value_parser = parse_lease_ttl
    )]
    pub lease_ttl: Duration,
}

fn parse_lease_ttl(text: &str) -> Result<Duration, String> {
    let ttl = crate::units::parse_duration(text)?;
    if ttl < LEASE_TTL_MIN {
        return Err(format!(
            "must be at least {} ms (renewal runs every third of it)",
            LEASE_TTL_MIN.as_millis()
        ));
    }
    Ok(ttl)
}
