//! Failover (issue 5): the node side of leases and fencing, the plan a
//! node follows, and the runtimes that drive the pure controller
//! ([`crate::controller`]) and the node's vservers.

pub mod clock;
pub mod events;
pub mod guard;
pub mod health;
pub mod held;
pub mod host;
pub mod leader;
pub mod lease;
pub mod node;
pub mod node_plan;
pub mod replication;
