//! raft-rs logs through slog; this drain forwards every record to tracing
//! with its key-value pairs (term, index, raft_id...) kept in the message.

use std::fmt::Write as _;
use tracing::Level;

pub struct TracingDrain;

struct KvFmt(String);

impl slog::Serializer for KvFmt {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

fn level(l: slog::Level) -> Level {
    match l {
        slog::Level::Critical | slog::Level::Error => Level::ERROR,
        slog::Level::Warning => Level::WARN,
        slog::Level::Info => Level::INFO,
        slog::Level::Debug => Level::DEBUG,
        slog::Level::Trace => Level::TRACE,
    }
}

fn enabled(l: Level) -> bool {
    match l {
        Level::ERROR => tracing::enabled!(target: "raft", Level::ERROR),
        Level::WARN => tracing::enabled!(target: "raft", Level::WARN),
        Level::INFO => tracing::enabled!(target: "raft", Level::INFO),
        Level::DEBUG => tracing::enabled!(target: "raft", Level::DEBUG),
        Level::TRACE => tracing::enabled!(target: "raft", Level::TRACE),
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, r: &slog::Record, vals: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let lvl = level(r.level());
        // Formatting the key-values is the costly part: skip it when filtered.
        if !enabled(lvl) {
            return Ok(());
        }
        let mut kv = KvFmt(String::new());
        let _ = slog::KV::serialize(&r.kv(), r, &mut kv);
        let _ = slog::KV::serialize(vals, r, &mut kv);
        let (msg, kv, module) = (r.msg(), kv.0, r.module());
        match lvl {
            Level::ERROR => tracing::error!(target: "raft", module, "{msg}{kv}"),
            Level::WARN => tracing::warn!(target: "raft", module, "{msg}{kv}"),
            Level::INFO => tracing::info!(target: "raft", module, "{msg}{kv}"),
            Level::DEBUG => tracing::debug!(target: "raft", module, "{msg}{kv}"),
            Level::TRACE => tracing::trace!(target: "raft", module, "{msg}{kv}"),
        }
        Ok(())
    }
}

pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}
