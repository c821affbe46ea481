//! The failover controller (issue 5): a pure state machine. Work in progress.
