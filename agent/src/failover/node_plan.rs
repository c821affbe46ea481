//! What a node does with its vservers, decided purely from its lease, the
//! replicated state it has applied, what it runs, and the orders the leader
//! sent it. The node runtime executes the plan; the failover simulation
//! drives the same function.
//!
//! Rules, in order:
//! 1. Without a valid lease nothing runs: every local copy is stopped at
//!    once (self-fencing), nothing starts, and pending orders are dropped.
//! 2. A local copy the applied state does not place here at its generation
//!    (moved away, removed, desired stopped) is stopped. A copy placed here
//!    at a *higher* generation is adopted (the leader re-placed it on this
//!    node: the compare-and-set made the old generation dead everywhere).
//! 3. Of several orders for one vserver, the newest counts. Orders act
//!    only at the current generation: `Start` and `Restart`
//!    need the state to place the vserver here at exactly that generation;
//!    an order for a generation the node has not applied yet waits (up to
//!    the order's time to live), an older one is dropped.

use std::collections::BTreeMap;

use crate::model::{Desired, NodeId};
use crate::state::ClusterState;

use super::lease::NodeLease;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderAction {
    Start,
    Stop,
    Restart,
}

impl OrderAction {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderAction::Start => "start",
            OrderAction::Stop => "stop",
            OrderAction::Restart => "restart",
        }
    }
}

/// An order from the leader's controller, tagged with the generation it is
/// valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub action: OrderAction,
    pub vserver: String,
    pub generation: u64,
    /// When this node received it (monotonic ms): orders wait for the
    /// applied state to catch up only so long.
    pub received_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalState {
    Running,
    Stopped,
    Failed { reason: String },
}

/// One vserver as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVserver {
    /// The generation it runs (or last ran) at.
    pub generation: u64,
    pub state: LocalState,
    /// In-place restarts done at this generation.
    pub restarts: u32,
}

impl LocalVserver {
    /// Processes may exist (a failed health check leaves them running).
    pub fn may_have_processes(&self) -> bool {
        !matches!(self.state, LocalState::Stopped)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// The lease is (about to be) gone: kill at once, no grace period.
    SelfFence,
    /// The state does not place it here at this generation.
    NotPlacedHere,
    /// The operator wants it stopped.
    NotDesired,
    /// The leader ordered it (a planned move).
    Ordered,
}

impl StopWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            StopWhy::SelfFence => "self-fence: lease not renewed",
            StopWhy::NotPlacedHere => "not placed on this node at this generation",
            StopWhy::NotDesired => "desired stopped",
            StopWhy::Ordered => "ordered by the leader",
        }
    }

    /// Kill without the stop command's grace period.
    pub fn is_hard(self) -> bool {
        matches!(self, StopWhy::SelfFence | StopWhy::NotPlacedHere)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start { vserver: String, generation: u64 },
    Restart { vserver: String, generation: u64 },
    Stop { vserver: String, why: StopWhy },
    Adopt { vserver: String, generation: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Orders still waiting for the applied state to reach their generation.
    pub waiting: Vec<Order>,
}

/// The node's plan. See the module documentation for the rules.
pub fn plan(
    me: NodeId,
    now_ms: u64,
    lease: &NodeLease,
    state: &ClusterState,
    local: &BTreeMap<String, LocalVserver>,
    orders: Vec<Order>,
    order_ttl_ms: u64,
) -> Plan {
    let mut out = Plan::default();
    if !lease.may_run(now_ms) {
        for (name, lv) in local {
            if lv.may_have_processes() {
                out.actions.push(Action::Stop {
                    vserver: name.clone(),
                    why: StopWhy::SelfFence,
                });
            }
        }
        // Orders die with the lease they came under: while this node had
        // no lease the leader may have moved the vserver, and this node may
        // not have applied that yet. The leader orders again once the node
        // renews and reports what it runs.
        let _ = (orders, order_ttl_ms);
        return out;
    }
    let placed_here = |name: &str| -> Option<(u64, Desired)> {
        state
            .vservers
            .get(name)
            .and_then(|v| v.placement.as_ref())
            .filter(|p| p.node == me)
            .map(|p| (p.generation, p.desired))
    };
    let mut stopping = std::collections::BTreeSet::new();
    for (name, lv) in local {
        if !lv.may_have_processes() {
            continue;
        }
        match placed_here(name) {
            Some((g, _)) if g < lv.generation => {
                // Applied state behind what we run: a restart replaying an
                // old log. Wait for it to catch up; never stop a good copy.
            }
            Some((g, Desired::Running)) if g > lv.generation => out.actions.push(Action::Adopt {
                vserver: name.clone(),
                generation: g,
            }),
            Some((_, Desired::Running)) => {}
            Some((_, Desired::Stopped)) => {
                stopping.insert(name.clone());
                out.actions.push(Action::Stop {
                    vserver: name.clone(),
                    why: StopWhy::NotDesired,
                });
            }
            None => {
                stopping.insert(name.clone());
                out.actions.push(Action::Stop {
                    vserver: name.clone(),
                    why: StopWhy::NotPlacedHere,
                });
            }
        }
    }
    // The newest order per vserver wins: a Stop after a Start (or the
    // other way round) in one batch must not run both.
    let mut last: BTreeMap<String, Order> = BTreeMap::new();
    for o in orders {
        last.insert(o.vserver.clone(), o);
    }
    for o in last.into_values() {
        let here = placed_here(&o.vserver);
        let current = state
            .vservers
            .get(&o.vserver)
            .and_then(|v| v.placement.as_ref())
            .map_or(0, |p| p.generation);
        if o.generation > current {
            if now_ms.saturating_sub(o.received_ms) < order_ttl_ms {
                out.waiting.push(o);
            }
            continue;
        }
        if o.generation < current {
            continue;
        }
        let lv = local.get(&o.vserver);
        let runs = lv.is_some_and(|l| l.may_have_processes());
        match o.action {
            OrderAction::Start => {
                let wanted = here == Some((o.generation, Desired::Running));
                if wanted && !runs {
                    out.actions.push(Action::Start {
                        vserver: o.vserver,
                        generation: o.generation,
                    });
                }
            }
            OrderAction::Restart => {
                let wanted = here == Some((o.generation, Desired::Running));
                let at_gen = lv.is_some_and(|l| l.generation == o.generation);
                if wanted && at_gen && !stopping.contains(&o.vserver) {
                    out.actions.push(Action::Restart {
                        vserver: o.vserver,
                        generation: o.generation,
                    });
                }
            }
            OrderAction::Stop => {
                if runs && !stopping.contains(&o.vserver) {
                    stopping.insert(o.vserver.clone());
                    out.actions.push(Action::Stop {
                        vserver: o.vserver,
                        why: StopWhy::Ordered,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::model::{NodeRecord, Role, VserverSpec};

    fn state_with(placement: Option<(NodeId, u64)>) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Command::Bootstrap {
            cluster_id: "c".into(),
            members: (1..=2)
                .map(|id| NodeRecord {
                    id,
                    addr: format!("127.0.0.{id}:7700"),
                    role: Role::Voter,
                    iface: String::new(),
                    admin: Default::default(),
                })
                .collect(),
        })
        .unwrap();
        s.apply(&Command::AddVserver(VserverSpec {
            name: "web".into(),
            tree: String::new(),
            ip: "10.9.0.5".parse().unwrap(),
            prefix: 24,
            dev: String::new(),
            hostname: String::new(),
            capabilities: vec![],
            limits: Default::default(),
            start_command: vec![],
            stop_command: vec![],
            health: None,
            max_rpo_ms: 0,
        }))
        .unwrap();
        let mut g = 0;
        if let Some((node, generation)) = placement {
            while g < generation {
                s.apply(&Command::SetPlacement {
                    vserver: "web".into(),
                    node,
                    generation: g + 1,
                    expect_generation: g,
                    reason: "test".into(),
                })
                .unwrap();
                g += 1;
            }
        }
        s
    }

    fn leased() -> NodeLease {
        let mut l = NodeLease::new(1000, 100);
        l.renewed(0, 1000);
        l
    }

    fn running(generation: u64) -> BTreeMap<String, LocalVserver> {
        BTreeMap::from([(
            "web".to_string(),
            LocalVserver {
                generation,
                state: LocalState::Running,
                restarts: 0,
            },
        )])
    }

    fn order(action: OrderAction, generation: u64) -> Order {
        Order {
            action,
            vserver: "web".into(),
            generation,
            received_ms: 0,
        }
    }

    #[test]
    fn no_lease_kills_everything_and_starts_nothing() {
        let s = state_with(Some((1, 1)));
        let p = plan(
            1,
            950,
            &leased(),
            &s,
            &running(1),
            vec![order(OrderAction::Start, 1)],
            5000,
        );
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                vserver: "web".into(),
                why: StopWhy::SelfFence
            }]
        );
        assert!(p.waiting.is_empty(), "orders die with the lease");
    }

    #[test]
    fn start_only_at_the_current_generation_on_this_node() {
        let s = state_with(Some((1, 2)));
        let none = BTreeMap::new();
        let p = plan(
            1,
            10,
            &leased(),
            &s,
            &none,
            vec![order(OrderAction::Start, 2)],
            5000,
        );
        assert_eq!(
            p.actions,
            vec![Action::Start {
                vserver: "web".into(),
                generation: 2
            }]
        );
        // Old generation: dropped. Future generation: waits.
        let p = plan(
            1,
            10,
            &leased(),
            &s,
            &none,
            vec![order(OrderAction::Start, 1), order(OrderAction::Start, 3)],
            5000,
        );
        assert!(p.actions.is_empty());
        assert_eq!(p.waiting, vec![order(OrderAction::Start, 3)]);
        // Placed on another node: never started here.
        let p = plan(
            2,
            10,
            &leased(),
            &s,
            &none,
            vec![order(OrderAction::Start, 2)],
            5000,
        );
        assert!(p.actions.is_empty());
    }

    #[test]
    fn a_copy_moved_away_is_stopped_and_a_replaced_one_adopted() {
        let s = state_with(Some((2, 2)));
        let p = plan(1, 10, &leased(), &s, &running(1), vec![], 5000);
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                vserver: "web".into(),
                why: StopWhy::NotPlacedHere
            }]
        );
        let p = plan(2, 10, &leased(), &s, &running(1), vec![], 5000);
        assert_eq!(
            p.actions,
            vec![Action::Adopt {
                vserver: "web".into(),
                generation: 2
            }]
        );
    }

    #[test]
    fn stale_applied_state_never_stops_a_newer_copy() {
        let s = state_with(Some((1, 1)));
        let p = plan(1, 10, &leased(), &s, &running(3), vec![], 5000);
        assert!(p.actions.is_empty());
    }

    #[test]
    fn waiting_orders_expire() {
        let s = state_with(Some((1, 1)));
        let p = plan(
            1,
            6000,
            &{
                let mut l = NodeLease::new(10_000, 100);
                l.renewed(0, 10_000);
                l
            },
            &s,
            &BTreeMap::new(),
            vec![order(OrderAction::Start, 5)],
            5000,
        );
        assert!(p.waiting.is_empty());
    }

    #[test]
    fn restart_and_stop_orders() {
        let s = state_with(Some((1, 1)));
        let mut local = running(1);
        local.get_mut("web").unwrap().state = LocalState::Failed {
            reason: "init exited".into(),
        };
        let p = plan(
            1,
            10,
            &leased(),
            &s,
            &local,
            vec![order(OrderAction::Restart, 1)],
            5000,
        );
        assert_eq!(
            p.actions,
            vec![Action::Restart {
                vserver: "web".into(),
                generation: 1
            }]
        );
        let p = plan(
            1,
            10,
            &leased(),
            &s,
            &running(1),
            vec![order(OrderAction::Stop, 1)],
            5000,
        );
        assert_eq!(
            p.actions,
            vec![Action::Stop {
                vserver: "web".into(),
                why: StopWhy::Ordered
            }]
        );
    }

    #[test]
    fn a_stop_after_a_start_in_one_batch_wins() {
        let s = state_with(Some((1, 1)));
        let p = plan(
            1,
            10,
            &leased(),
            &s,
            &BTreeMap::new(),
            vec![order(OrderAction::Start, 1), order(OrderAction::Stop, 1)],
            5000,
        );
        assert!(p.actions.is_empty(), "{:?}", p.actions);
    }
}
