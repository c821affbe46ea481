//! Compare two local trees and list every difference.

use std::fmt;
use std::path::Path;

use crate::entry::{display, key_cmp, Entry, Kind};
use crate::error::Result;
use crate::scan::scan;

/// One difference between tree A and tree B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Only in A.
    OnlyInA(String),
    /// Only in B.
    OnlyInB(String),
    /// Same path, another attribute value.
    Attr {
        /// Path.
        path: String,
        /// Which attribute.
        what: &'static str,
        /// Value in A.
        a: String,
        /// Value in B.
        b: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::OnlyInA(p) => write!(f, "only in A: {p}"),
            Difference::OnlyInB(p) => write!(f, "only in B: {p}"),
            Difference::Attr { path, what, a, b } => {
                write!(f, "{path}: {what} differs (A: {a}, B: {b})")
            }
        }
    }
}

fn attrs(a: &Entry, b: &Entry, out: &mut Vec<Difference>) {
    let p = if a.path.is_empty() {
        ".".to_string()
    } else {
        display(&a.path)
    };
    let mut d = |what, x: String, y: String| {
        if x != y {
            out.push(Difference::Attr {
                path: p.clone(),
                what,
                a: x,
                b: y,
            });
        }
    };
    d("type", format!("{:?}", a.kind), format!("{:?}", b.kind));
    if a.kind != b.kind {
        return;
    }
    if a.kind != Kind::Symlink {
        d("mode", format!("{:o}", a.mode), format!("{:o}", b.mode));
    }
    d("uid", a.uid.to_string(), b.uid.to_string());
    d("gid", a.gid.to_string(), b.gid.to_string());
    d(
        "mtime",
        format!("{}.{:09}", a.mtime, a.mtime_nsec),
        format!("{}.{:09}", b.mtime, b.mtime_nsec),
    );
    if a.kind == Kind::File {
        d("size", a.size.to_string(), b.size.to_string());
        d(
            "content",
            crate::entry::hex(&a.hash),
            crate::entry::hex(&b.hash),
        );
    }
    d("symlink target", display(&a.target), display(&b.target));
    d("device", a.rdev.to_string(), b.rdev.to_string());
    let xs = |e: &Entry| {
        e.xattrs
            .iter()
            .map(|(n, v)| {
                format!(
                    "{}={}",
                    display(n),
                    v.iter().map(|c| format!("{c:02x}")).collect::<String>()
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    d("xattrs", xs(a), xs(b));
    d(
        "hardlink",
        a.link.as_deref().map(display).unwrap_or_default(),
        b.link.as_deref().map(display).unwrap_or_default(),
    );
}

/// Scan both trees and list every difference (types, modes, owners, mtimes
/// to the nanosecond, sizes, content hashes, symlink targets, device numbers,
/// xattrs, hardlink groups). Empty: the trees are equal.
pub fn verify(a: &Path, b: &Path) -> Result<Vec<Difference>> {
    // A tree root may be given as a symlink (DIR/NAME of a receiver).
    let a = std::fs::canonicalize(a).map_err(|e| crate::error::SyncError::Io {
        op: "resolve",
        path: a.into(),
        source: e,
    })?;
    let b = std::fs::canonicalize(b).map_err(|e| crate::error::SyncError::Io {
        op: "resolve",
        path: b.into(),
        source: e,
    })?;
    let (ia, _) = scan(&a, None)?;
    let (ib, _) = scan(&b, None)?;
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < ia.entries.len() || j < ib.entries.len() {
        match (ia.entries.get(i), ib.entries.get(j)) {
            (Some(x), Some(y)) => match key_cmp(&x.path, &y.path) {
                std::cmp::Ordering::Less => {
                    out.push(Difference::OnlyInA(display(&x.path)));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(Difference::OnlyInB(display(&y.path)));
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    attrs(x, y, &mut out);
                    i += 1;
                    j += 1;
                }
            },
            (Some(x), None) => {
                out.push(Difference::OnlyInA(display(&x.path)));
                i += 1;
            }
            (None, Some(y)) => {
                out.push(Difference::OnlyInB(display(&y.path)));
                j += 1;
            }
            (None, None) => break,
        }
    }
    Ok(out)
}
