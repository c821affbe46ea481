//! Failover operations: forced failover, planned migration, drain and
//! maintenance, the event stream and the what-if simulation.

use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Subcommand, ValueEnum};
use tonic::transport::Channel;
use vsha_proto::v1 as pb;
use vsha_proto::v1::cluster_client::ClusterClient;

use crate::output;

#[derive(Subcommand, Debug)]
pub enum SimulateCmd {
    /// What would happen if NODE died now.
    NodeDown {
        node: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

type Client = ClusterClient<Channel>;
type Explain<'a> = &'a dyn Fn(tonic::Status) -> anyhow::Error;

/// Opens the event stream (before an order, so its events are not missed).
async fn follow(c: &mut Client, e: Explain<'_>) -> anyhow::Result<tonic::Streaming<pb::Event>> {
    Ok(c.events(pb::EventsRequest { follow: true })
        .await
        .map_err(e)?
        .into_inner())
}

/// Prints the events about `vserver` until one of `until` (or an alert)
/// arrives; returns that event.
async fn watch(
    stream: &mut tonic::Streaming<pb::Event>,
    vserver: &str,
    after_seq: u64,
    until: &[&str],
    timeout: Duration,
) -> anyhow::Result<(pb::Event, Vec<pb::Event>)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message())
            .await
            .map_err(|_| {
                anyhow!(
                    "no outcome within {} s; see `vsha status` and `vsha events`",
                    timeout.as_secs()
                )
            })?
            .map_err(|s| anyhow!("event stream broke: {}", s.message()))?
            .ok_or_else(|| {
                anyhow!(
                    "the leader closed the event stream (leadership changed?); see `vsha events`"
                )
            })?;
        if next.seq <= after_seq || next.vserver != vserver {
            continue;
        }
        println!("{}", output::event_human(&next));
        if until.contains(&next.kind.as_str()) || next.kind == "alert" {
            return Ok((next, seen));
        }
        seen.push(next);
    }
}

fn last_seq(events: &[pb::Event]) -> u64 {
    events.iter().map(|e| e.seq).max().unwrap_or(0)
}

async fn recent(c: &mut Client, e: Explain<'_>) -> anyhow::Result<Vec<pb::Event>> {
    let mut s = c
        .events(pb::EventsRequest { follow: false })
        .await
        .map_err(e)?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = s.message().await.map_err(e)? {
        out.push(ev);
    }
    Ok(out)
}

pub async fn migrate(
    c: &mut Client,
    e: Explain<'_>,
    name: &str,
    to: u64,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let after = last_seq(&recent(c, e).await?);
    let mut stream = follow(c, e).await?;
    c.migrate(pb::MigrateRequest {
        name: name.to_string(),
        to,
    })
    .await
    .map_err(e)?;
    println!("migrating {name} to node {to}: pre-copy, stop, final delta, start");
    let (end, seen) = watch(&mut stream, name, after, &["move_done"], timeout).await?;
    if end.kind == "alert" {
        bail!("migration of {name} did not happen: {}", end.message);
    }
    let stopped = seen
        .iter()
        .find(|ev| ev.kind == "stopped")
        .map(|ev| ev.unix_ms);
    let started = seen
        .iter()
        .chain(std::iter::once(&end))
        .find(|ev| ev.kind == "started" && ev.node == to)
        .map(|ev| ev.unix_ms);
    match (stopped, started) {
        (Some(a), Some(b)) => println!(
            "{name} migrated to node {to}; downtime {} ms (stop on the old node to start on the new one, by the nodes' clocks)",
            b.saturating_sub(a)
        ),
        _ => println!("{name} migrated to node {to}"),
    }
    Ok(0)
}

pub async fn failover(
    c: &mut Client,
    e: Explain<'_>,
    name: &str,
    to: u64,
    accept_data_loss: bool,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let after = last_seq(&recent(c, e).await?);
    let mut stream = follow(c, e).await?;
    c.failover(pb::FailoverRequest {
        name: name.to_string(),
        to,
        accept_data_loss,
    })
    .await
    .map_err(e)?;
    let (end, _) = watch(&mut stream, name, after, &["failover_done"], timeout).await?;
    if end.kind == "alert" {
        bail!("failover of {name} refused: {}", end.message);
    }
    Ok(0)
}

pub async fn events(
    c: &mut Client,
    e: Explain<'_>,
    follow_: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let mut s = c
        .events(pb::EventsRequest { follow: follow_ })
        .await
        .map_err(e)?
        .into_inner();
    while let Some(ev) = s.message().await.map_err(e)? {
        if json {
            println!("{}", serde_json::to_string(&output::event_json(&ev))?);
        } else {
            println!("{}", output::event_human(&ev));
        }
    }
    Ok(0)
}

pub async fn simulate(c: &mut Client, e: Explain<'_>, cmd: SimulateCmd) -> anyhow::Result<i32> {
    let SimulateCmd::NodeDown { node, json } = cmd;
    let r = c
        .simulate(pb::SimulateRequest { node_down: node })
        .await
        .map_err(e)?
        .into_inner();
    if json {
        let moves: Vec<serde_json::Value> = r
            .moves
            .iter()
            .map(|m| {
                serde_json::json!({
                    "vserver": m.vserver,
                    "from": m.from,
                    "to": (m.to != 0).then_some(m.to),
                    "refusal": m.refusal,
                    "data_loss_ms": m.replica_known.then_some(m.data_loss_ms),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"moves": moves, "notes": r.notes}))?
        );
        return Ok(0);
    }
    if r.moves.is_empty() {
        println!("node {node} runs no vservers: nothing would move");
    }
    for m in &r.moves {
        if m.to == 0 {
            println!("{}: stays down: {}", m.vserver, m.refusal);
        } else if m.replica_known {
            println!(
                "{}: node {} -> node {}, losing the last {:.1} s of writes (replica age)",
                m.vserver,
                m.from,
                m.to,
                m.data_loss_ms as f64 / 1000.0
            );
        } else {
            println!(
                "{}: node {} -> node {} (replica age unknown)",
                m.vserver, m.from, m.to
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    Ok(0)
}

pub async fn set_desired(
    c: &mut Client,
    e: Explain<'_>,
    name: &str,
    run: bool,
) -> anyhow::Result<i32> {
    let req = pb::VserverActionRequest {
        name: name.to_string(),
    };
    if run {
        c.start_vserver(req).await.map_err(e)?;
        println!("{name} will run (the leader places and starts it)");
    } else {
        c.stop_vserver(req).await.map_err(e)?;
        println!("{name} will stay stopped");
    }
    Ok(0)
}
