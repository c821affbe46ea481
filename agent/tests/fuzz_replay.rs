//! The fuzz targets' properties (vsha_agent::fuzzing, run by libFuzzer from
//! fuzz/ on demand) on stable, in every test run: over seeds, the committed
//! seeds in fuzz/seeds/TARGET/, and seeded random mutations of them.
//! `VSHA_FUZZ_ITERS` sets the mutations per target (default 20000).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use prost::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};
use vsha_agent::command::{Command, Envelope};
use vsha_agent::fuzzing;
use vsha_proto::v1 as pb;

fn corpus(target: &str, mut seeds: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                seeds.push(b);
            }
        }
    }
    seeds
}

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..6) {
        let len = b.len();
        match rng.gen_range(0..6) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                b[i] = rng.gen();
            }
            2 => {
                let i = rng.gen_range(0..=len);
                b.insert(i, rng.gen());
            }
            3 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(16));
                b.drain(i..i + n);
            }
            4 => {
                // Splice a piece of another seed in: keeps structure.
                let other = &seeds[rng.gen_range(0..seeds.len())];
                if !other.is_empty() {
                    let a = rng.gen_range(0..other.len());
                    let z = rng.gen_range(a..=other.len());
                    let i = rng.gen_range(0..=len);
                    b.splice(i..i, other[a..z].iter().copied());
                }
            }
            _ => {
                // Interesting values where lengths and numbers live.
                if len > 0 {
                    let i = rng.gen_range(0..len);
                    b[i] = [0u8, 0x7f, 0x80, 0xff, b'"', b'\\', b'\n'][rng.gen_range(0..7)];
                }
            }
        }
    }
    b
}

fn run(target: &str, seeds: Vec<Vec<u8>>, f: fn(&[u8])) {
    let seeds = corpus(target, seeds);
    let iters: usize = std::env::var("VSHA_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let mut rng = StdRng::seed_from_u64(0x76_73_68_61);
    let inputs = seeds
        .iter()
        .cloned()
        .chain((0..iters).map(|_| mutate(&mut rng, &seeds)));
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for input in inputs {
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            failure = Some(input);
            break;
        }
    }
    std::panic::set_hook(quiet);
    if let Some(input) = failure {
        // Run it again with the normal hook so the message is shown.
        eprintln!("{target}: failing input (hex): {}", hex(&input));
        f(&input);
        panic!("{target}: input failed once but not twice");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn config_text_never_panics() {
    let seeds = vec![
        include_bytes!("../../packaging/vshad.toml").to_vec(),
        b"node_id = 2\nlisten = \"0.0.0.0:7700\"\nadvertise = \"192.0.2.12:7700\"\n\
          initial_cluster = \"1=192.0.2.11:7700,2=192.0.2.12:7700,3=192.0.2.13:7700/witness\"\n\
          profile = \"fast\"\nlease_ms = 800\nnotify_command = [\"/bin/x\", \"-y\"]\n\
          tls_ca = \"/a\"\nmetrics_listen = \"127.0.0.1:9700\"\n"
            .to_vec(),
        b"1=127.0.0.1:7700,2=10.0.0.2:7700/witness".to_vec(),
    ];
    run("config", seeds, fuzzing::config_text);
}

#[test]
fn cluster_requests_are_validated_and_refusals_change_nothing() {
    let spec = pb::VserverSpec {
        name: "db".into(),
        ip: "10.1.0.6".into(),
        prefix: 24,
        dev: "eth0".into(),
        start_command: vec!["/sbin/init".into()],
        max_rpo_ms: 30_000,
        ..Default::default()
    };
    let mut seeds = vec![];
    let mut add = vec![0u8];
    add.extend(pb::AddVserverRequest { spec: Some(spec) }.encode_to_vec());
    seeds.push(add);
    let mut pair = vec![1u8];
    pair.extend(
        pb::SetPairRequest {
            vserver: "web".into(),
            group: Some(pb::FailoverGroup {
                nodes: vec![2, 1],
                ..Default::default()
            }),
        }
        .encode_to_vec(),
    );
    seeds.push(pair);
    let mut node = vec![2u8];
    node.extend(
        pb::AddNodeRequest {
            id: 4,
            addr: "10.0.0.4:7700".into(),
            role: pb::NodeRole::Voter as i32,
            iface: "eth0".into(),
        }
        .encode_to_vec(),
    );
    seeds.push(node);
    run("cluster_request", seeds, fuzzing::cluster_request);
}

#[test]
fn log_entries_are_decoded_and_refusals_change_nothing() {
    let cmds = [
        Command::RemoveVserver { name: "web".into() },
        Command::SetPlacement {
            vserver: "web".into(),
            node: 2,
            generation: 1,
            expect_generation: 0,
            reason: "failover".into(),
        },
        Command::RecordReplica {
            vserver: "web".into(),
            node: 2,
            snapshot_source_unix_ms: 1,
            digest: "ab".into(),
        },
        Command::RemovePair {
            vserver: "web".into(),
        },
        Command::PromoteNode { id: 3 },
        Command::RemoveNode { id: 2 },
    ];
    let seeds = cmds
        .into_iter()
        .map(|c| Envelope::new(None, c).encode())
        .collect();
    run("log_entry", seeds, fuzzing::log_entry);
}
