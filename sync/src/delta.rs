//! Block deltas for large changed files: rsync's algorithm (a rolling weak
//! checksum over every byte offset, confirmed by a strong hash per block).
//! The receiver sends `(weak, strong)` for each block of its copy; the sender
//! slides over its file and emits `Copy` for blocks the receiver has and
//! literal bytes for the rest. The result is verified with the whole-file
//! blake3 the sender declared, so the 64-bit strong sums need not be
//! collision-proof.

use std::collections::HashMap;
use std::io::Read;

/// Files smaller than this are sent whole.
pub const DELTA_MIN: u64 = 256 << 10;

/// Block size for a file of `len` bytes: about sqrt(len) (rsync's choice,
/// balancing signature size against literal overhead), 2 KiB to 128 KiB,
/// and at most 256 Ki blocks so a signature fits one frame.
pub fn block_size(len: u64) -> u32 {
    let s = (len as f64).sqrt() as u64;
    let s = s.clamp(2048, 128 << 10).max(len / (256 << 10) + 1);
    (s.div_ceil(1024) * 1024) as u32
}

/// rsync's weak checksum of a block: two 16-bit sums.
pub fn weak(d: &[u8]) -> u32 {
    // b = sum of (n - i) * x_i, i.e. the running sum of a. Summed in
    // fixed 64-byte pieces (which the compiler vectorises): a piece adds
    // 64 times the previous a to b, plus its own weighted sum.
    let (mut a, mut b) = (0u32, 0u32);
    let mut pieces = d.chunks_exact(64);
    for c in &mut pieces {
        let (mut s, mut t) = (0u32, 0u32);
        for (j, &x) in c.iter().enumerate() {
            s += x as u32;
            t += (64 - j as u32) * x as u32;
        }
        b = b.wrapping_add(a.wrapping_mul(64)).wrapping_add(t);
        a = a.wrapping_add(s);
    }
    for &x in pieces.remainder() {
        a = a.wrapping_add(x as u32);
        b = b.wrapping_add(a);
    }
    (a & 0xffff) | (b << 16)
}

/// Strong sum of a block: the first 8 bytes of its blake3.
pub fn strong(d: &[u8]) -> u64 {
    let h = blake3::hash(d);
    let mut a = [0u8; 8];
    a.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(a)
}

/// Signature of a whole reader, block by block (the last block may be short).
pub fn signature<R: Read>(mut r: R, block: u32) -> std::io::Result<Vec<(u32, u64)>> {
    let b = block as usize;
    let per = (8 << 20) / b.max(1) + 1;
    let mut buf = vec![0u8; b * per];
    let mut out = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = r.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        use rayon::prelude::*;
        let sums: Vec<(u32, u64)> = buf[..n]
            .par_chunks(b)
            .map(|c| (weak(c), strong(c)))
            .collect();
        out.extend(sums);
        if n < buf.len() {
            break;
        }
    }
    Ok(out)
}

/// One delta instruction.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    /// Copy `count` blocks of the basis starting at `start`.
    Copy {
        /// First block.
        start: u32,
        /// Number of blocks.
        count: u32,
    },
    /// Literal bytes.
    Literal(Vec<u8>),
}

/// Compute the delta of `src` against a basis with signature `sums` (blocks of
/// `block` bytes, the basis being `basis_len` long), calling `emit` per op.
pub fn diff<R: Read, E: FnMut(Op) -> std::io::Result<()>>(
    mut src: R,
    block: u32,
    basis_len: u64,
    sums: &[(u32, u64)],
    max_literal: usize,
    mut emit: E,
) -> std::io::Result<()> {
    let b = block as usize;
    let full_blocks = (basis_len / block as u64) as usize;
    let tail_len = (basis_len % block as u64) as usize;
    let mut table: HashMap<u32, Vec<u32>> = HashMap::new();
    for (i, (w, _)) in sums.iter().enumerate().take(full_blocks) {
        table.entry(*w).or_default().push(i as u32);
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut eof = false;
    let mut pos = 0usize; // window start
    let mut lit = 0usize; // literal start
    let mut pending: Option<(u32, u32)> = None;
    // The block expected next (the basis' block after the last match; at
    // the start, its first): checked by strong sum alone, many at once.
    let mut next_expected: Option<u32> = Some(0);
    let mut have_weak = false;
    let (mut a, mut bb) = (0u32, 0u32);
    let refill = |buf: &mut Vec<u8>, eof: &mut bool, src: &mut R| -> std::io::Result<()> {
        let old = buf.len();
        buf.resize(old + (8 << 20), 0);
        let mut n = old;
        while n < buf.len() {
            let k = src.read(&mut buf[n..])?;
            if k == 0 {
                *eof = true;
                break;
            }
            n += k;
        }
        buf.truncate(n);
        Ok(())
    };
    let flush_copy = |pending: &mut Option<(u32, u32)>, emit: &mut E| -> std::io::Result<()> {
        if let Some((s, c)) = pending.take() {
            emit(Op::Copy { start: s, count: c })?;
        }
        Ok(())
    };
    loop {
        if buf.len() - pos < b && !eof {
            // Drop consumed bytes, keep the literal run and the window.
            let keep = lit.min(pos);
            buf.drain(..keep);
            pos -= keep;
            lit -= keep;
            refill(&mut buf, &mut eof, &mut src)?;
            continue;
        }
        if buf.len() - pos < b || full_blocks == 0 {
            break;
        }
        // Unchanged runs (the bulk of a large file changed in place): the
        // blocks following the last match are compared by strong sum, in
        // parallel, without rolling or looking up weak sums.
        if let Some(m) = next_expected.filter(|_| lit == pos && !have_weak) {
            use rayon::prelude::*;
            let room = (buf.len() - pos) / b;
            let k = room.min(full_blocks.saturating_sub(m as usize)).min(256);
            let ok: Vec<bool> = (0..k)
                .into_par_iter()
                .map(|t| strong(&buf[pos + t * b..pos + (t + 1) * b]) == sums[m as usize + t].1)
                .collect();
            let c = ok.iter().take_while(|x| **x).count();
            if c > 0 {
                pending = match pending {
                    Some((s, n)) if s + n == m => Some((s, n + c as u32)),
                    other => {
                        let mut p = other;
                        flush_copy(&mut p, &mut emit)?;
                        Some((m, c as u32))
                    }
                };
                next_expected = Some(m + c as u32);
                pos += c * b;
                lit = pos;
                continue;
            }
        }
        let win = &buf[pos..pos + b];
        if !have_weak {
            let w = weak(win);
            a = w & 0xffff;
            bb = w >> 16;
            have_weak = true;
        }
        let w = (a & 0xffff) | (bb << 16);
        let mut matched = None;
        if let Some(c) = table.get(&w) {
            let s = strong(win);
            let pick = |i: &u32| sums[*i as usize].1 == s;
            if let Some(n) = next_expected.filter(|n| c.contains(n) && pick(n)) {
                matched = Some(n);
            } else {
                matched = c.iter().copied().find(|i| pick(i));
            }
        }
        if let Some(m) = matched {
            if lit < pos {
                flush_copy(&mut pending, &mut emit)?;
                emit(Op::Literal(buf[lit..pos].to_vec()))?;
            }
            pending = match pending {
                Some((s, c)) if s + c == m => Some((s, c + 1)),
                other => {
                    let mut p = other;
                    flush_copy(&mut p, &mut emit)?;
                    Some((m, 1))
                }
            };
            next_expected = Some(m + 1);
            pos += b;
            lit = pos;
            have_weak = false;
        } else {
            // Roll one byte.
            let out = buf[pos] as u32;
            if pos + b < buf.len() {
                let inn = buf[pos + b] as u32;
                a = a.wrapping_sub(out).wrapping_add(inn) & 0xffff;
                bb = bb
                    .wrapping_sub((b as u32).wrapping_mul(out))
                    .wrapping_add(a)
                    & 0xffff;
            } else {
                have_weak = false;
            }
            pos += 1;
            if pos - lit >= max_literal {
                flush_copy(&mut pending, &mut emit)?;
                emit(Op::Literal(buf[lit..pos].to_vec()))?;
                lit = pos;
            }
        }
    }
    // Whatever is left: the basis' short last block, or literal.
    let rest = &buf[lit..];
    let tail_idx = full_blocks as u32;
    let from_pos = &buf[pos..];
    if tail_len > 0
        && from_pos.len() == tail_len
        && sums
            .get(tail_idx as usize)
            .is_some_and(|(w, s)| *w == weak(from_pos) && *s == strong(from_pos))
    {
        if lit < pos {
            flush_copy(&mut pending, &mut emit)?;
            emit(Op::Literal(buf[lit..pos].to_vec()))?;
        }
        pending = match pending {
            Some((s, c)) if s + c == tail_idx => Some((s, c + 1)),
            other => {
                let mut p = other;
                flush_copy(&mut p, &mut emit)?;
                Some((tail_idx, 1))
            }
        };
        flush_copy(&mut pending, &mut emit)?;
    } else {
        flush_copy(&mut pending, &mut emit)?;
        for c in rest.chunks(max_literal.max(1)) {
            emit(Op::Literal(c.to_vec()))?;
        }
    }
    Ok(())
}

/// Apply ops to a basis in memory (tests and documentation of the semantics).
pub fn apply_in_memory(basis: &[u8], block: u32, ops: &[Op]) -> Vec<u8> {
    let b = block as usize;
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Copy { start, count } => {
                let s = (*start as usize * b).min(basis.len());
                let e = ((*start + *count) as usize * b).min(basis.len());
                out.extend_from_slice(&basis[s..e]);
            }
            Op::Literal(l) => out.extend_from_slice(l),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn roundtrip(basis: &[u8], new: &[u8], block: u32) -> (Vec<u8>, usize) {
        let sums = signature(basis, block).unwrap();
        let mut ops = Vec::new();
        diff(new, block, basis.len() as u64, &sums, 1 << 20, |o| {
            ops.push(o);
            Ok(())
        })
        .unwrap();
        let lit = ops
            .iter()
            .map(|o| if let Op::Literal(l) = o { l.len() } else { 0 })
            .sum();
        (apply_in_memory(basis, block, &ops), lit)
    }

    #[test]
    fn weak_is_rsyncs_checksum() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for len in [0usize, 1, 63, 64, 65, 200, 2048, 4099, 32768] {
            let d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let (mut a, mut b) = (0u32, 0u32);
            let n = len as u32;
            for (i, &x) in d.iter().enumerate() {
                a = a.wrapping_add(x as u32);
                b = b.wrapping_add((n - i as u32).wrapping_mul(x as u32));
            }
            assert_eq!(weak(&d), (a & 0xffff) | (b << 16), "len {len}");
        }
    }

    #[test]
    fn weak_rolls() {
        let d: Vec<u8> = (0..100u32).map(|i| (i * 7 + 3) as u8).collect();
        let b = 16;
        let mut a = weak(&d[..b]) & 0xffff;
        let mut bb = weak(&d[..b]) >> 16;
        for p in 0..(d.len() - b) {
            let out = d[p] as u32;
            let inn = d[p + b] as u32;
            a = a.wrapping_sub(out).wrapping_add(inn) & 0xffff;
            bb = bb
                .wrapping_sub((b as u32).wrapping_mul(out))
                .wrapping_add(a)
                & 0xffff;
            assert_eq!(a | (bb << 16), weak(&d[p + 1..p + 1 + b]));
        }
    }

    #[test]
    fn deltas_reconstruct() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let basis: Vec<u8> = (0..300_000).map(|_| rng.gen()).collect();
        let block = 2048;
        // middle change
        let mut n1 = basis.clone();
        for b in &mut n1[100_000..104_000] {
            *b = rng.gen();
        }
        // insertion shifts everything after
        let mut n2 = basis[..5000].to_vec();
        n2.extend_from_slice(b"inserted bytes");
        n2.extend_from_slice(&basis[5000..]);
        // truncation, append, empty
        let n3 = basis[..123_457].to_vec();
        let mut n4 = basis.clone();
        n4.extend_from_slice(&[1, 2, 3]);
        for (n, max_lit) in [(&n1, 8192), (&n2, 4200), (&n3, 2048), (&n4, 2100)] {
            let (out, lit) = roundtrip(&basis, n, block);
            assert_eq!(&out, n);
            assert!(lit <= max_lit, "literal {lit}");
        }
        let (out, _) = roundtrip(&basis, &[], block);
        assert!(out.is_empty());
        let (out, _) = roundtrip(&[], &basis, block);
        assert_eq!(out, basis);
    }
}
