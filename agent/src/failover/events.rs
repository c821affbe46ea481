//! The event log: what happened to nodes and vservers, kept in a ring on
//! each agent (the leader's holds the cluster's: nodes forward theirs with
//! their heartbeats) and streamed to `vsha events --follow`. An optional
//! notify command runs on each event the leader records, as keepalived's
//! notify scripts do.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;
use vsha_proto::v1 as pb;

use super::clock::unix_ms;

const RING: usize = 1000;

pub struct EventLog {
    ring: Mutex<(VecDeque<pb::Event>, u64)>,
    tx: broadcast::Sender<pb::Event>,
    notify: Vec<String>,
}

impl EventLog {
    /// `notify`: a command (argv) run for each event with VSHA_EVENT_*
    /// variables in its environment; empty = none.
    pub fn new(notify: Vec<String>) -> Self {
        let (tx, _) = broadcast::channel(RING);
        EventLog {
            ring: Mutex::new((VecDeque::new(), 0)),
            tx,
            notify,
        }
    }

    /// A new event, stamped now.
    pub fn event(kind: &str, vserver: &str, node: u64, message: impl Into<String>) -> pb::Event {
        pb::Event {
            unix_ms: unix_ms(),
            kind: kind.to_string(),
            vserver: vserver.to_string(),
            node,
            message: message.into(),
            phases: vec![],
            seq: 0,
        }
    }

    pub fn record(&self, mut ev: pb::Event) {
        {
            let mut g = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            g.1 += 1;
            ev.seq = g.1;
            if g.0.len() == RING {
                g.0.pop_front();
            }
            g.0.push_back(ev.clone());
        }
        tracing::info!(kind = %ev.kind, vserver = %ev.vserver, node = ev.node, message = %ev.message, "event");
        self.run_notify(&ev);
        let _ = self.tx.send(ev);
    }

    pub fn recent(&self) -> Vec<pb::Event> {
        let g = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        g.0.iter().cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.tx.subscribe()
    }

    fn run_notify(&self, ev: &pb::Event) {
        let Some((prog, args)) = self.notify.split_first() else {
            return;
        };
        let phases: Vec<String> = ev
            .phases
            .iter()
            .map(|p| format!("{}={}", p.name, p.ms))
            .collect();
        let spawned = std::process::Command::new(prog)
            .args(args)
            .env("VSHA_EVENT_KIND", &ev.kind)
            .env("VSHA_EVENT_VSERVER", &ev.vserver)
            .env("VSHA_EVENT_NODE", ev.node.to_string())
            .env("VSHA_EVENT_MESSAGE", &ev.message)
            .env("VSHA_EVENT_UNIX_MS", ev.unix_ms.to_string())
            .env("VSHA_EVENT_PHASES", phases.join(" "))
            .stdin(std::process::Stdio::null())
            .spawn();
        match spawned {
            // Reaped by a thread so no zombie stays behind.
            Ok(mut child) => {
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
            }
            Err(e) => tracing::warn!(command = %prog, error = %e, "notify command failed to start"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_order_and_numbers_events() {
        let log = EventLog::new(vec![]);
        let mut rx = log.subscribe();
        log.record(EventLog::event("fenced", "web", 1, "lease lost"));
        log.record(EventLog::event("started", "web", 2, "gen 2"));
        let r = log.recent();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].seq, r[1].seq), (1, 2));
        assert_eq!(rx.try_recv().unwrap().kind, "fenced");
    }

    #[test]
    fn notify_command_sees_the_event() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let log = EventLog::new(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "echo \"$VSHA_EVENT_KIND $VSHA_EVENT_VSERVER\" > {}",
                out.display()
            ),
        ]);
        log.record(EventLog::event("failover", "web", 2, "done"));
        for _ in 0..200 {
            if std::fs::read_to_string(&out).is_ok_and(|s| s.contains('\n')) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "failover web\n");
    }
}
