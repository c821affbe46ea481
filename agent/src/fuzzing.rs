//! What the fuzz targets in fuzz/ check, kept here so the same properties
//! also run on stable in `agent/tests/fuzz_replay.rs` (over the corpus and
//! seeded mutations). Each function takes untrusted bytes and panics only
//! when a property is broken: never on bad input.

use prost::Message;
use vsha_proto::v1 as pb;

use crate::api::convert;
use crate::command::{Command, Envelope};
use crate::config::{parse_initial_cluster, AgentConfig, FileConfig, Overrides};
use crate::model::{AdminState, Failback, FailoverGroup, NodeRecord, Role, VserverSpec};
use crate::state::ClusterState;
use crate::validate;

/// A configuration file: parsed and validated, or refused with a field.
pub fn config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        let _ = AgentConfig::from_parts(file, Overrides::default());
    }
    let _ = parse_initial_cluster(text, 1, "127.0.0.1:7700");
}

/// A Cluster API request as it arrives on the wire (first byte picks the
/// kind): decoded, validated as the API does, then applied to a populated
/// state. An accepted request round-trips; a refused one changes nothing.
pub fn cluster_request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let cmd = match kind % 3 {
        0 => {
            let Ok(req) = pb::AddVserverRequest::decode(body) else {
                return;
            };
            let Ok(spec) = convert::spec_from_pb(req.spec) else {
                return;
            };
            let again = convert::spec_from_pb(Some(convert::spec_to_pb(&spec)))
                .expect("a validated spec must validate again after a round trip");
            assert_eq!(again, spec, "spec changed in a round trip");
            Command::AddVserver(spec)
        }
        1 => {
            let Ok(req) = pb::SetPairRequest::decode(body) else {
                return;
            };
            let Ok(vserver) = validate::vserver_name(&req.vserver) else {
                return;
            };
            let Ok(group) = convert::group_from_pb(req.group) else {
                return;
            };
            Command::SetPair { vserver, group }
        }
        _ => {
            let Ok(req) = pb::AddNodeRequest::decode(body) else {
                return;
            };
            let (Ok(id), Ok(addr), Ok(role)) = (
                validate::node_id(req.id),
                validate::addr("addr", &req.addr),
                convert::role_from_pb(req.role),
            ) else {
                return;
            };
            Command::AddNode(NodeRecord {
                id,
                addr,
                role,
                iface: req.iface,
                admin: AdminState::Active,
            })
        }
    };
    apply_checked(&cmd);
}

/// A raft log entry (what a peer proposes or replicates): decoded, then
/// applied to a populated state; a refused command changes nothing.
pub fn log_entry(data: &[u8]) {
    if let Ok(env) = Envelope::decode(data) {
        apply_checked(&env.cmd);
    }
}

fn apply_checked(cmd: &Command) {
    let mut state = populated_state();
    let before = state.clone();
    let checked = state.check(cmd);
    match state.apply(cmd) {
        Ok(()) => assert!(
            checked.is_ok(),
            "apply accepted what check refused: {cmd:?}"
        ),
        Err(e) => {
            assert_eq!(
                state, before,
                "refused command changed the state: {cmd:?}: {e}"
            );
            assert!(
                checked.is_err(),
                "check accepted what apply refused: {cmd:?}"
            );
        }
    }
}

fn web_spec() -> VserverSpec {
    convert::spec_from_pb(Some(pb::VserverSpec {
        name: "web".into(),
        ip: "10.1.0.5".into(),
        prefix: 24,
        ..Default::default()
    }))
    .expect("fixture spec is valid")
}

/// Three nodes (the third a witness) and a paired vserver.
fn populated_state() -> ClusterState {
    let mut s = ClusterState::default();
    let node = |id: u64, role: Role| NodeRecord {
        id,
        addr: format!("10.0.0.{id}:7700"),
        role,
        iface: String::new(),
        admin: AdminState::Active,
    };
    let setup = [
        Command::Bootstrap {
            cluster_id: "fuzz".into(),
            members: vec![
                node(1, Role::Voter),
                node(2, Role::Voter),
                node(3, Role::Witness),
            ],
        },
        Command::AddVserver(web_spec()),
        Command::SetPair {
            vserver: "web".into(),
            group: FailoverGroup {
                nodes: vec![1, 2],
                failback: Failback::Never,
                failback_stable_ms: 0,
            },
        },
    ];
    for c in &setup {
        s.apply(c).expect("fixture applies");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_and_seeds_run() {
        populated_state();
        let spec = pb::AddVserverRequest {
            spec: Some(pb::VserverSpec {
                name: "db".into(),
                ip: "10.1.0.6".into(),
                prefix: 24,
                ..Default::default()
            }),
        };
        let mut bytes = vec![0u8];
        bytes.extend(spec.encode_to_vec());
        cluster_request(&bytes);
        log_entry(&Envelope::new(None, Command::RemoveVserver { name: "web".into() }).encode());
        config_text(b"node_id = 1\n");
    }
}
