//! `calls_per_minute`: a token bucket per agent. It holds a minute's worth of
//! calls, so a burst up to the limit passes and a sustained rate above it does
//! not.

use std::sync::Mutex;
use std::time::Instant;

pub struct RateLimiter {
    state: Mutex<Option<(f64, Instant)>>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            state: Mutex::new(None),
        }
    }
}

impl RateLimiter {
    /// Takes one call's token if the agent is under `per_minute`.
    pub fn try_acquire(&self, per_minute: u64) -> bool {
        let now = Instant::now();
        let capacity = per_minute as f64;
        // A poisoned lock means a panic while holding it, which the bucket
        // arithmetic cannot cause; refuse rather than guess.
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let (tokens, last) = state.get_or_insert((capacity, now));
        let refill = now.duration_since(*last).as_secs_f64() * capacity / 60.0;
        *tokens = (*tokens + refill).min(capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_up_to_the_limit_then_refuses() {
        let r = RateLimiter::default();
        assert!((0..5).all(|_| r.try_acquire(5)));
        assert!(!r.try_acquire(5));
    }
}
