// SPDX-License-Identifier: Apache-2.0
//! Per-bucket request rate limits from the bucket class.
//!
//! IRI's bucket class has two numbers, `tps` and `iops`. Here `tps` limits every S3 request to
//! the bucket (transactions per second) and `iops` limits the requests that move object data
//! (GET, PUT, copy, upload part). Each is a token bucket that holds at most one second's worth
//! of tokens, so a quiet bucket may burst to its limit and is then held to it. A request over
//! the limit is refused with S3's `SlowDown` (HTTP 503), which S3 clients back off and retry on.

use std::{
    sync::{Mutex, PoisonError},
    time::Instant,
};

/// Limits in requests per second; 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// All requests per second (`tps`).
    pub requests: u64,
    /// Data requests per second (`iops`).
    pub data_requests: u64,
}

#[derive(Debug)]
struct TokenBucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.at = now;
    }
}

/// The limiter of one bucket.
#[derive(Debug, Default)]
pub struct Limiter {
    state: Mutex<Option<(TokenBucket, TokenBucket)>>,
}

impl Limiter {
    /// Applies `limits` (from the bucket's class); a change takes effect at once.
    pub fn set(&self, limits: Limits) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let unchanged = state
            .as_ref()
            .is_some_and(|(all, data)| all.rate == limits.requests && data.rate == limits.data_requests);
        if !unchanged {
            *state = Some((
                TokenBucket::new(limits.requests),
                TokenBucket::new(limits.data_requests),
            ));
        }
    }

    /// Takes a token for one request (`data`: it moves object data); false = over the limit.
    pub fn admit(&self, data: bool) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((all, data_bucket)) = state.as_mut() else {
            return true;
        };
        let now = Instant::now();
        all.refill(now);
        data_bucket.refill(now);
        let all_ok = all.rate == 0 || all.tokens >= 1.0;
        let data_ok = !data || data_bucket.rate == 0 || data_bucket.tokens >= 1.0;
        if !(all_ok && data_ok) {
            return false;
        }
        if all.rate != 0 {
            all.tokens -= 1.0;
        }
        if data && data_bucket.rate != 0 {
            data_bucket.tokens -= 1.0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_requests_to_the_rate() {
        let limiter = Limiter::default();
        assert!((0..1000).all(|_| limiter.admit(true)), "no limits before set");
        limiter.set(Limits {
            requests: 5,
            data_requests: 0,
        });
        let admitted = (0..20).filter(|_| limiter.admit(false)).count();
        assert_eq!(admitted, 5, "a one-second burst, then refusals");
        std::thread::sleep(std::time::Duration::from_millis(450));
        let later = (0..20).filter(|_| limiter.admit(false)).count();
        assert!((1..=3).contains(&later), "about 2 tokens refilled, got {later}");
    }

    #[test]
    fn data_limit_applies_to_data_requests_only() {
        let limiter = Limiter::default();
        limiter.set(Limits {
            requests: 0,
            data_requests: 2,
        });
        assert_eq!((0..10).filter(|_| limiter.admit(true)).count(), 2);
        assert_eq!((0..10).filter(|_| limiter.admit(false)).count(), 10);
    }
}
