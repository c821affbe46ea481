//! vsha-agent: `vshad`, the agent that holds a Raft replica of the cluster
//! state, and `vsha`, the operator's CLI. See docs/ARCHITECTURE.md.

pub mod agent;
pub mod api;
pub mod command;
pub mod config;
pub mod controller;
pub mod failover;
#[doc(hidden)]
pub mod fuzzing;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod peer_client;
pub mod pki;
pub mod raft_loop;
pub mod raft_node;
pub mod sd_notify;
pub mod state;
pub mod submit;
pub mod tls;
pub mod transport;
pub mod validate;
