//! The clocks the failover code reads. Leases are measured on
//! CLOCK_MONOTONIC, which every process of the machine shares, so the agent
//! can hand a deadline to its guard process.

/// CLOCK_MONOTONIC in milliseconds.
pub fn mono_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1000)
            .saturating_add(ts.tv_nsec() as u64 / 1_000_000),
        // Cannot happen on Linux; 0 means "no lease" everywhere.
        Err(_) => 0,
    }
}

/// Wall time in milliseconds since the epoch (replica ages, events).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
