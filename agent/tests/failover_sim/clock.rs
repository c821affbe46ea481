//! A node's monotonic clock: an offset and a rate of 1 + ppm / 10^6 against
//! the simulation's global time.

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub offset: u64,
    pub ppm: i64,
}

impl Clock {
    /// The clock's reading at global time `t`.
    pub fn at(&self, t: u64) -> u64 {
        let skew = (t as i128) * (self.ppm as i128) / 1_000_000;
        (self.offset as i128 + t as i128 + skew) as u64
    }

    /// The first global time, not before `now`, at which the clock reads at
    /// least `reading`.
    pub fn when(&self, reading: u64, now: u64) -> u64 {
        if self.at(now) >= reading {
            return now;
        }
        let rel = reading.saturating_sub(self.offset) as i128;
        let est = (rel * 1_000_000 / (1_000_000 + self.ppm as i128)) as u64;
        let mut t = est.saturating_sub(2).max(now);
        while self.at(t) < reading {
            t += 1;
        }
        t
    }
}
