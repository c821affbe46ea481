//! Timing and fault knobs of one simulated run, and the arithmetic showing
//! the drift margin covers the drift bound.

use vsha_agent::controller::ControllerConfig;

/// Timing of the cluster under test (close to the `fast` profile).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Lease renewal (and node plan) period, on the node's clock.
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    /// The node stops its vservers this long before its lease ends.
    pub fence_lead_ms: u64,
    /// The leader's extra wait past the lease (covers clock drift).
    pub drift_margin_ms: u64,
    /// Upper bound of a hard kill (self-fence, guard, not placed here).
    pub kill_ms: u64,
    /// Upper bound of a graceful stop (ordered, desired stopped).
    pub graceful_ms: u64,
    /// Raft election timeout (also check_quorum's step-down delay).
    pub election_ms: u64,
    /// Raft append / heartbeat period of the oracle leader.
    pub append_ms: u64,
    pub order_ttl_ms: u64,
    pub proposal_retry_ms: u64,
    pub max_restarts: u32,
    /// Clock rates lie in 1 ± max_drift_ppm / 10^6.
    pub max_drift_ppm: i64,
    /// Ordinary one-way network delay range.
    pub delay_ms: (u64, u64),
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 100,
            lease_ms: 1000,
            fence_lead_ms: 300,
            drift_margin_ms: 500,
            kill_ms: 100,
            graceful_ms: 600,
            election_ms: 1000,
            append_ms: 50,
            order_ttl_ms: 3000,
            proposal_retry_ms: 1500,
            max_restarts: 2,
            // 5 %: far beyond any real crystal (< 200 ppm), so drift moves
            // timings by tens of milliseconds per lease and the margin is
            // actually exercised.
            max_drift_ppm: 50_000,
            delay_ms: (1, 20),
        }
    }
}

impl Timing {
    pub fn controller(&self) -> ControllerConfig {
        ControllerConfig {
            lease_ms: self.lease_ms,
            drift_margin_ms: self.drift_margin_ms,
            max_restarts: self.max_restarts,
            proposal_retry_ms: self.proposal_retry_ms,
        }
    }

    /// Whether the margin provably covers the drift bound. A node whose
    /// renewal was sent at real time `s` has killed its copies (guard) by
    /// `s + (lease - fence_lead) / (1 - ρ) + kill`; the leader, which
    /// received the renewal at `r >= s`, moves the vserver no earlier than
    /// `r + (lease + margin) / (1 + ρ)`. Safe iff the first is never later:
    /// `(lease - fence_lead)(1 + ρ)/(1 - ρ) + kill (1 + ρ) <= lease + margin`
    /// (in integer ppm arithmetic, rounded against us).
    pub fn margin_covers_drift(&self) -> bool {
        let m = 1_000_000i128;
        let rho = self.max_drift_ppm as i128;
        let node_ms = (self.lease_ms - self.fence_lead_ms.min(self.lease_ms - 1)) as i128;
        let fast = m + rho;
        let slow = m - rho;
        // Both sides scaled by slow * m.
        let lhs = node_ms * fast * m + (self.kill_ms as i128) * fast * slow;
        let rhs = ((self.lease_ms + self.drift_margin_ms) as i128) * slow * m;
        lhs <= rhs
    }
}

/// How the runtime around the pure code behaves where the pure code leaves
/// it open.
#[derive(Debug, Clone, Copy)]
pub struct Contract {
    /// A renewal also reports `Stopped` at the placement's generation for a
    /// vserver placed on the node that does not run there
    /// (`NodeRuntime::reports` in `failover/node.rs`).
    pub reports_placed_here: bool,
    /// The leader keeps each order until the node acknowledges it in a
    /// later renewal, and resends it with every answer (`on_heartbeat` in
    /// `failover/leader.rs`).
    pub orders_until_acked: bool,
    /// The leader drops queued `Start`/`Restart` orders for a vserver at a
    /// generation the controller fenced (its `Fence` command), every order
    /// older than the placement it has applied, and the starts a `Stop`
    /// supersedes (`failover/leader.rs`).
    pub purge_stale_orders: bool,
}

impl Contract {
    /// What `failover/node.rs` and `failover/leader.rs` do.
    pub const RUNTIME: Contract = Contract {
        reports_placed_here: true,
        orders_until_acked: true,
        purge_stale_orders: true,
    };
    /// The first runtime, before the fixes this simulation showed
    /// necessary: local copies reported only, each order sent in one answer
    /// and lost with it, queued orders never dropped.
    pub const FIRST: Contract = Contract {
        reports_placed_here: false,
        orders_until_acked: false,
        purge_stale_orders: false,
    };
}

/// Fault knobs (the schedule itself is drawn from the seed).
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Length of the fault phase (simulated ms); everything heals after it.
    pub duration_ms: u64,
    /// After healing, every vserver must run on exactly one node within this.
    pub recovery_bound_ms: u64,
    /// How long the run continues past the recovery bound, still checking.
    pub settle_ms: u64,
    /// Broken on purpose: nodes neither self-fence nor have a guard.
    pub ignore_lease: bool,
    /// Check `recovers_after_heal` (off to check only the safety
    /// invariants under a contract known to lose orders).
    pub check_recovery: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            duration_ms: 20_000,
            recovery_bound_ms: 12_000,
            settle_ms: 3_000,
            ignore_lease: false,
            check_recovery: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_margin_covers_the_drift_bound() {
        assert!(Timing::default().margin_covers_drift());
    }

    #[test]
    fn no_margin_and_no_fence_lead_does_not() {
        let t = Timing {
            drift_margin_ms: 0,
            fence_lead_ms: 0,
            ..Timing::default()
        };
        assert!(!t.margin_covers_drift());
    }
}
