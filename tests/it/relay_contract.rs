//! The contract's tests (`contract.rs`) again, each against an entry node that owns none of the
//! documents: every connection goes through the relay to the owner (`relay::contract_pair`).

use crate::relay::contract_pair as contract_server;

// Deliberately the same tests compiled a second time, against another server.
#[allow(clippy::duplicate_mod)]
#[path = "contract.rs"]
mod contract;
