//! Health of one running vserver, haproxy-style: `fall` failed checks in a
//! row make it unhealthy, `rise` good ones in a row healthy again. Pure:
//! the node runtime runs the checks (TCP connect to IP:port, or a command
//! inside the context) and feeds the results in.

use crate::model::HealthCheck;

/// Defaults for fields left at 0.
pub const DEFAULT_INTERVAL_MS: u64 = 2000;
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    ok_run: u32,
    fail_run: u32,
    healthy: bool,
    last_failure: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    BecameUnhealthy { reason: String },
    BecameHealthy,
}

impl Tracker {
    /// Starts healthy: a fresh start gets `fall` chances.
    pub fn new(check: &HealthCheck) -> Tracker {
        Tracker {
            rise: if check.rise == 0 {
                DEFAULT_RISE
            } else {
                check.rise
            },
            fall: if check.fall == 0 {
                DEFAULT_FALL
            } else {
                check.fall
            },
            ok_run: 0,
            fail_run: 0,
            healthy: true,
            last_failure: String::new(),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    pub fn observe(&mut self, result: Result<(), String>) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.ok_run += 1;
                self.fail_run = 0;
                if !self.healthy && self.ok_run >= self.rise {
                    self.healthy = true;
                    return Some(Transition::BecameHealthy);
                }
            }
            Err(reason) => {
                self.fail_run += 1;
                self.ok_run = 0;
                self.last_failure = reason;
                if self.healthy && self.fail_run >= self.fall {
                    self.healthy = false;
                    return Some(Transition::BecameUnhealthy {
                        reason: format!(
                            "health check failed {} times in a row: {}",
                            self.fail_run, self.last_failure
                        ),
                    });
                }
            }
        }
        None
    }
}

pub fn interval_ms(c: &HealthCheck) -> u64 {
    if c.interval_ms == 0 {
        DEFAULT_INTERVAL_MS
    } else {
        u64::from(c.interval_ms)
    }
}

pub fn timeout_ms(c: &HealthCheck) -> u64 {
    if c.timeout_ms == 0 {
        DEFAULT_TIMEOUT_MS
    } else {
        u64::from(c.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rise: u32, fall: u32) -> HealthCheck {
        HealthCheck {
            tcp_port: 80,
            command: vec![],
            interval_ms: 0,
            timeout_ms: 0,
            rise,
            fall,
        }
    }

    #[test]
    fn fall_failures_in_a_row_then_rise_successes() {
        let mut t = Tracker::new(&check(2, 3));
        assert_eq!(t.observe(Err("refused".into())), None);
        assert_eq!(t.observe(Ok(())), None, "a success resets the run");
        assert_eq!(t.observe(Err("refused".into())), None);
        assert_eq!(t.observe(Err("refused".into())), None);
        match t.observe(Err("timed out".into())) {
            Some(Transition::BecameUnhealthy { reason }) => {
                assert!(
                    reason.contains("3 times") && reason.contains("timed out"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.observe(Err("refused".into())), None, "reported once");
        assert_eq!(t.observe(Ok(())), None);
        assert_eq!(t.observe(Ok(())), Some(Transition::BecameHealthy));
        assert!(t.healthy());
    }

    #[test]
    fn zero_fields_take_defaults() {
        let c = check(0, 0);
        let mut t = Tracker::new(&c);
        for _ in 0..DEFAULT_FALL - 1 {
            assert_eq!(t.observe(Err("x".into())), None);
        }
        assert!(t.observe(Err("x".into())).is_some());
        assert_eq!(interval_ms(&c), DEFAULT_INTERVAL_MS);
        assert_eq!(timeout_ms(&c), DEFAULT_TIMEOUT_MS);
    }
}
