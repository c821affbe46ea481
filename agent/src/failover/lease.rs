//! A node's own view of its lease (the node side of "Liveness and fencing"
//! in docs/ARCHITECTURE.md). Pure: times are milliseconds on the node's
//! monotonic clock, passed in.
//!
//! A renewal is timed from the moment the node *sent* it, so the lease the
//! node believes in always ends before the one the leader measures from
//! the moment it *received* the request. The node stops running vservers
//! `fence_lead_ms` before its lease ends, which leaves time to kill them.

/// The lease as the node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLease {
    lease_ms: u64,
    fence_lead_ms: u64,
    /// End of the lease on this node's monotonic clock; `None` = never held.
    valid_until_ms: Option<u64>,
}

impl NodeLease {
    /// `fence_lead_ms` is clamped below `lease_ms`.
    pub fn new(lease_ms: u64, fence_lead_ms: u64) -> Self {
        NodeLease {
            lease_ms,
            fence_lead_ms: fence_lead_ms.min(lease_ms.saturating_sub(1)),
            valid_until_ms: None,
        }
    }

    /// The leader granted a renewal that this node sent at `sent_at_ms`.
    /// `granted_ms` is the lease the leader says it grants; the shorter of
    /// the two wins, so a misconfigured node can never outlive the
    /// leader's view of it.
    pub fn renewed(&mut self, sent_at_ms: u64, granted_ms: u64) {
        let len = if granted_ms == 0 {
            self.lease_ms
        } else {
            self.lease_ms.min(granted_ms)
        };
        let until = sent_at_ms.saturating_add(len);
        self.valid_until_ms = Some(self.valid_until_ms.map_or(until, |u| u.max(until)));
    }

    /// The node may run (and start) vservers now.
    pub fn may_run(&self, now_ms: u64) -> bool {
        self.valid_until_ms
            .is_some_and(|u| now_ms.saturating_add(self.fence_lead_ms) < u)
    }

    /// Milliseconds until the node must have fenced itself (0 = now).
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.valid_until_ms.map_or(0, |u| {
            u.saturating_sub(now_ms.saturating_add(self.fence_lead_ms))
        })
    }

    /// When the node must have stopped everything (for the guard).
    pub fn fence_at_ms(&self) -> Option<u64> {
        self.valid_until_ms
            .map(|u| u.saturating_sub(self.fence_lead_ms))
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// Forget the lease: after a restart, or when the leader says the node
    /// is not a member.
    pub fn drop_lease(&mut self) {
        self.valid_until_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_node_may_not_run() {
        let l = NodeLease::new(1000, 200);
        assert!(!l.may_run(0));
        assert_eq!(l.remaining_ms(0), 0);
    }

    #[test]
    fn lease_counts_from_the_send_and_ends_early_by_the_fence_lead() {
        let mut l = NodeLease::new(1000, 200);
        l.renewed(100, 1000);
        assert!(l.may_run(100));
        assert!(l.may_run(899));
        assert!(!l.may_run(900), "fence lead: stop 200 ms before 1100");
        assert_eq!(l.remaining_ms(500), 400);
    }

    #[test]
    fn shorter_grant_wins_and_late_answers_to_old_sends_never_shrink() {
        let mut l = NodeLease::new(1000, 100);
        l.renewed(0, 400);
        assert!(!l.may_run(300));
        l.renewed(500, 0);
        assert!(l.may_run(1300));
        // An answer to an older request arriving late must not shorten it.
        l.renewed(200, 1000);
        assert!(l.may_run(1300));
        assert!(!l.may_run(1400));
    }

    #[test]
    fn dropped_lease_stops_everything() {
        let mut l = NodeLease::new(1000, 100);
        l.renewed(0, 1000);
        l.drop_lease();
        assert!(!l.may_run(1));
    }
}
