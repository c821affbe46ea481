//! Raft as an oracle: one linearizable log of committed commands, a term
//! and its leader. See the assumptions at the top of `failover_sim.rs`.

use std::collections::{BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use vsha_agent::command::Command;
use vsha_agent::model::NodeId;

use super::net::Net;

struct Pending {
    cmd: Command,
    commit_at: u64,
}

/// What changed in one oracle step.
#[derive(Debug)]
pub enum RaftEvent {
    /// `leader` won `term`; `voters` (connected to it) know the term now.
    Elected {
        leader: NodeId,
        term: u64,
        voters: Vec<NodeId>,
        kept: usize,
        dropped: usize,
    },
    /// The leader's entry of its own term is committed: it has applied the
    /// whole log and may act as leader.
    Ready { leader: NodeId },
    /// New entries were committed.
    Committed,
}

pub struct Raft {
    pub term: u64,
    pub leader: Option<NodeId>,
    /// The leader's own-term entry is committed.
    pub ready: bool,
    /// Committed commands, in order.
    pub log: Vec<Command>,
    pending: VecDeque<Pending>,
    noop_at: u64,
    /// Since when the leader has been unable to lead, and the election
    /// jitter drawn then.
    unhealthy: Option<(u64, u64)>,
    voters: Vec<NodeId>,
    election_ms: u64,
}

impl Raft {
    pub fn new(voters: Vec<NodeId>, log: Vec<Command>, election_ms: u64) -> Self {
        Raft {
            term: 0,
            leader: None,
            ready: false,
            log,
            pending: VecDeque::new(),
            noop_at: 0,
            unhealthy: Some((0, 0)),
            voters,
            election_ms,
        }
    }

    /// `n` (running) reaches a majority of voters whose agents run.
    pub fn has_quorum(&self, n: NodeId, alive: &BTreeSet<NodeId>, net: &Net) -> bool {
        if !alive.contains(&n) {
            return false;
        }
        let reach = self
            .voters
            .iter()
            .filter(|v| alive.contains(v) && net.connected(n, **v))
            .count();
        reach * 2 > self.voters.len()
    }

    /// A proposal from `from`, which believes it leads `term`. Dropped
    /// unless `from` is the leader of the current term.
    pub fn propose(&mut self, from: NodeId, term: u64, cmd: Command, commit_at: u64) -> bool {
        if self.leader != Some(from) || term != self.term {
            return false;
        }
        self.pending.push_back(Pending { cmd, commit_at });
        true
    }

    /// The leader's agent died or stepped down: it leads no more, and an
    /// election follows after the timeout.
    pub fn leader_gone(&mut self, id: NodeId) {
        if self.leader == Some(id) {
            self.leader = None;
            self.ready = false;
        }
    }

    pub fn tick(
        &mut self,
        now: u64,
        alive: &BTreeSet<NodeId>,
        net: &Net,
        rng: &mut StdRng,
        commit_delay: u64,
    ) -> Vec<RaftEvent> {
        let mut out = Vec::new();
        let healthy = self.leader.is_some_and(|l| self.has_quorum(l, alive, net));
        if healthy {
            self.unhealthy = None;
            if !self.ready && now >= self.noop_at {
                self.ready = true;
                if let Some(leader) = self.leader {
                    out.push(RaftEvent::Ready { leader });
                }
            }
            let mut committed = false;
            while self.pending.front().is_some_and(|p| p.commit_at <= now) {
                if let Some(p) = self.pending.pop_front() {
                    self.log.push(p.cmd);
                    committed = true;
                }
            }
            if committed {
                out.push(RaftEvent::Committed);
            }
            return out;
        }
        let (since, jitter) = *self
            .unhealthy
            .get_or_insert((now, rng.gen_range(0..=self.election_ms / 2)));
        if now < since + self.election_ms + jitter {
            return out;
        }
        let candidates: Vec<NodeId> = self
            .voters
            .iter()
            .copied()
            .filter(|&c| self.has_quorum(c, alive, net))
            .collect();
        let Some(&leader) = candidates.choose(rng) else {
            return out;
        };
        // The old leader's uncommitted entries: a prefix reached a majority
        // and is committed by the new leader before its own entry; the rest
        // is lost.
        let keep = rng.gen_range(0..=self.pending.len());
        let dropped = self.pending.len() - keep;
        for _ in 0..keep {
            if let Some(p) = self.pending.pop_front() {
                self.log.push(p.cmd);
            }
        }
        self.pending.clear();
        self.term += 1;
        self.leader = Some(leader);
        self.ready = false;
        self.noop_at = now + commit_delay;
        self.unhealthy = None;
        let voters = self
            .voters
            .iter()
            .copied()
            .filter(|&v| alive.contains(&v) && net.connected(leader, v))
            .collect();
        out.push(RaftEvent::Elected {
            leader,
            term: self.term,
            voters,
            kept: keep,
            dropped,
        });
        if keep > 0 {
            out.push(RaftEvent::Committed);
        }
        out
    }
}
