// SPDX-License-Identifier: Apache-2.0
//! Rate-limited Warning events.
//!
//! A reconciler retries a failing object with backoff, every few seconds; recording a Warning
//! event on every try would fill the event store with copies of one message. Providers ask a
//! [`WarningGate`] first and record the event only when it lets the warning through.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

/// Lets the same warning under the same key (an object, or an object and a reason) through at
/// most once per interval; a different message under that key goes through at once.
#[derive(Debug)]
pub struct WarningGate<K> {
    interval: Duration,
    /// The last warning let through per key: its message and when.
    last: Mutex<HashMap<K, (String, Instant)>>,
}

impl<K: Eq + Hash> WarningGate<K> {
    /// A gate that repeats a warning after `interval`.
    pub fn new(interval: Duration) -> Self {
        WarningGate {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `message` under `key` is to be reported now: not when the same message was let
    /// through under that key within the interval. When it is, the gate remembers it.
    pub fn admit(&self, key: K, message: &str) -> bool {
        let mut last = self.lock();
        if let Some((previous, at)) = last.get(&key)
            && previous == message
            && at.elapsed() < self.interval
        {
            return false;
        }
        last.insert(key, (message.to_string(), Instant::now()));
        true
    }

    /// Forgets `key`'s last warning (its object recovered or is gone): the next one goes through.
    pub fn forget<Q: Eq + Hash + ?Sized>(&self, key: &Q)
    where
        K: Borrow<Q>,
    {
        self.lock().remove(key);
    }

    /// Forgets the last warning of every key for which `keep` is false.
    pub fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        self.lock().retain(|key, _| keep(key));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (String, Instant)>> {
        // The map is a cache of hints; a panic elsewhere cannot leave it inconsistent.
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_held_back_until_the_message_changes_or_is_forgotten() {
        let gate = WarningGate::new(Duration::from_secs(300));
        assert!(gate.admit("a", "down"));
        assert!(!gate.admit("a", "down"));
        assert!(gate.admit("b", "down"));
        assert!(gate.admit("a", "still down"));
        gate.forget("a");
        assert!(gate.admit("a", "still down"));
        gate.retain(|key| *key != "b");
        assert!(gate.admit("b", "down"));
        let eager = WarningGate::new(Duration::ZERO);
        assert!(eager.admit("a", "down") && eager.admit("a", "down"));
    }
}
