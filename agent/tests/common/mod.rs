//! Shared by the in-process raft tests.

#![allow(dead_code)]

use vsha_agent::raft_node::RaftCore;

type Job = Box<dyn FnOnce(&mut Option<RaftCore>) + Send>;

/// Each node's core lives on a thread of its own: raft-engine caches the
/// last read block per thread, not per engine, so two engines must never
/// share a thread. The main thread runs one job at a time on one node and
/// waits for it, so the simulation stays deterministic.
pub struct NodeHost {
    tx: std::sync::mpsc::Sender<Job>,
}

impl NodeHost {
    pub fn new(core: impl FnOnce() -> RaftCore + Send + 'static) -> NodeHost {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut slot = Some(core());
            while let Ok(job) = rx.recv() {
                job(&mut slot);
            }
        });
        NodeHost { tx }
    }

    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Option<RaftCore>) -> R + Send + 'static,
    ) -> R {
        let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(Box::new(move |slot| {
                let _ = rtx.send(f(slot));
            }))
            .expect("node thread alive");
        rrx.recv().expect("node thread answered")
    }

    pub fn up(&self) -> bool {
        self.run(|c| c.is_some())
    }
}
