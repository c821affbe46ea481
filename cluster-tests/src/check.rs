//! The invariant checker that runs through every scenario.
//!
//! - The client thread (inside the client namespace) sends a request to
//!   every vserver IP every 20 ms and records which node answered (the
//!   identity the demo service returns, else the MAC the client's ARP
//!   cache holds) and the counter; an IP answered by X, then Y, then X
//!   again within a second means two live copies: a violation.
//! - One thread per node namespace reads the node's local addresses every
//!   20 ms: two nodes whose cables are plugged holding one vserver IP for
//!   longer than the sampling jitter is a violation (both answer ARP).
//! - One thread samples every node's cgroup of every vserver every 20 ms:
//!   processes of one vserver on two nodes at once is a violation.
//!
//! Unavailability windows (no answer on an IP) are recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::net::node_of_mac;

/// One probe of one IP from the client.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Milliseconds since the checker started.
    pub ms: u64,
    pub ip: String,
    /// Who answered (None: no answer).
    pub node: Option<u64>,
    pub counter: Option<u64>,
}

/// What the harness tells the checker: the vservers (name, IP) to watch,
/// the nodes whose cable is out.
#[derive(Default)]
pub struct Shared {
    pub watched: Vec<(String, String)>,
    pub unplugged: BTreeSet<u64>,
}

struct Inner {
    samples: Vec<Sample>,
    violations: Vec<String>,
    /// (ip, node) -> since when the node holds the ip (ms).
    holds: BTreeMap<(String, u64), u64>,
}

pub struct Checker {
    t0: Instant,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    inner: Arc<Mutex<Inner>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Tolerated overlap of two nodes holding one IP (sampling jitter).
const HOLD_JITTER_MS: u64 = 150;

fn enter(ns_path: &str) -> bool {
    match std::fs::File::open(ns_path) {
        Ok(f) => nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).is_ok(),
        Err(_) => false,
    }
}

/// Local IPv4 addresses of the calling thread's network namespace.
fn local_addrs() -> BTreeSet<String> {
    let text = std::fs::read_to_string("/proc/thread-self/net/fib_trie").unwrap_or_default();
    let mut last = "";
    let mut out = BTreeSet::new();
    for l in text.lines() {
        let t = l.trim_start();
        if let Some(rest) = t.strip_prefix("|-- ") {
            last = rest.trim();
        } else if t.contains("/32 host LOCAL") {
            out.insert(last.to_string());
        }
    }
    out
}

/// The MAC the calling thread's namespace has for `ip`.
fn arp_mac(ip: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/thread-self/net/arp").ok()?;
    text.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&ip) && f.get(2) != Some(&"0x0"))
        .and_then(|f| f.get(3).map(|s| s.to_string()))
}

/// One request to the demo service: (node, counter).
pub fn request(ip: &str) -> Option<(Option<u64>, Option<u64>)> {
    let addr: SocketAddr = format!("{ip}:80").parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(150)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
    s.set_write_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET /cgi-bin/c HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    if !body.starts_with("HTTP/1.") || !body.contains(" 200 ") {
        return None;
    }
    let field = |k: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("node="), field("counter=")))
}

impl Checker {
    pub fn start(
        client_ns: String,
        node_ns: Vec<String>,
        cgroups: Vec<PathBuf>,
        shared: Arc<Mutex<Shared>>,
    ) -> Checker {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Mutex::new(Inner {
            samples: Vec::new(),
            violations: Vec::new(),
            holds: BTreeMap::new(),
        }));
        let mut threads = Vec::new();
        let tick = Duration::from_millis(20);

        // The client.
        {
            let (stop, shared, inner) = (stop.clone(), shared.clone(), inner.clone());
            threads.push(std::thread::spawn(move || {
                if !enter(&client_ns) {
                    return;
                }
                // ip -> runs of (node, first ms, last ms)
                let mut runs: BTreeMap<String, Vec<(u64, u64, u64)>> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let ips: Vec<String> = shared
                        .lock()
                        .map(|s| s.watched.iter().map(|w| w.1.clone()).collect())
                        .unwrap_or_default();
                    for ip in ips {
                        let got = request(&ip);
                        let ms = t0.elapsed().as_millis() as u64;
                        let (node, counter) = match got {
                            Some((n, c)) => (
                                n.or_else(|| arp_mac(&ip).as_deref().and_then(node_of_mac)),
                                c,
                            ),
                            None => (None, None),
                        };
                        let Ok(mut g) = inner.lock() else { return };
                        if let Some(n) = node {
                            let r = runs.entry(ip.clone()).or_default();
                            match r.last_mut() {
                                Some(last) if last.0 == n => last.2 = ms,
                                _ => {
                                    if r.len() >= 2 {
                                        let prev = r[r.len() - 2];
                                        let cur = r[r.len() - 1];
                                        if prev.0 == n && ms.saturating_sub(prev.2) < 1000 {
                                            g.violations.push(format!(
                                                "{ip} answered by node {n} at {} ms, node {} at {}..{} ms, node {n} again at {ms} ms",
                                                prev.2, cur.0, cur.1, cur.2
                                            ));
                                        }
                                    }
                                    r.push((n, ms, ms));
                                }
                            }
                        }
                        g.samples.push(Sample {
                            ms,
                            ip,
                            node,
                            counter,
                        });
                    }
                    std::thread::sleep(tick);
                }
            }));
        }

        // The nodes' addresses.
        for (i, ns) in node_ns.into_iter().enumerate() {
            let id = i as u64 + 1;
            let (stop, shared, inner) = (stop.clone(), shared.clone(), inner.clone());
            threads.push(std::thread::spawn(move || {
                if !enter(&ns) {
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    let local = local_addrs();
                    let ms = t0.elapsed().as_millis() as u64;
                    let (ips, unplugged) = match shared.lock() {
                        Ok(s) => (
                            s.watched.iter().map(|w| w.1.clone()).collect::<Vec<_>>(),
                            s.unplugged.clone(),
                        ),
                        Err(_) => return,
                    };
                    let Ok(mut g) = inner.lock() else { return };
                    for ip in ips {
                        let key = (ip.clone(), id);
                        if local.contains(&ip) && !unplugged.contains(&id) {
                            let since = *g.holds.entry(key).or_insert(ms);
                            let others: Vec<(u64, u64)> = g
                                .holds
                                .iter()
                                .filter(|((i2, n2), _)| *i2 == ip && *n2 != id)
                                .filter(|((_, n2), _)| !unplugged.contains(n2))
                                .map(|((_, n2), s2)| (*n2, *s2))
                                .collect();
                            for (other, s2) in others {
                                let overlap = ms.saturating_sub(since.max(s2));
                                if overlap > HOLD_JITTER_MS {
                                    g.violations.push(format!(
                                        "{ip} held by node {id} and node {other} at once for {overlap} ms (at {ms} ms)"
                                    ));
                                }
                            }
                        } else {
                            g.holds.remove(&key);
                        }
                    }
                    drop(g);
                    std::thread::sleep(tick);
                }
            }));
        }

        // The cgroups.
        {
            let (stop, shared, inner) = (stop.clone(), shared.clone(), inner.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let names: Vec<String> = shared
                        .lock()
                        .map(|s| s.watched.iter().map(|w| w.0.clone()).collect())
                        .unwrap_or_default();
                    for name in names {
                        let running: Vec<usize> = cgroups
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| crate::populated(&c.join(&name)))
                            .map(|(i, _)| i + 1)
                            .collect();
                        if running.len() > 1 {
                            let ms = t0.elapsed().as_millis() as u64;
                            if let Ok(mut g) = inner.lock() {
                                g.violations.push(format!(
                                    "{name} ran on nodes {running:?} at once (at {ms} ms)"
                                ));
                            }
                        }
                    }
                    std::thread::sleep(tick);
                }
            }));
        }
        Checker {
            t0,
            stop,
            shared,
            inner,
            threads,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    pub fn violations(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|g| g.violations.clone())
            .unwrap_or_default()
    }

    /// Panics if the invariant was ever broken.
    pub fn check(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "split brain ({} violations): {}",
            v.len(),
            v.iter().take(10).cloned().collect::<Vec<_>>().join("; ")
        );
    }

    /// A position in the sample log.
    pub fn mark(&self) -> usize {
        self.inner.lock().map(|g| g.samples.len()).unwrap_or(0)
    }

    /// The answered samples of `ip` after `mark`.
    pub fn answers(&self, ip: &str, mark: usize) -> Vec<Sample> {
        self.inner
            .lock()
            .map(|g| {
                g.samples[mark.min(g.samples.len())..]
                    .iter()
                    .filter(|s| s.ip == ip && s.node.is_some())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last answer on `ip` before now.
    pub fn last_answer(&self, ip: &str) -> Option<Sample> {
        self.answers(ip, 0).pop()
    }

    /// Waits (generously) for an answer on `ip` after `mark` that `f`
    /// likes.
    pub fn try_wait_answer(
        &self,
        ip: &str,
        mark: usize,
        mut f: impl FnMut(&Sample) -> bool,
    ) -> Option<Sample> {
        let deadline = Instant::now() + crate::PATIENCE;
        while Instant::now() < deadline {
            if let Some(s) = self.answers(ip, mark).into_iter().find(|s| f(s)) {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Windows (start ms, end ms) without an answer on `ip`; an open
    /// window ends now.
    pub fn windows(&self, ip: &str) -> Vec<(u64, u64)> {
        let Ok(g) = self.inner.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut down: Option<u64> = None;
        let mut seen_up = false;
        for s in g.samples.iter().filter(|s| s.ip == ip) {
            match (s.node.is_some(), down) {
                (true, Some(d)) => {
                    out.push((d, s.ms));
                    down = None;
                    seen_up = true;
                }
                (true, None) => seen_up = true,
                (false, None) if seen_up => down = Some(s.ms),
                _ => {}
            }
        }
        if let Some(d) = down {
            out.push((d, self.now_ms()));
        }
        out
    }

    /// One line per watched IP: answers, failures, unavailability windows.
    pub fn report(&self) -> String {
        let ips: Vec<(String, String)> = self
            .shared
            .lock()
            .map(|s| s.watched.clone())
            .unwrap_or_default();
        let mut s = String::new();
        for (name, ip) in ips {
            let w = self.windows(&ip);
            let longest = w.iter().map(|(a, b)| b - a).max().unwrap_or(0);
            let (ok, all) = self
                .inner
                .lock()
                .map(|g| {
                    let v: Vec<&Sample> = g.samples.iter().filter(|x| x.ip == ip).collect();
                    (v.iter().filter(|x| x.node.is_some()).count(), v.len())
                })
                .unwrap_or((0, 0));
            s.push_str(&format!(
                "{name} {ip}: {ok}/{all} probes answered, {} unavailability windows (longest {longest} ms): {:?}\n",
                w.len(),
                w.iter().take(20).collect::<Vec<_>>()
            ));
        }
        s
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
