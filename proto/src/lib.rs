//! The vsha wire contract. `Cluster` is the operator's API, `Peer` is spoken
//! between agents. Nothing but generated code lives here: handlers convert
//! these types into the agent's own at the edge.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("vsha.v1");
}
