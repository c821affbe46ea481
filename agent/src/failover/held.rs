//! Planned moves held for their final delta: the placement that moves a
//! stopped vserver is proposed only once the target reports a replica
//! taken after the stop, or abandoned when that takes too long.

use std::collections::BTreeMap;

use vsha_proto::v1 as pb;

use crate::controller::{MoveReason, Now, PlacementChange};
use crate::model::NodeId;

/// A move whose final delta has not arrived after this long is abandoned:
/// the vserver starts again where it was (a stopped vserver must not wait
/// for a standby that cannot take the delta).
pub fn final_sync_timeout_ms(lease_ms: u64) -> u64 {
    (10 * lease_ms).max(30_000)
}

/// A `Final` sync must finish before the placement that follows it.
#[derive(Debug, Clone)]
pub struct HeldProposal {
    pub change: PlacementChange,
    /// The standby must report a replica whose source is at least this.
    pub since_unix_ms: u64,
    /// When the first final sync of this move was ordered (monotonic ms).
    pub first_ms: u64,
}

#[derive(Debug, Default)]
pub struct HeldMoves {
    held: BTreeMap<String, HeldProposal>,
}

impl HeldMoves {
    /// Holds the move of `vserver` from `from` (at `generation`) to `to`
    /// for its final delta, ordered now.
    ///
    /// A retry of the same move keeps its first times: the timeout runs
    /// from the first order, and a replica taken after the first order is
    /// after the stop (the vserver has not run since; running it again
    /// takes a new generation). Moving `since` with every retry rejected
    /// every round that outlasted the retry interval, for good once the
    /// two periods locked in phase.
    pub fn hold(&mut self, vserver: String, from: NodeId, to: NodeId, generation: u64, now: Now) {
        let (first_ms, since_unix_ms) = self
            .held
            .get(&vserver)
            .filter(|h| h.change.to == to && h.change.expect_generation == generation)
            .map_or((now.mono_ms, now.unix_ms), |h| {
                (h.first_ms, h.since_unix_ms)
            });
        self.held.insert(
            vserver.clone(),
            HeldProposal {
                change: PlacementChange {
                    vserver,
                    from: Some(from),
                    to,
                    generation: generation + 1,
                    expect_generation: generation,
                    reason: MoveReason::Drain,
                },
                since_unix_ms,
                first_ms,
            },
        );
    }

    pub fn get(&self, vserver: &str) -> Option<&HeldProposal> {
        self.held.get(vserver)
    }

    pub fn get_mut(&mut self, vserver: &str) -> Option<&mut HeldProposal> {
        self.held.get_mut(vserver)
    }

    pub fn contains(&self, vserver: &str) -> bool {
        self.held.contains_key(vserver)
    }

    pub fn clear(&mut self) {
        self.held.clear();
    }

    /// Removes and returns the moves held longer than `limit_ms`.
    pub fn take_expired(&mut self, now_mono_ms: u64, limit_ms: u64) -> Vec<HeldProposal> {
        let names: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| now_mono_ms.saturating_sub(h.first_ms) > limit_ms)
            .map(|(n, _)| n.clone())
            .collect();
        names.iter().filter_map(|n| self.held.remove(n)).collect()
    }

    /// Removes and returns the planned moves whose target reports a replica
    /// taken after the stop.
    pub fn take_ready(
        &mut self,
        replicas: &BTreeMap<(String, NodeId), pb::ReplicaReport>,
    ) -> Vec<PlacementChange> {
        let names: Vec<String> = self
            .held
            .iter()
            .filter(|(name, h)| {
                h.change.reason.is_planned()
                    && replicas
                        .get(&((*name).clone(), h.change.to))
                        .is_some_and(|r| r.source_unix_ms >= h.since_unix_ms)
            })
            .map(|(n, _)| n.clone())
            .collect();
        names
            .iter()
            .filter_map(|n| self.held.remove(n))
            .map(|h| h.change)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            unix_ms: 1_000_000 + ms,
        }
    }

    fn replica(source_ms: u64) -> BTreeMap<(String, NodeId), pb::ReplicaReport> {
        let mut m = BTreeMap::new();
        m.insert(
            ("web".to_string(), 1),
            pb::ReplicaReport {
                vserver: "web".into(),
                node: 1,
                source_unix_ms: 1_000_000 + source_ms,
                digest: String::new(),
            },
        );
        m
    }

    #[test]
    fn a_round_started_after_the_first_order_releases_the_move_despite_retries() {
        let mut h = HeldMoves::default();
        h.hold("web".into(), 2, 1, 2, at(0));
        // the controller retries the order every lease while the first
        // round (started at 2500 ms) is still on its way
        h.hold("web".into(), 2, 1, 2, at(3000));
        h.hold("web".into(), 2, 1, 2, at(6000));
        let ready = h.take_ready(&replica(2500));
        assert_eq!(ready.len(), 1, "the round after the first order counts");
        assert_eq!((ready[0].to, ready[0].generation), (1, 3));
        assert!(!h.contains("web"));
    }

    #[test]
    fn a_replica_from_before_the_stop_does_not_release_the_move() {
        let mut h = HeldMoves::default();
        h.hold("web".into(), 2, 1, 2, at(5000));
        assert!(h.take_ready(&replica(4999)).is_empty());
        assert!(h.contains("web"));
        assert!(h.take_ready(&BTreeMap::new()).is_empty());
    }

    #[test]
    fn another_move_starts_afresh_and_the_timeout_runs_from_the_first_order() {
        let mut h = HeldMoves::default();
        h.hold("web".into(), 2, 1, 2, at(0));
        h.hold("web".into(), 2, 1, 2, at(20_000));
        assert!(h.take_expired(30_000, 30_000).is_empty());
        let gone = h.take_expired(30_001, 30_000);
        assert_eq!(gone.len(), 1);
        // a different target (or generation) is a new move: new times
        h.hold("web".into(), 2, 1, 2, at(40_000));
        h.hold("web".into(), 2, 3, 2, at(41_000));
        assert_eq!(h.get("web").map(|p| p.first_ms), Some(41_000));
        assert!(h.take_ready(&replica(40_500)).is_empty());
    }
}
