//! Protocol framing: `u32 LE length | u8 type | payload`, the length covering
//! type and payload, at most [`MAX_FRAME`]. Every field is length-checked on
//! decode; a frame must be consumed exactly.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::entry::{check_path, malformed, Entry, Reader, MAX_PATH};
use crate::error::{Result, SyncError};

/// Protocol magic sent in Hello.
pub const MAGIC: &[u8; 8] = b"VSHASYNC";
/// Protocol version.
pub const VERSION: u16 = 1;
/// Largest frame accepted (type + payload).
pub const MAX_FRAME: usize = 16 << 20;
/// Size of data chunks the sender emits.
pub const CHUNK: usize = 1 << 20;
/// Most entries per manifest chunk.
pub const MANIFEST_BATCH: usize = 2048;

/// Where the content of a `Put` regular file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Not a regular file (or a hardlink follower): nothing to transfer.
    None,
    /// Content follows as `Data`/`Hole` frames, then `FileEnd`.
    Data,
    /// Same content as this path of the receiver's current snapshot.
    Old(Vec<u8>),
    /// Content from the receiver's unification pool (by hash).
    Pool,
    /// Block delta against this path of the current snapshot follows:
    /// `Copy`/`Data` frames, then `FileEnd`.
    Delta(Vec<u8>),
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Sender → receiver: opens a round.
    Hello {
        /// Tree name.
        name: String,
        /// Shared secret (may be empty).
        token: Vec<u8>,
        /// Bit 0: the tree takes part in unification.
        flags: u32,
    },
    /// Receiver → sender: what it holds.
    Welcome {
        /// Digest of the current snapshot (zero if none).
        digest: [u8; 32],
        /// Sequence number of the current snapshot (0 if none).
        seq: u64,
    },
    /// Either way: the round is refused, with the reason.
    Refused(String),
    /// Sender → receiver: send your manifest.
    NeedManifest,
    /// Sender → receiver: I hold your manifest already.
    HaveManifest,
    /// Receiver → sender: part of the current manifest.
    ManifestChunk(Vec<Entry>),
    /// Receiver → sender: end of manifest.
    ManifestEnd {
        /// Entries sent.
        count: u64,
    },
    /// Sender → receiver: block signature of a current file, please.
    SigRequest {
        /// Path in the current snapshot.
        path: Vec<u8>,
        /// Block size.
        block: u32,
    },
    /// Receiver → sender: (weak, strong) per block.
    Signature {
        /// Block size.
        block: u32,
        /// Sums.
        sums: Vec<(u32, u64)>,
    },
    /// Sender → receiver: which of these content hashes do you hold (unification pool)?
    HashQuery(Vec<[u8; 32]>),
    /// Receiver → sender: one flag per queried hash.
    HashHave(Vec<bool>),
    /// Sender → receiver: the stream of changes starts.
    Begin,
    /// Sender → receiver: an entry of the new tree that differs from the current one.
    Put {
        /// The entry.
        entry: Entry,
        /// Where its content comes from.
        source: Source,
    },
    /// File content bytes.
    Data(Vec<u8>),
    /// A hole of this many zero bytes (sparse files).
    Hole(u64),
    /// Delta: copy `count` blocks starting at block `start` of the basis.
    Copy {
        /// First block.
        start: u32,
        /// Blocks.
        count: u32,
    },
    /// End of a file's content, with the blake3 of all of it.
    FileEnd([u8; 32]),
    /// Sender → receiver: this path of the current tree is gone.
    Delete(Vec<u8>),
    /// Sender → receiver: the round is complete; verify and commit.
    End {
        /// Tree digest of the new tree.
        digest: [u8; 32],
        /// Entries in the new tree.
        count: u64,
    },
    /// Receiver → sender: new snapshot committed.
    Committed {
        /// Its sequence number.
        seq: u64,
        /// Bytes not transferred thanks to unification (pool hits).
        unified_bytes: u64,
    },
    /// Sender → receiver: abandon the round (previous snapshot stays).
    Abort(String),
}

impl Source {
    fn encode(&self, o: &mut Vec<u8>) {
        match self {
            Source::None => o.push(0),
            Source::Data => o.push(1),
            Source::Old(p) => {
                o.push(2);
                put(o, p)
            }
            Source::Pool => o.push(3),
            Source::Delta(p) => {
                o.push(4);
                put(o, p)
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Source> {
        Ok(match r.u8()? {
            0 => Source::None,
            1 => Source::Data,
            2 => Source::Old(path(r)?),
            3 => Source::Pool,
            4 => Source::Delta(path(r)?),
            _ => return Err(malformed("put", "unknown content source")),
        })
    }
}

fn put(o: &mut Vec<u8>, b: &[u8]) {
    o.extend_from_slice(&(b.len() as u32).to_le_bytes());
    o.extend_from_slice(b);
}

fn path(r: &mut Reader<'_>) -> Result<Vec<u8>> {
    let p = r.bytes(MAX_PATH, "path")?.to_vec();
    check_path(&p)?;
    Ok(p)
}

impl Frame {
    fn code(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::Welcome { .. } => 2,
            Frame::Refused(_) => 3,
            Frame::NeedManifest => 4,
            Frame::HaveManifest => 5,
            Frame::ManifestChunk(_) => 6,
            Frame::ManifestEnd { .. } => 7,
            Frame::SigRequest { .. } => 8,
            Frame::Signature { .. } => 9,
            Frame::HashQuery(_) => 10,
            Frame::HashHave(_) => 11,
            Frame::Begin => 12,
            Frame::Put { .. } => 13,
            Frame::Data(_) => 14,
            Frame::Hole(_) => 15,
            Frame::Copy { .. } => 16,
            Frame::FileEnd(_) => 17,
            Frame::Delete(_) => 18,
            Frame::End { .. } => 19,
            Frame::Committed { .. } => 20,
            Frame::Abort(_) => 21,
        }
    }

    /// Short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Refused(_) => "Refused",
            Frame::NeedManifest => "NeedManifest",
            Frame::HaveManifest => "HaveManifest",
            Frame::ManifestChunk(_) => "ManifestChunk",
            Frame::ManifestEnd { .. } => "ManifestEnd",
            Frame::SigRequest { .. } => "SigRequest",
            Frame::Signature { .. } => "Signature",
            Frame::HashQuery(_) => "HashQuery",
            Frame::HashHave(_) => "HashHave",
            Frame::Begin => "Begin",
            Frame::Put { .. } => "Put",
            Frame::Data(_) => "Data",
            Frame::Hole(_) => "Hole",
            Frame::Copy { .. } => "Copy",
            Frame::FileEnd(_) => "FileEnd",
            Frame::Delete(_) => "Delete",
            Frame::End { .. } => "End",
            Frame::Committed { .. } => "Committed",
            Frame::Abort(_) => "Abort",
        }
    }

    /// Encode with the length header.
    pub fn encode(&self) -> Vec<u8> {
        let mut o = vec![0, 0, 0, 0, self.code()];
        match self {
            Frame::Hello { name, token, flags } => {
                o.extend_from_slice(MAGIC);
                o.extend_from_slice(&VERSION.to_le_bytes());
                put(&mut o, name.as_bytes());
                put(&mut o, token);
                o.extend_from_slice(&flags.to_le_bytes());
            }
            Frame::Welcome { digest, seq } => {
                o.extend_from_slice(&VERSION.to_le_bytes());
                o.extend_from_slice(digest);
                o.extend_from_slice(&seq.to_le_bytes());
            }
            Frame::Refused(s) | Frame::Abort(s) => put(&mut o, s.as_bytes()),
            Frame::NeedManifest | Frame::HaveManifest | Frame::Begin => {}
            Frame::FileEnd(h) => o.extend_from_slice(h),
            Frame::ManifestChunk(v) => {
                o.extend_from_slice(&(v.len() as u32).to_le_bytes());
                for e in v {
                    e.encode(&mut o);
                }
            }
            Frame::ManifestEnd { count } => o.extend_from_slice(&count.to_le_bytes()),
            Frame::SigRequest { path, block } => {
                put(&mut o, path);
                o.extend_from_slice(&block.to_le_bytes());
            }
            Frame::Signature { block, sums } => {
                o.extend_from_slice(&block.to_le_bytes());
                o.extend_from_slice(&(sums.len() as u32).to_le_bytes());
                for (w, s) in sums {
                    o.extend_from_slice(&w.to_le_bytes());
                    o.extend_from_slice(&s.to_le_bytes());
                }
            }
            Frame::HashQuery(v) => {
                o.extend_from_slice(&(v.len() as u32).to_le_bytes());
                for h in v {
                    o.extend_from_slice(h);
                }
            }
            Frame::HashHave(v) => {
                o.extend_from_slice(&(v.len() as u32).to_le_bytes());
                o.extend(v.iter().map(|b| *b as u8));
            }
            Frame::Put { entry, source } => {
                entry.encode(&mut o);
                source.encode(&mut o);
            }
            Frame::Data(d) => o.extend_from_slice(d),
            Frame::Hole(n) => o.extend_from_slice(&n.to_le_bytes()),
            Frame::Copy { start, count } => {
                o.extend_from_slice(&start.to_le_bytes());
                o.extend_from_slice(&count.to_le_bytes());
            }
            Frame::Delete(p) => put(&mut o, p),
            Frame::End { digest, count } => {
                o.extend_from_slice(digest);
                o.extend_from_slice(&count.to_le_bytes());
            }
            Frame::Committed { seq, unified_bytes } => {
                o.extend_from_slice(&seq.to_le_bytes());
                o.extend_from_slice(&unified_bytes.to_le_bytes());
            }
        }
        let len = (o.len() - 4) as u32;
        o[..4].copy_from_slice(&len.to_le_bytes());
        o
    }

    /// Decode one frame body (type byte + payload, without the length header).
    pub fn decode(body: &[u8]) -> Result<Frame> {
        if body.is_empty() {
            return Err(malformed("frame", "empty frame"));
        }
        if body.len() > MAX_FRAME {
            return Err(SyncError::FrameTooLarge {
                len: body.len() as u64,
                max: MAX_FRAME as u64,
            });
        }
        Frame::decode_typed(body[0], &body[1..])
    }

    /// Decode a payload of frame type `ty`.
    pub fn decode_typed(ty: u8, payload: &[u8]) -> Result<Frame> {
        let mut r = Reader::new(payload);
        let f = match ty {
            1 => {
                let mut m = [0u8; 8];
                for b in m.iter_mut() {
                    *b = r.u8()?;
                }
                if &m != MAGIC {
                    return Err(SyncError::Handshake(
                        "not a vsha-sync peer (bad magic)".into(),
                    ));
                }
                let v = u16::from(r.u8()?) | (u16::from(r.u8()?) << 8);
                if v != VERSION {
                    return Err(SyncError::Handshake(format!(
                        "peer speaks protocol version {v}, this side {VERSION}"
                    )));
                }
                let name = String::from_utf8(r.bytes(256, "name")?.to_vec())
                    .map_err(|_| malformed("hello", "name is not UTF-8"))?;
                let token = r.bytes(4096, "token")?.to_vec();
                let flags = r.u32()?;
                Frame::Hello { name, token, flags }
            }
            2 => {
                let v = u16::from(r.u8()?) | (u16::from(r.u8()?) << 8);
                if v != VERSION {
                    return Err(SyncError::Handshake(format!(
                        "peer speaks protocol version {v}, this side {VERSION}"
                    )));
                }
                Frame::Welcome {
                    digest: r.array32()?,
                    seq: r.u64()?,
                }
            }
            3 | 21 => {
                let s = String::from_utf8_lossy(r.bytes(65536, "reason")?).into_owned();
                if ty == 3 {
                    Frame::Refused(s)
                } else {
                    Frame::Abort(s)
                }
            }
            4 => Frame::NeedManifest,
            5 => Frame::HaveManifest,
            6 => {
                let n = r.u32()? as usize;
                if n > MANIFEST_BATCH {
                    return Err(malformed("manifest chunk", "too many entries"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let e = Entry::decode(&mut r)?;
                    check_path(&e.path)?;
                    v.push(e);
                }
                Frame::ManifestChunk(v)
            }
            7 => Frame::ManifestEnd { count: r.u64()? },
            8 => Frame::SigRequest {
                path: path(&mut r)?,
                block: r.u32()?,
            },
            9 => {
                let block = r.u32()?;
                let n = r.u32()? as usize;
                if n.checked_mul(12).is_none_or(|b| b > r.remaining()) {
                    return Err(malformed("signature", "count exceeds frame"));
                }
                let mut sums = Vec::with_capacity(n);
                for _ in 0..n {
                    sums.push((r.u32()?, r.u64()?));
                }
                Frame::Signature { block, sums }
            }
            10 => {
                let n = r.u32()? as usize;
                if n.checked_mul(32).is_none_or(|b| b > r.remaining()) {
                    return Err(malformed("hash query", "count exceeds frame"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(r.array32()?);
                }
                Frame::HashQuery(v)
            }
            11 => {
                let n = r.u32()? as usize;
                if n > r.remaining() {
                    return Err(malformed("hash answer", "count exceeds frame"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(r.u8()? != 0);
                }
                Frame::HashHave(v)
            }
            12 => Frame::Begin,
            13 => {
                let entry = Entry::decode(&mut r)?;
                check_path(&entry.path)?;
                if let Some(l) = &entry.link {
                    check_path(l)?;
                }
                let source = Source::decode(&mut r)?;
                Frame::Put { entry, source }
            }
            14 => Frame::Data(r.rest().to_vec()),
            15 => Frame::Hole(r.u64()?),
            16 => Frame::Copy {
                start: r.u32()?,
                count: r.u32()?,
            },
            17 => Frame::FileEnd(r.array32()?),
            18 => Frame::Delete(path(&mut r)?),
            19 => Frame::End {
                digest: r.array32()?,
                count: r.u64()?,
            },
            20 => Frame::Committed {
                seq: r.u64()?,
                unified_bytes: r.u64()?,
            },
            t => return Err(malformed("frame", format!("unknown frame type {t}"))),
        };
        r.finish(f.name())?;
        Ok(f)
    }
}

/// Read one frame; `Ok(None)` on a clean end of stream at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(Frame, usize)>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await.map_err(SyncError::Stream)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(SyncError::Truncated("inside a frame header"));
        }
        got += n;
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(SyncError::FrameTooLarge {
            len: n as u64,
            max: MAX_FRAME as u64,
        });
    }
    if n == 0 {
        return Err(malformed("frame", "zero length"));
    }
    let eof = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SyncError::Truncated("inside a frame body")
        } else {
            SyncError::Stream(e)
        }
    };
    let ty = r.read_u8().await.map_err(eof)?;
    let mut payload = vec![0u8; n - 1];
    r.read_exact(&mut payload).await.map_err(eof)?;
    // Content moves without another copy.
    let f = if ty == 14 {
        Frame::Data(payload)
    } else {
        Frame::decode_typed(ty, &payload)?
    };
    Ok(Some((f, n + 4)))
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<usize> {
    if let Frame::Data(d) = f {
        // Header, then the content as it is (no re-encoding copy).
        let mut h = ((d.len() + 1) as u32).to_le_bytes().to_vec();
        h.push(14);
        w.write_all(&h).await.map_err(SyncError::Stream)?;
        w.write_all(d).await.map_err(SyncError::Stream)?;
        return Ok(d.len() + 5);
    }
    let b = f.encode();
    w.write_all(&b).await.map_err(SyncError::Stream)?;
    Ok(b.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Kind;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        let mut e = Entry::new(b"a/b".to_vec(), Kind::File);
        e.xattrs.push((b"user.x".to_vec(), b"y".to_vec()));
        vec![
            Frame::Hello {
                name: "web".into(),
                token: b"t".to_vec(),
                flags: 1,
            },
            Frame::Welcome {
                digest: [7; 32],
                seq: 3,
            },
            Frame::ManifestChunk(vec![e.clone()]),
            Frame::Put {
                entry: e,
                source: Source::Delta(b"a/c".to_vec()),
            },
            Frame::Signature {
                block: 4096,
                sums: vec![(1, 2), (3, 4)],
            },
            Frame::HashHave(vec![true, false]),
            Frame::Delete(b"x".to_vec()),
            Frame::End {
                digest: [1; 32],
                count: 9,
            },
        ]
    }

    #[test]
    fn roundtrip() {
        for f in samples() {
            let b = f.encode();
            assert_eq!(Frame::decode(&b[4..]).unwrap(), f);
        }
    }

    #[test]
    fn refuses_hostile_paths() {
        for p in [&b"../x"[..], b"/etc/x", b"a/../../x", b"a\0b"] {
            let f = Frame::Delete(p.to_vec()).encode();
            assert!(Frame::decode(&f[4..]).is_err());
        }
    }

    #[tokio::test]
    async fn refuses_huge_declared_length() {
        let mut b = (u32::MAX).to_le_bytes().to_vec();
        b.push(14);
        let err = read_frame(&mut &b[..]).await.unwrap_err();
        assert!(matches!(err, SyncError::FrameTooLarge { .. }), "{err}");
    }

    proptest! {
        // The decoder never panics on arbitrary bytes, and truncated or
        // bit-flipped encodings of valid frames are either refused or decode
        // to a well-formed frame.
        #[test]
        fn decoder_total(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&body);
        }

        #[test]
        fn mutated_frames_do_not_panic(i in 0usize..8, cut in 0usize..200, flip in 0usize..2000) {
            let f = &samples()[i];
            let b = f.encode();
            let body = &b[4..];
            let _ = Frame::decode(&body[..cut.min(body.len())]);
            let mut m = body.to_vec();
            let bit = flip % (m.len() * 8);
            m[bit / 8] ^= 1 << (bit % 8);
            let _ = Frame::decode(&m);
        }
    }
}
