//! Index entries: what one file, directory, link or node of a tree is, their
//! canonical binary encoding, their sort order and the tree digest.

use crate::error::{Result, SyncError};

/// Longest path accepted from a peer, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest single name accepted from a peer.
pub const MAX_NAME: usize = 255;
/// Longest xattr value accepted (the Linux limit).
pub const MAX_XATTR_VALUE: usize = 65536;
/// Most xattrs accepted on one entry.
pub const MAX_XATTRS: usize = 1024;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Character device node.
    Char,
    /// Block device node.
    Block,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Dir => 1,
            Kind::File => 2,
            Kind::Symlink => 3,
            Kind::Char => 4,
            Kind::Block => 5,
            Kind::Fifo => 6,
            Kind::Socket => 7,
        }
    }
    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            1 => Kind::Dir,
            2 => Kind::File,
            3 => Kind::Symlink,
            4 => Kind::Char,
            5 => Kind::Block,
            6 => Kind::Fifo,
            7 => Kind::Socket,
            _ => return None,
        })
    }
}

/// One entry of a tree index. `path` is relative to the tree root, components
/// separated by `/`; the root itself has the empty path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative path (raw bytes).
    pub path: Vec<u8>,
    /// Type.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Size in bytes (regular files; 0 otherwise).
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Device number of char/block nodes.
    pub rdev: u64,
    /// Symlink target (raw bytes).
    pub target: Vec<u8>,
    /// Extended attributes (name, value), sorted by name; includes
    /// `security.capability` and the POSIX ACLs `system.posix_acl_*`.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// blake3 of the content (regular files; zero otherwise).
    pub hash: [u8; 32],
    /// For the second and further names of a hardlink group: the path of the
    /// group's first name in sort order.
    pub link: Option<Vec<u8>>,
    /// Local only (not sent, not in the digest): inode number at scan time.
    pub ino: u64,
    /// Local only: allocated 512-byte blocks (detects sparse files).
    pub blocks: u64,
    /// Local only: link count at scan time.
    pub nlink: u64,
    /// Local only: status change time at scan time (0: unknown). Any change
    /// of xattrs, owner, mode, links or content moves it, so an entry with
    /// the same inode and ctime as before has the same xattrs and target.
    pub ctime: i64,
    /// Local only: nanoseconds of `ctime`.
    pub ctime_nsec: u32,
}

impl Entry {
    /// A blank entry of the given kind and path.
    pub fn new(path: Vec<u8>, kind: Kind) -> Entry {
        Entry {
            path,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            rdev: 0,
            target: Vec::new(),
            xattrs: Vec::new(),
            hash: [0; 32],
            link: None,
            ino: 0,
            blocks: 0,
            nlink: 1,
            ctime: 0,
            ctime_nsec: 0,
        }
    }

    /// Path as a lossy string, for messages.
    pub fn display_path(&self) -> String {
        display(&self.path)
    }

    /// Same canonical content (everything the digest covers).
    pub fn same(&self, o: &Entry) -> bool {
        self.path == o.path && self.link == o.link && self.same_inode_meta(o)
    }

    /// Same inode metadata (what hardlinked names share), ignoring path and link.
    pub fn same_inode_meta(&self, o: &Entry) -> bool {
        self.kind == o.kind
            && self.mode == o.mode
            && self.uid == o.uid
            && self.gid == o.gid
            && self.size == o.size
            && self.mtime == o.mtime
            && self.mtime_nsec == o.mtime_nsec
            && self.rdev == o.rdev
            && self.target == o.target
            && self.xattrs == o.xattrs
            && self.hash == o.hash
    }

    /// Append the canonical encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_bytes(out, &self.path);
        out.push(self.kind.code());
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime.to_le_bytes());
        out.extend_from_slice(&self.mtime_nsec.to_le_bytes());
        out.extend_from_slice(&self.rdev.to_le_bytes());
        put_bytes(out, &self.target);
        out.extend_from_slice(&(self.xattrs.len() as u32).to_le_bytes());
        for (n, v) in &self.xattrs {
            put_bytes(out, n);
            put_bytes(out, v);
        }
        out.extend_from_slice(&self.hash);
        match &self.link {
            None => out.push(0),
            Some(l) => {
                out.push(1);
                put_bytes(out, l);
            }
        }
    }

    /// Decode one entry; every length is checked against the input and the limits.
    pub fn decode(r: &mut Reader<'_>) -> Result<Entry> {
        let path = r.bytes(MAX_PATH, "entry path")?.to_vec();
        let kind = Kind::from_code(r.u8()?).ok_or_else(|| malformed("entry", "unknown kind"))?;
        let mode = r.u32()?;
        if mode & !0o7777 != 0 {
            return Err(malformed("entry", "mode has bits beyond 0o7777"));
        }
        let mut e = Entry::new(path, kind);
        e.mode = mode;
        e.uid = r.u32()?;
        e.gid = r.u32()?;
        if e.uid == u32::MAX || e.gid == u32::MAX {
            return Err(malformed("entry", "owner id -1 is not a real id"));
        }
        e.size = r.u64()?;
        e.mtime = r.u64()? as i64;
        e.mtime_nsec = r.u32()?;
        if e.mtime_nsec >= 1_000_000_000 {
            return Err(malformed("entry", "mtime nanoseconds out of range"));
        }
        e.rdev = r.u64()?;
        e.target = r.bytes(MAX_PATH, "symlink target")?.to_vec();
        let n = r.u32()? as usize;
        if n > MAX_XATTRS {
            return Err(malformed("entry", "too many xattrs"));
        }
        for _ in 0..n {
            let name = r.bytes(MAX_NAME, "xattr name")?.to_vec();
            let val = r.bytes(MAX_XATTR_VALUE, "xattr value")?.to_vec();
            e.xattrs.push((name, val));
        }
        e.hash = r.array32()?;
        e.link = match r.u8()? {
            0 => None,
            1 => Some(r.bytes(MAX_PATH, "link path")?.to_vec()),
            _ => return Err(malformed("entry", "bad link flag")),
        };
        Ok(e)
    }

    /// blake3 of the canonical encoding: the leaf of the tree digest.
    pub fn leaf(&self) -> [u8; 32] {
        let mut v = Vec::with_capacity(128 + self.path.len());
        self.encode(&mut v);
        *blake3::hash(&v).as_bytes()
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> SyncError {
    SyncError::Malformed {
        what,
        why: why.into(),
    }
}

/// Lossy display of a raw path.
pub fn display(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// A bounds-checked reader over a frame payload.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Read from `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(malformed(
                "frame",
                format!("needs {n} more bytes, {} left", self.buf.len()),
            ));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    /// Little-endian u32.
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Little-endian u64.
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// 32 raw bytes.
    pub fn array32(&mut self) -> Result<[u8; 32]> {
        let b = self.take(32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(b);
        Ok(a)
    }
    /// A u32-length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize, what: &'static str) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(malformed(what, format!("length {n} exceeds limit {max}")));
        }
        self.take(n)
    }
    /// The rest of the buffer.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// Fails unless the whole payload was consumed.
    pub fn finish(&self, what: &'static str) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                what,
                format!("{} trailing bytes", self.buf.len()),
            ))
        }
    }
}

/// Sort key: paths compare component by component ('/' sorts before any byte),
/// so a directory always comes right before its contents.
pub fn key_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    // Paths compared during searches and merges mostly share a long prefix
    // (the same directory): skip equal bytes 16 at a time (equal raw bytes
    // are equal keys), then compare the rest with the mapping.
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 16 <= n && a[i..i + 16] == b[i..i + 16] {
        i += 16;
    }
    let map = |c: &u8| if *c == b'/' { 0u8 } else { *c };
    a[i..].iter().map(map).cmp(b[i..].iter().map(map))
}

/// Sort entries into tree order.
pub fn sort_entries(v: &mut [Entry]) {
    v.sort_by(|a, b| key_cmp(&a.path, &b.path));
}

/// The tree digest: a two-level Merkle hash, the root over the sorted leaf
/// hashes of every entry (`Entry::leaf`), with the entry count.
pub fn tree_digest(entries: &[Entry]) -> [u8; 32] {
    use rayon::prelude::*;
    // Leaves in parallel (the encoding and hashing of 200k entries is the
    // bulk of the cost), the root over them in order.
    let leaves: Vec<[u8; 32]> = if entries.len() > 4096 {
        entries.par_iter().map(|e| e.leaf()).collect()
    } else {
        entries.iter().map(|e| e.leaf()).collect()
    };
    let mut h = blake3::Hasher::new();
    h.update(b"vsha-sync tree v1");
    h.update(&(entries.len() as u64).to_le_bytes());
    h.update(leaves.as_flattened());
    *h.finalize().as_bytes()
}

/// Hex of a digest.
pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Check a relative path from the network: no absolute path, no empty, `.`
/// or `..` component, no NUL, bounded lengths. The empty path (the root) is valid.
pub fn check_path(p: &[u8]) -> Result<()> {
    let bad = |why| SyncError::BadPath {
        path: display(p),
        why,
    };
    if p.is_empty() {
        return Ok(());
    }
    if p.len() > MAX_PATH {
        return Err(bad("path too long"));
    }
    if p[0] == b'/' {
        return Err(bad("absolute path"));
    }
    if p.contains(&0) {
        return Err(bad("NUL byte in path"));
    }
    for c in p.split(|b| *b == b'/') {
        match c {
            b"" => return Err(bad("empty component (// or trailing /)")),
            b"." => return Err(bad("'.' component")),
            b".." => return Err(bad("'..' component leaves the tree")),
            _ if c.len() > MAX_NAME => return Err(bad("component longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(())
}

/// Parent path and last name of a non-root path.
pub fn split_parent(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|b| *b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_dir_before_contents() {
        let mut v = [
            b"a.b".to_vec(),
            b"a/z".to_vec(),
            b"a".to_vec(),
            b"".to_vec(),
        ];
        v.sort_by(|a, b| key_cmp(a, b));
        assert_eq!(
            v,
            [
                b"".to_vec(),
                b"a".to_vec(),
                b"a/z".to_vec(),
                b"a.b".to_vec()
            ]
        );
    }

    #[test]
    fn key_cmp_is_the_mapped_order() {
        let slow = |a: &[u8], b: &[u8]| {
            let map = |c: &u8| if *c == b'/' { 0u8 } else { *c };
            a.iter().map(map).cmp(b.iter().map(map))
        };
        let parts: [&[u8]; 6] = [b"a", b"a/b", b"a.b", b"dir/with/a/long/prefix", b"/", b"\0"];
        let mut paths: Vec<Vec<u8>> = Vec::new();
        for x in parts {
            for y in parts {
                for z in [&b""[..], b"/x", b"-y", b"0123456789abcdef0123"] {
                    paths.push([x, y, z].concat());
                }
            }
        }
        for a in &paths {
            for b in &paths {
                assert_eq!(key_cmp(a, b), slow(a, b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn path_checks() {
        for bad in [
            &b"/etc/x"[..],
            b"../x",
            b"a/../x",
            b"a//b",
            b"a/",
            b"a\0b",
            b"./a",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        for good in [&b""[..], b"a", b"a/b.c/d", b"..a", b"a.."] {
            assert!(check_path(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn entry_roundtrip() {
        let mut e = Entry::new(b"x/y".to_vec(), Kind::File);
        e.mode = 0o4755;
        e.xattrs.push((b"user.a".to_vec(), b"1".to_vec()));
        e.link = Some(b"a".to_vec());
        let mut v = Vec::new();
        e.encode(&mut v);
        let mut r = Reader::new(&v);
        let d = Entry::decode(&mut r).unwrap();
        r.finish("t").unwrap();
        assert!(d.same(&e));
    }
}
