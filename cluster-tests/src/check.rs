//! The invariant checker that runs through every scenario.
//!
//! - The client thread (inside the client namespace) sends a request to
//!   every vserver IP every 20 ms and records which node answered (the
//!   identity the demo service returns) and the counter. Only a complete
//!   answer counts (status 200, `node=`, `counter=` and the closing `end`):
//!   a response cut short, by a copy being stopped mid-answer, is no
//!   answer. An IP answered by X, then Y, then X again within a second
//!   means two live copies: a violation.
//! - The ARP thread (also in the client namespace) asks who has every
//!   vserver IP every 20 ms and collects every reply within 15 ms, not only
//!   the first: each reply's MAC names the node whose `eth0` sent it. Two
//!   nodes replying to one probe, confirmed by a second probe at once, is
//!   a violation (see [`Checker::start`] for why a handover cannot look
//!   like one).
//! - One thread per node namespace reads the node's local addresses every
//!   20 ms: two nodes whose cables are plugged holding one vserver IP for
//!   longer than the sampling jitter is a violation (both answer ARP).
//! - One thread samples every node's cgroup of every vserver every 20 ms:
//!   processes of one vserver on two nodes at once is a violation.
//!
//! Unavailability windows (no answer on an IP) are recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::net::{node_of_mac, CLIENT_IP, CLIENT_IP2};

/// One request to one IP from the client.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Milliseconds since the checker started.
    pub ms: u64,
    pub ip: String,
    /// Who answered (None: no complete answer).
    pub node: Option<u64>,
    /// The counter of the answer (Some exactly when `node` is).
    pub counter: Option<u64>,
}

/// One ARP probe of one IP from the client: who replied.
#[derive(Clone, Debug)]
pub struct ArpSample {
    /// Milliseconds since the checker started (when the replies were in).
    pub ms: u64,
    pub ip: String,
    /// The nodes whose `eth0` replied.
    pub nodes: Vec<u64>,
    /// Replies from machines that are not nodes (the foreign machine).
    pub others: Vec<String>,
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
    arp: Vec<ArpSample>,
    /// Two nodes replied to one probe, but not to the probe right after.
    arp_unconfirmed: Vec<String>,
    arp_errors: Vec<String>,
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

/// How long an ARP probe collects replies.
const ARP_WAIT: Duration = Duration::from_millis(15);

/// Probes to confirm a double ARP reply with.
const ARP_CONFIRM: usize = 2;

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

/// One request to the demo service: (node, counter), from a complete
/// answer only (status 200, `node=N counter=K end`).
pub fn request(ip: &str) -> Option<(u64, u64)> {
    let addr: SocketAddr = format!("{ip}:80").parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(150)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
    s.set_write_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET /cgi-bin/c HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    parse_answer(&text)
}

/// (node, counter) of a complete answer of the demo service.
pub fn parse_answer(text: &str) -> Option<(u64, u64)> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    if !status.starts_with("HTTP/1.") || status.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    let words: Vec<&str> = body.split_whitespace().collect();
    if words.last() != Some(&"end") {
        return None;
    }
    let field = |k: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("node=")?, field("counter=")?))
}

/// The nodes, and the other machines (MACs), that replied to a probe.
type Replies = (Vec<u64>, Vec<String>);

/// One ARP probe of `ips` from the calling thread's `eth0`: for each IP
/// the nodes and the other machines that replied. Probes alternate their
/// sender address (`flip`), so a late reply to the previous probe never
/// counts for this one.
fn arp_round(ips: &[Ipv4Addr], flip: &mut bool) -> Result<Vec<Replies>, String> {
    *flip = !*flip;
    // Never 0.0.0.0: the agents' own takeover probes would take that for
    // a rival claim on the address and refuse to start.
    let sender: Ipv4Addr = if *flip { CLIENT_IP } else { CLIENT_IP2 }
        .parse()
        .map_err(|e| format!("{e}"))?;
    let got =
        vsha_kernel::net::arp_who_has("eth0", ips, sender, ARP_WAIT).map_err(|e| e.to_string())?;
    Ok(got
        .into_iter()
        .map(|macs| {
            let (mut nodes, mut others) = (Vec::new(), Vec::new());
            for m in macs {
                let m = m.to_string();
                match node_of_mac(&m) {
                    Some(n) if !nodes.contains(&n) => nodes.push(n),
                    Some(_) => {}
                    None => others.push(m),
                }
            }
            nodes.sort_unstable();
            (nodes, others)
        })
        .collect())
}

impl Checker {
    /// Starts the threads: the client's requests and ARP probes from
    /// `client_ns`, the addresses of each of `node_ns` (node 1, 2, ...),
    /// the vservers' cgroups under each of `cgroups`.
    ///
    /// Why a handover never looks like two nodes replying to one ARP
    /// probe: a node lets an IP go (a stop, a fence: the address is
    /// removed, so it replies no more) before the new holder takes it, and
    /// the new holder first ARP-probes the IP itself for at least 100 ms;
    /// one broadcast request reaches every node at once, so only a late
    /// reply could pair the old holder with the new one. Replies queued
    /// before a probe are discarded, a reply must carry the probe's sender
    /// address (alternating between the client's two addresses), and a double
    /// reply counts only when the next probe, right after, sees two nodes
    /// again (an unconfirmed one is listed in the report).
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
            arp: Vec::new(),
            arp_unconfirmed: Vec::new(),
            arp_errors: Vec::new(),
            violations: Vec::new(),
            holds: BTreeMap::new(),
        }));
        let mut threads = Vec::new();
        let tick = Duration::from_millis(20);
        let client_ns_arp = client_ns.clone();

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
                        let (node, counter) = got.map_or((None, None), |(n, c)| (Some(n), Some(c)));
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

        // The client's ARP probes.
        {
            let (stop, shared, inner) = (stop.clone(), shared.clone(), inner.clone());
            threads.push(std::thread::spawn(move || {
                if !enter(&client_ns_arp) {
                    return;
                }
                let mut flip = false;
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    let ips: Vec<(String, Ipv4Addr)> = shared
                        .lock()
                        .map(|s| {
                            s.watched
                                .iter()
                                .filter_map(|w| Some((w.1.clone(), w.1.parse().ok()?)))
                                .collect()
                        })
                        .unwrap_or_default();
                    if !ips.is_empty() {
                        let addrs: Vec<Ipv4Addr> = ips.iter().map(|i| i.1).collect();
                        let got = arp_round(&addrs, &mut flip);
                        let ms = t0.elapsed().as_millis() as u64;
                        let got = match got {
                            Ok(g) => g,
                            Err(e) => {
                                if let Ok(mut g) = inner.lock() {
                                    g.arp_errors.push(format!("at {ms} ms: {e}"));
                                }
                                std::thread::sleep(tick);
                                continue;
                            }
                        };
                        let mut doubles = Vec::new();
                        if let Ok(mut g) = inner.lock() {
                            for ((ip, addr), (nodes, others)) in ips.iter().zip(got) {
                                if nodes.len() > 1 {
                                    doubles.push((ip.clone(), *addr, nodes.clone()));
                                }
                                g.arp.push(ArpSample {
                                    ms,
                                    ip: ip.clone(),
                                    nodes,
                                    others,
                                });
                            }
                        }
                        for (ip, addr, first) in doubles {
                            let mut again = None;
                            for _ in 0..ARP_CONFIRM {
                                if let Ok(r) = arp_round(&[addr], &mut flip) {
                                    if r[0].0.len() > 1 {
                                        again = Some(r[0].0.clone());
                                        break;
                                    }
                                }
                            }
                            let at = t0.elapsed().as_millis() as u64;
                            let Ok(mut g) = inner.lock() else { return };
                            match again {
                                Some(n) => g.violations.push(format!(
                                    "{ip} answered ARP by nodes {first:?} at once at {ms} ms, by nodes {n:?} again at {at} ms"
                                )),
                                None => g.arp_unconfirmed.push(format!(
                                    "{ip}: nodes {first:?} at {ms} ms, not again"
                                )),
                            }
                        }
                    }
                    std::thread::sleep(tick.saturating_sub(began.elapsed()));
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

    /// The ARP probes of `ip` so far.
    pub fn arp_samples(&self, ip: &str) -> Vec<ArpSample> {
        self.inner
            .lock()
            .map(|g| g.arp.iter().filter(|a| a.ip == ip).cloned().collect())
            .unwrap_or_default()
    }

    /// Panics if the invariant was ever broken, or if the ARP probes never
    /// worked while something was watched (the check could not fail).
    pub fn check(&self) {
        let (probes, errors) = self
            .inner
            .lock()
            .map(|g| (g.arp.len(), g.arp_errors.clone()))
            .unwrap_or_default();
        let watched = self.shared.lock().is_ok_and(|s| !s.watched.is_empty());
        assert!(probes > 0 || !watched, "no ARP probe succeeded: {errors:?}");
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
            let arp = self.arp_samples(&ip);
            let answered = arp.iter().filter(|a| !a.nodes.is_empty()).count();
            let mut by = BTreeSet::new();
            let mut others = BTreeSet::new();
            for a in &arp {
                by.extend(a.nodes.iter().copied());
                others.extend(a.others.iter().cloned());
            }
            s.push_str(&format!(
                "{name} {ip}: ARP {answered}/{} probes answered, by nodes {by:?}, by others {others:?}\n",
                arp.len()
            ));
        }
        if let Ok(g) = self.inner.lock() {
            if !g.arp_unconfirmed.is_empty() {
                s.push_str(&format!(
                    "unconfirmed double ARP replies: {:?}\n",
                    g.arp_unconfirmed.iter().take(20).collect::<Vec<_>>()
                ));
            }
            if !g.arp_errors.is_empty() {
                s.push_str(&format!(
                    "ARP probe errors ({}): {:?}\n",
                    g.arp_errors.len(),
                    g.arp_errors.iter().take(5).collect::<Vec<_>>()
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::parse_answer;

    #[test]
    fn only_a_complete_answer_counts() {
        let full = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nnode=2 counter=17 end\n";
        assert_eq!(parse_answer(full), Some((2, 17)));
        // Cut after the status line, or inside the body.
        assert_eq!(parse_answer("HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(
            parse_answer("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nnode=2 coun"),
            None
        );
        assert_eq!(
            parse_answer("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nnode=2 counter=1"),
            None
        );
        assert_eq!(
            parse_answer("HTTP/1.0 404 Not Found\r\n\r\nnode=2 counter=17 end\n"),
            None
        );
        assert_eq!(
            parse_answer("HTTP/1.0 200 OK\r\n\r\nnode= counter=3 end\n"),
            None
        );
    }
}
