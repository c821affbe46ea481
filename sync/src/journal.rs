//! The change journal: fanotify with `FAN_MARK_FILESYSTEM` and
//! `FAN_REPORT_DFID_NAME` tells which directories changed, so a round
//! rescans only those. The event records are parsed from the raw bytes here
//! (nix reads only the fixed event header); directory handles are mapped to
//! paths by the inode number they carry (ext4 and tmpfs handle layouts) and
//! the previous index. On overflow or an undecodable handle the caller falls
//! back to a full scan and counts it.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use crate::entry::{split_parent, Kind};
use crate::error::{Result, SyncError};
use crate::scan::Index;

const FAN_Q_OVERFLOW: u64 = 0x4000;
const INFO_FID: u8 = 1;
const INFO_DFID_NAME: u8 = 2;
const INFO_DFID: u8 = 3;
const INFO_OLD_DFID_NAME: u8 = 10;
const INFO_NEW_DFID_NAME: u8 = 12;

/// A fanotify change journal on the filesystem of one tree.
///
/// A background thread reads the events as they come and keeps only the
/// distinct inodes they name: a FILESYSTEM mark also sees every other write
/// on the filesystem (other trees, a receiver on the same disk), and reading
/// a backlog of a million events at the start of a round cost seconds.
pub struct Journal {
    fan: Arc<Fanotify>,
    shared: Arc<(Mutex<Pending>, Condvar)>,
    stop: Arc<AtomicBool>,
    /// Overflows seen so far.
    pub overflows: u64,
    /// Events read so far.
    pub events: u64,
}

/// What the events since the last round named.
#[derive(Default)]
struct Pending {
    recs: HashSet<Record>,
    overflowed: bool,
    undecodable: bool,
    overflows: u64,
    events: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Record {
    ino: u64,
    is_dir_handle: bool,
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("overflows", &self.overflows)
            .field("events", &self.events)
            .finish()
    }
}

impl Journal {
    /// Mark the whole filesystem holding `root` (needs CAP_SYS_ADMIN).
    pub fn start(root: &Path) -> Result<Journal> {
        // An unlimited queue: a FILESYSTEM mark sees every write on the
        // filesystem (other trees, the receiver itself), and an overflow
        // costs a full scan.
        let flags = InitFlags::FAN_CLASS_NOTIF
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::FAN_UNLIMITED_QUEUE
            | InitFlags::from_bits_retain(
                libc_flags::FAN_REPORT_DFID_NAME | libc_flags::FAN_REPORT_FID,
            );
        let fan = Fanotify::init(flags, EventFFlags::O_RDONLY).map_err(|e| {
            SyncError::Journal(format!(
                "fanotify_init refused ({e}); needs root and Linux >= 5.9"
            ))
        })?;
        let mask = MaskFlags::from_bits_retain(
            libc_flags::FAN_CREATE
                | libc_flags::FAN_DELETE
                | libc_flags::FAN_MODIFY
                | libc_flags::FAN_ATTRIB
                | libc_flags::FAN_MOVED_FROM
                | libc_flags::FAN_MOVED_TO
                | libc_flags::FAN_DELETE_SELF
                | libc_flags::FAN_MOVE_SELF
                | libc_flags::FAN_ONDIR,
        );
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::from_bits_retain(libc_flags::FAN_MARK_FILESYSTEM),
            mask,
            nix::fcntl::AT_FDCWD,
            Some(root),
        )
        .map_err(|e| {
            SyncError::Journal(format!(
                "fanotify_mark FAN_MARK_FILESYSTEM on {} refused: {e}",
                root.display()
            ))
        })?;
        let fan = Arc::new(fan);
        let shared: Arc<(Mutex<Pending>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (f2, s2, st2) = (fan.clone(), shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("vsha-sync-journal".into())
            .spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                while !st2.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(f2.as_fd(), PollFlags::POLLIN)];
                    // Bounded, so that a dropped journal's thread ends soon.
                    if !matches!(poll(&mut fds, PollTimeout::from(100u8)), Ok(n) if n > 0) {
                        continue;
                    }
                    let (m, cv) = &*s2;
                    let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
                    if read_all(&f2, &mut p).is_err() {
                        p.undecodable = true;
                    }
                    if !p.recs.is_empty() || p.overflowed || p.undecodable {
                        cv.notify_all();
                    }
                }
            })
            .map_err(|e| SyncError::Journal(format!("journal thread: {e}")))?;
        Ok(Journal {
            fan,
            shared,
            stop,
            overflows: 0,
            events: 0,
        })
    }

    /// Take what is pending, after reading what is still queued in the
    /// kernel (an event of a write that returned before this call is seen).
    fn take(&mut self) -> Result<Pending> {
        let (m, _) = &*self.shared;
        let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
        let r = read_all(&self.fan, &mut p);
        let taken = Pending {
            recs: std::mem::take(&mut p.recs),
            overflowed: std::mem::take(&mut p.overflowed),
            undecodable: std::mem::take(&mut p.undecodable),
            overflows: p.overflows,
            events: p.events,
        };
        self.overflows = p.overflows;
        self.events = p.events;
        r.map(|()| taken)
    }
}

/// Read every queued event into `p`.
fn read_all(fan: &Fanotify, p: &mut Pending) -> Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match nix::unistd::read(fan.as_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(SyncError::Journal(format!("read: {e}"))),
        };
        p.parse(&buf[..n]);
    }
    Ok(())
}

impl Pending {
    fn parse(&mut self, mut b: &[u8]) {
        while b.len() >= 24 {
            let event_len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let meta_len = u16::from_ne_bytes([b[6], b[7]]) as usize;
            let mut m = [0u8; 8];
            m.copy_from_slice(&b[8..16]);
            let mask = u64::from_ne_bytes(m);
            if event_len < 24 || event_len > b.len() || meta_len < 24 || meta_len > event_len {
                self.undecodable = true;
                return;
            }
            self.events += 1;
            if mask & FAN_Q_OVERFLOW != 0 {
                self.overflowed = true;
                self.overflows += 1;
            }
            let mut info = &b[meta_len..event_len];
            while info.len() >= 4 {
                let ty = info[0];
                let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
                if len < 4 || len > info.len() {
                    self.undecodable = true;
                    break;
                }
                let rec = &info[..len];
                if matches!(
                    ty,
                    INFO_FID | INFO_DFID_NAME | INFO_DFID | INFO_OLD_DFID_NAME | INFO_NEW_DFID_NAME
                ) {
                    match decode_handle(rec) {
                        Some(ino) => {
                            self.recs.insert(Record {
                                ino,
                                is_dir_handle: ty != INFO_FID,
                            });
                        }
                        None => self.undecodable = true,
                    }
                }
                info = &info[len..];
            }
            b = &b[event_len..];
        }
    }
}

impl Journal {
    /// Forget everything queued (a full scan follows).
    pub fn drain(&mut self) {
        let _ = self.take();
    }

    /// Whether events are waiting, waiting up to `timeout` for one.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let (m, cv) = &*self.shared;
        let p = m.lock().unwrap_or_else(|e| e.into_inner());
        let (p, _) = cv
            .wait_timeout_while(p, timeout, |p| {
                p.recs.is_empty() && !p.overflowed && !p.undecodable
            })
            .unwrap_or_else(|e| e.into_inner());
        !p.recs.is_empty() || p.overflowed || p.undecodable
    }

    /// Directories of `prev` (relative paths) whose content or attributes
    /// changed since the last call; `None` when only a full scan is safe.
    /// Events on objects outside the tree (unknown inodes) are ignored.
    pub fn changed_dirs(&mut self, prev: &Index) -> Result<Option<HashSet<Vec<u8>>>> {
        let p = self.take()?;
        if p.overflowed | p.undecodable {
            return Ok(None);
        }
        let recs = p.recs;
        // Map only the inodes the events name (one pass, no per-entry allocation).
        let wanted: HashSet<u64> = recs.iter().map(|r| r.ino).collect();
        let mut by_ino: HashMap<u64, Vec<usize>> = HashMap::new();
        if !wanted.is_empty() {
            for (i, e) in prev.entries.iter().enumerate() {
                if wanted.contains(&e.ino) {
                    by_ino.entry(e.ino).or_default().push(i);
                }
            }
        }
        let mut dirs = HashSet::new();
        for r in recs {
            let Some(ix) = by_ino.get(&r.ino) else {
                continue;
            };
            for &i in ix {
                let e = &prev.entries[i];
                if e.kind == Kind::Dir {
                    dirs.insert(e.path.clone());
                    if !r.is_dir_handle && !e.path.is_empty() {
                        dirs.insert(split_parent(&e.path).0.to_vec());
                    }
                } else {
                    dirs.insert(split_parent(&e.path).0.to_vec());
                }
            }
        }
        Ok(Some(dirs))
    }
}

/// The inode number inside a file handle record: ext4 `FILEID_INO32_GEN`
/// (8 bytes: ino, generation) and tmpfs (12 bytes: generation, ino low, ino high).
fn decode_handle(rec: &[u8]) -> Option<u64> {
    // header(4) fsid(8) handle_bytes(4) handle_type(4) f_handle[..]
    let h = rec.get(12..)?;
    let hb = u32::from_ne_bytes(h.get(0..4)?.try_into().ok()?) as usize;
    let ty = i32::from_ne_bytes(h.get(4..8)?.try_into().ok()?);
    let fh = h.get(8..8 + hb)?;
    let w = |i: usize| -> Option<u64> {
        Some(u32::from_ne_bytes(fh.get(i * 4..i * 4 + 4)?.try_into().ok()?) as u64)
    };
    match (ty, hb) {
        (1, 8) => w(0),
        (1, 12) => Some(w(1)? | (w(2)? << 32)),
        _ => None,
    }
}

/// fanotify constants (from the kernel uapi; nix does not name them all).
mod libc_flags {
    pub const FAN_REPORT_FID: u32 = 0x0000_0200;
    pub const FAN_REPORT_DFID_NAME: u32 = 0x0000_0400 | 0x0000_0800;
    pub const FAN_MARK_FILESYSTEM: u32 = 0x0000_0100;
    pub const FAN_MODIFY: u64 = 0x0000_0002;
    pub const FAN_ATTRIB: u64 = 0x0000_0004;
    pub const FAN_MOVED_FROM: u64 = 0x0000_0040;
    pub const FAN_MOVED_TO: u64 = 0x0000_0080;
    pub const FAN_CREATE: u64 = 0x0000_0100;
    pub const FAN_DELETE: u64 = 0x0000_0200;
    pub const FAN_DELETE_SELF: u64 = 0x0000_0400;
    pub const FAN_MOVE_SELF: u64 = 0x0000_0800;
    pub const FAN_ONDIR: u64 = 0x4000_0000;
}
