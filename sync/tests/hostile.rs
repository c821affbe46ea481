//! A hostile or broken sender: every bad frame is refused with a clear
//! error, nothing is written outside DST, the previous snapshot stays intact.

mod common;
use common::*;

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use vsha_sync::entry::{Entry, Kind};
use vsha_sync::wire::{read_frame, Frame, Source};
use vsha_sync::{Store, SyncError};

/// Feed raw bytes to a receiver; return its result and its replies.
async fn raw(
    store: Arc<Store>,
    bytes: Vec<u8>,
) -> (vsha_sync::Result<vsha_sync::Received>, Vec<Frame>) {
    let (mut a, b) = tokio::io::duplex(64 << 20);
    let recv = tokio::spawn(async move { vsha_sync::receive(store, b, None).await });
    a.write_all(&bytes).await.unwrap();
    a.shutdown().await.unwrap();
    let mut replies = Vec::new();
    while let Ok(Some((f, _))) = read_frame(&mut a).await {
        replies.push(f);
    }
    (recv.await.unwrap(), replies)
}

fn enc(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.encode()).collect()
}

fn hello() -> Frame {
    Frame::Hello {
        name: "web".into(),
        token: vec![],
        flags: 0,
    }
}

fn dir(p: &str) -> Entry {
    let mut e = Entry::new(p.as_bytes().to_vec(), Kind::Dir);
    e.mode = 0o755;
    e
}

fn file(p: &str, data: &[u8]) -> Entry {
    let mut e = Entry::new(p.as_bytes().to_vec(), Kind::File);
    e.mode = 0o644;
    e.size = data.len() as u64;
    e.hash = *blake3::hash(data).as_bytes();
    e
}

struct Fixture {
    _t: tempfile::TempDir,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
    outside: std::path::PathBuf,
    store: Arc<Store>,
    digest: [u8; 32],
    seq: u64,
}

async fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write(&src.join("etc/passwd"), b"root:x:0:0\n");
    write(&src.join("a/b"), b"b");
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut pair = Pair::new(&t.path().join("dst"));
    let s = pair.round(&src, "web").await.unwrap();
    let digest = disk_digest(&pair.current("web"));
    Fixture {
        src,
        dst: pair.dst.clone(),
        outside,
        store: pair.store.clone(),
        digest,
        seq: s.seq,
        _t: t,
    }
}

impl Fixture {
    fn intact(&self) {
        let cur = self.store.current("web").unwrap().unwrap();
        assert_eq!(
            cur.seq, self.seq,
            "a refused round changed the current snapshot"
        );
        assert_eq!(
            disk_digest(&self.dst.join("web")),
            self.digest,
            "snapshot on disk changed"
        );
        assert_same(&self.src, &self.dst.join("web"));
        assert!(
            std::fs::read_dir(&self.outside).unwrap().next().is_none(),
            "something was written outside DST"
        );
        assert!(
            !self.dst.join(".vsha/web/tmp").exists(),
            "round leftovers remain"
        );
        assert!(!Path::new("/etc/x").exists());
    }
}

fn start() -> Vec<Frame> {
    vec![hello(), Frame::HaveManifest, Frame::Begin]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_are_refused() {
    init_tracing();
    let fx = fixture().await;
    let out = fx.outside.to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            enc(&[
                start(),
                vec![Frame::Put {
                    entry: file("../x", b"evil"),
                    source: Source::Data,
                }],
            ]
            .concat()),
            "'..' component",
        ),
        (
            "absolute",
            enc(&[
                start(),
                vec![Frame::Put {
                    entry: file("/etc/x", b"evil"),
                    source: Source::Data,
                }],
            ]
            .concat()),
            "absolute path",
        ),
        (
            "delete-dotdot",
            enc(&[start(), vec![Frame::Delete(b"a/../../x".to_vec())]].concat()),
            "'..' component",
        ),
        (
            "write-through-symlink",
            enc(&[
                start(),
                vec![
                    Frame::Put {
                        entry: dir(""),
                        source: Source::None,
                    },
                    Frame::Put {
                        entry: {
                            let mut l = Entry::new(b"l".to_vec(), Kind::Symlink);
                            l.target = out.as_bytes().to_vec();
                            l.mode = 0o777;
                            l
                        },
                        source: Source::None,
                    },
                    Frame::Put {
                        entry: file("l/x", b"evil"),
                        source: Source::Data,
                    },
                    Frame::Data(b"evil".to_vec()),
                    Frame::FileEnd(*blake3::hash(b"evil").as_bytes()),
                ],
            ]
            .concat()),
            "not a directory",
        ),
        (
            "huge-length",
            [enc(&start()), vec![0xff, 0xff, 0xff, 0x7f, 14]].concat(),
            "exceeds the limit",
        ),
        (
            "truncated",
            {
                let mut b = enc(&[
                    start(),
                    vec![
                        Frame::Put {
                            entry: file("z", b"0123456789"),
                            source: Source::Data,
                        },
                        Frame::Data(b"01234".to_vec()),
                    ],
                ]
                .concat());
                let d = Frame::Data(b"56789".to_vec()).encode();
                b.extend_from_slice(&d[..d.len() - 2]);
                b
            },
            "truncated",
        ),
        (
            "flipped-bit-in-data",
            enc(&[
                start(),
                vec![
                    Frame::Put {
                        entry: file("z", b"hello"),
                        source: Source::Data,
                    },
                    Frame::Data(b"hellp".to_vec()),
                    Frame::FileEnd(*blake3::hash(b"hello").as_bytes()),
                ],
            ]
            .concat()),
            "does not match its declared blake3",
        ),
        (
            "bad-digest",
            enc(&[
                start(),
                vec![Frame::End {
                    digest: [9; 32],
                    count: 5,
                }],
            ]
            .concat()),
            "tree digest mismatch",
        ),
        (
            "more-data-than-declared",
            enc(&[
                start(),
                vec![
                    Frame::Put {
                        entry: file("z", b"abc"),
                        source: Source::Data,
                    },
                    Frame::Data(b"abcdef".to_vec()),
                ],
            ]
            .concat()),
            "more data than its declared size",
        ),
        (
            "out-of-order",
            enc(&[
                start(),
                vec![
                    Frame::Put {
                        entry: dir("b"),
                        source: Source::None,
                    },
                    Frame::Put {
                        entry: dir("a"),
                        source: Source::None,
                    },
                ],
            ]
            .concat()),
            "out of order",
        ),
        (
            "delete-missing",
            enc(&[start(), vec![Frame::Delete(b"nope".to_vec())]].concat()),
            "does not hold",
        ),
        (
            "bad-name",
            enc(&[Frame::Hello {
                name: "../web".into(),
                token: vec![],
                flags: 0,
            }]),
            "refused name",
        ),
        (
            "delta-copy-out-of-range",
            enc(&[
                start(),
                vec![
                    Frame::Put {
                        entry: file("etc/passwd", b"x"),
                        source: Source::Delta(b"etc/passwd".to_vec()),
                    },
                    Frame::Copy {
                        start: 0,
                        count: 1000,
                    },
                ],
            ]
            .concat()),
            "delta copies block",
        ),
        ("not-a-peer", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "refused"),
    ];
    for (name, bytes, want) in cases {
        let (r, replies) = raw(fx.store.clone(), bytes).await;
        let err = r.expect_err(name);
        let msg = err.to_string();
        assert!(
            msg.contains(want),
            "{name}: error {msg:?} does not say {want:?}"
        );
        if !matches!(err, SyncError::Truncated(_) | SyncError::Stream(_)) {
            assert!(
                replies.iter().any(|f| matches!(f, Frame::Refused(_))),
                "{name}: no Refused frame sent"
            );
        }
        fx.intact();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&t.path().join("dst"), 2).unwrap());
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let st = store.clone();
    let recv =
        tokio::spawn(async move { vsha_sync::receive(st, b, Some(b"secret".to_vec())).await });
    a.write_all(
        &Frame::Hello {
            name: "web".into(),
            token: b"guess".to_vec(),
            flags: 0,
        }
        .encode(),
    )
    .await
    .unwrap();
    let err = recv.await.unwrap().unwrap_err();
    assert!(matches!(err, SyncError::BadToken), "{err}");
    assert!(store.current("web").unwrap().is_none());
}

/// Record what a real sender sends for an initial round (the receiver's
/// answers to an empty store are fixed), then replay it with random bit
/// flips: each replay is refused, or commits a tree exactly equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bit_flips_never_corrupt_a_snapshot() {
    init_tracing();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write(&src.join("etc/passwd"), b"root:x:0:0\n");
    write(&src.join("bin/sh"), &[7u8; 5000]);
    std::os::unix::fs::symlink("sh", src.join("bin/ash")).unwrap();
    std::fs::hard_link(src.join("bin/sh"), src.join("bin/bash")).unwrap();
    let (a, mut b) = tokio::io::duplex(8 << 20);
    let send = tokio::spawn(vsha_sync::send(
        a,
        src.clone(),
        "web".into(),
        None,
        Default::default(),
        Default::default(),
    ));
    let mut rec = Vec::new();
    while let Some((f, _)) = read_frame(&mut b).await.unwrap() {
        rec.extend(f.encode());
        match f {
            Frame::Hello { .. } => b
                .write_all(
                    &Frame::Welcome {
                        digest: [0; 32],
                        seq: 0,
                    }
                    .encode(),
                )
                .await
                .unwrap(),
            Frame::End { .. } => {
                b.write_all(
                    &Frame::Committed {
                        seq: 1,
                        unified_bytes: 0,
                    }
                    .encode(),
                )
                .await
                .unwrap();
                break;
            }
            _ => {}
        }
    }
    send.await.unwrap().0.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut refused = 0;
    for i in 0..40 {
        let dst = t.path().join(format!("dst{i}"));
        let store = Arc::new(Store::open(&dst, 2).unwrap());
        let mut bytes = rec.clone();
        let bit = rng.gen_range(0..bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let (r, _) = raw(store.clone(), bytes).await;
        if r.is_err() {
            refused += 1;
        }
        for name in store.names().unwrap() {
            assert_same(&src, &dst.join(&name));
        }
        assert!(!dst.join(".vsha/web/tmp").exists());
        std::fs::remove_dir_all(&dst).unwrap();
    }
    assert!(
        refused >= 30,
        "only {refused} of 40 flipped streams were refused"
    );
    // The unflipped recording commits and is exact.
    let dst = t.path().join("dst-clean");
    let store = Arc::new(Store::open(&dst, 2).unwrap());
    raw(store, rec).await.0.unwrap();
    assert_same(&src, &dst.join("web"));
}
