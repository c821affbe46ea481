//! Planned moves held for their final delta: the placement that moves a
//! stopped vserver is proposed only once the holder reports a round to the
//! target that answered a final-sync order of this move (so begun after the
//! stop), or abandoned when that takes too long.

use std::collections::BTreeMap;

use crate::controller::{MoveReason, PlacementChange};
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
    /// The first final-sync order of this move, (term, seq): a round that
    /// answered it or a later one was begun after the stop. Orders, not
    /// wall times, so that no two machines' clocks are compared.
    pub first_order: (u64, u64),
    /// When the first final sync of this move was ordered (monotonic ms).
    pub first_ms: u64,
}

#[derive(Debug, Default)]
pub struct HeldMoves {
    held: BTreeMap<String, HeldProposal>,
}

impl HeldMoves {
    /// Holds the move of `vserver` from `from` (at `generation`) to `to`
    /// for its final delta, ordered now as `order` (term, seq).
    ///
    /// A retry of the same move keeps its first order and time: the timeout
    /// runs from the first order, and a round that answered any order of
    /// this move was begun after the stop (the vserver has not run since;
    /// running it again takes a new generation or a new move).
    pub fn hold(
        &mut self,
        vserver: String,
        from: NodeId,
        to: NodeId,
        generation: u64,
        order: (u64, u64),
        now_mono_ms: u64,
    ) {
        let (first_ms, first_order) = self
            .held
            .get(&vserver)
            .filter(|h| h.change.to == to && h.change.expect_generation == generation)
            .map_or((now_mono_ms, order), |h| (h.first_ms, h.first_order));
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
                first_order,
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

    /// Removes and returns the planned moves for which a round to the
    /// target answered one of their final-sync orders; `answered` holds,
    /// per (vserver, standby), the newest order a round answered.
    pub fn take_ready(
        &mut self,
        answered: &BTreeMap<(String, NodeId), (u64, u64)>,
    ) -> Vec<PlacementChange> {
        let names: Vec<String> = self
            .held
            .iter()
            .filter(|(name, h)| {
                h.change.reason.is_planned()
                    && answered
                        .get(&((*name).clone(), h.change.to))
                        .is_some_and(|o| *o >= h.first_order)
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

    fn answered(order: (u64, u64)) -> BTreeMap<(String, NodeId), (u64, u64)> {
        let mut m = BTreeMap::new();
        m.insert(("web".to_string(), 1), order);
        m
    }

    #[test]
    fn a_round_answering_the_first_order_releases_the_move_despite_retries() {
        let mut h = HeldMoves::default();
        h.hold("web".into(), 2, 1, 2, (4, 10), 0);
        // the controller retries the order every lease while the round
        // answering the first one is still on its way
        h.hold("web".into(), 2, 1, 2, (4, 11), 3000);
        h.hold("web".into(), 2, 1, 2, (4, 12), 6000);
        let ready = h.take_ready(&answered((4, 10)));
        assert_eq!(ready.len(), 1, "the round answering the first order counts");
        assert_eq!((ready[0].to, ready[0].generation), (1, 3));
        assert!(!h.contains("web"));
    }

    #[test]
    fn a_regular_round_or_an_earlier_moves_order_does_not_release_the_move() {
        let mut h = HeldMoves::default();
        h.hold("web".into(), 2, 1, 2, (4, 10), 0);
        assert!(h.take_ready(&answered((0, 0))).is_empty(), "regular round");
        assert!(
            h.take_ready(&answered((4, 9))).is_empty(),
            "an earlier move"
        );
        assert!(
            h.take_ready(&answered((3, 50))).is_empty(),
            "an earlier leader"
        );
        assert!(h.take_ready(&BTreeMap::new()).is_empty());
        assert!(h.contains("web"));
        let mut other = answered((4, 10));
        other.insert(("db".to_string(), 1), (4, 11));
        other.remove(&("web".to_string(), 1));
        other.insert(("web".to_string(), 3), (4, 12));
        assert!(
            h.take_ready(&other).is_empty(),
            "another vserver or standby"
        );
    }

    #[test]
    fn another_move_starts_afresh_and_the_timeout_runs_from_the_first_order() {
        let mut h = HeldMoves::default();
        h.hold("web".into(), 2, 1, 2, (4, 1), 0);
        h.hold("web".into(), 2, 1, 2, (4, 2), 20_000);
        assert!(h.take_expired(30_000, 30_000).is_empty());
        let gone = h.take_expired(30_001, 30_000);
        assert_eq!(gone.len(), 1);
        // a different target (or generation) is a new move: new first order
        h.hold("web".into(), 2, 1, 2, (4, 3), 40_000);
        h.hold("web".into(), 2, 3, 2, (4, 4), 41_000);
        let p = h.get("web").expect("held");
        assert_eq!((p.first_ms, p.first_order), (41_000, (4, 4)));
        assert!(h.take_ready(&answered((4, 3))).is_empty());
    }
}
