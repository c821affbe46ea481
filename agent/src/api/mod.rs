//! The gRPC edge: request validation and conversion between the wire types
//! and the core's own, and the one function that picks status codes.

pub mod cluster;
pub mod convert;
pub mod peer;

use tonic::{Code, Status};

use crate::state::StateError;
use crate::submit::SubmitError;

/// The one place that maps our errors to gRPC codes.
pub fn status(e: SubmitError) -> Status {
    match e {
        SubmitError::Refused(s) => state_status(s),
        SubmitError::NotLeader { .. }
        | SubmitError::NoQuorum { .. }
        | SubmitError::Busy(_)
        | SubmitError::Timeout(_)
        | SubmitError::ShuttingDown
        | SubmitError::Transport(_)
        | SubmitError::LeaderUnreachable { .. } => Status::unavailable(e.to_string()),
    }
}

pub fn state_status(e: StateError) -> Status {
    let code = match &e {
        StateError::Invalid { .. } => Code::InvalidArgument,
        StateError::NotFound { .. } => Code::NotFound,
        StateError::AlreadyExists { .. } => Code::AlreadyExists,
        StateError::Precondition { .. } => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}
