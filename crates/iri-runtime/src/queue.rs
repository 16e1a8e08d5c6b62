// SPDX-License-Identifier: Apache-2.0
//! A keyed reconcile queue: de-duplicated keys, N workers, exponential backoff on error, and a
//! periodic resync.
//!
//! The semantics are client-go's workqueue, which controllers have relied on for years: a key is
//! never processed by two workers at once; a key added while it is being processed is processed
//! again afterwards (so no change is lost); a key added many times before a worker picks it up is
//! processed once.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt::Display,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// What a successful reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Converged; wait for the next change or resync.
    Done,
    /// Not converged yet (e.g. waiting for a VM to boot): look again after this long.
    RequeueAfter(Duration),
}

/// Tuning of a [`ReconcileQueue`].
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Name in logs and metrics, e.g. `machine`.
    pub name: String,
    /// Backoff after the first failure; doubles on each further failure of the same key.
    pub base_backoff: Duration,
    /// Upper bound of the backoff.
    pub max_backoff: Duration,
}

impl QueueOptions {
    /// Defaults: 100 ms doubling up to 5 minutes.
    pub fn named(name: impl Into<String>) -> Self {
        QueueOptions {
            name: name.into(),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(300),
        }
    }
}

struct State<K> {
    queue: VecDeque<K>,
    /// Keys that need processing (queued, or re-added while processing).
    dirty: HashSet<K>,
    processing: HashSet<K>,
    failures: HashMap<K, u32>,
    shut_down: bool,
}

struct Inner<K> {
    options: QueueOptions,
    state: Mutex<State<K>>,
    wake: Notify,
}

/// A keyed work queue feeding reconcile workers. Cloning shares the queue.
pub struct ReconcileQueue<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for ReconcileQueue<K> {
    fn clone(&self) -> Self {
        ReconcileQueue {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Clone + Eq + Hash + Send + Display + 'static> ReconcileQueue<K> {
    /// An empty queue.
    pub fn new(options: QueueOptions) -> Self {
        ReconcileQueue {
            inner: Arc::new(Inner {
                options,
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    dirty: HashSet::new(),
                    processing: HashSet::new(),
                    failures: HashMap::new(),
                    shut_down: false,
                }),
                wake: Notify::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<K>> {
        // A panic while holding the lock cannot leave the state inconsistent (every mutation is a
        // single collection operation), so a poisoned lock is safe to reuse.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for `key` to be reconciled. Cheap and idempotent.
    pub fn add(&self, key: K) {
        let mut state = self.state();
        if state.shut_down || !state.dirty.insert(key.clone()) {
            return;
        }
        if !state.processing.contains(&key) {
            state.queue.push_back(key);
            drop(state);
            self.inner.wake.notify_one();
        }
    }

    /// Adds `key` after `delay` (a timer task; cheap enough for requeues and backoff).
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.add(key);
        });
    }

    /// Keys waiting for a worker (not counting those being processed).
    pub fn len(&self) -> usize {
        self.state().queue.len()
    }

    /// Whether no key is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops handing out keys; workers finish their current key and return.
    pub fn shut_down(&self) {
        self.state().shut_down = true;
        self.inner.wake.notify_waiters();
    }

    /// The next key, or `None` once shut down.
    async fn next(&self) -> Option<K> {
        loop {
            let notified = self.inner.wake.notified();
            {
                let mut state = self.state();
                if state.shut_down {
                    return None;
                }
                if let Some(key) = state.queue.pop_front() {
                    state.dirty.remove(&key);
                    state.processing.insert(key.clone());
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// Marks `key` finished; if it was added again meanwhile, queues it again.
    fn done(&self, key: &K) {
        let mut state = self.state();
        state.processing.remove(key);
        if state.dirty.contains(key) && !state.shut_down {
            state.queue.push_back(key.clone());
            drop(state);
            self.inner.wake.notify_one();
        }
    }

    /// The backoff for the `failures`-th consecutive failure.
    fn backoff(&self, failures: u32) -> Duration {
        let options = &self.inner.options;
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(31));
        options
            .base_backoff
            .saturating_mul(factor)
            .min(options.max_backoff)
    }

    /// Runs `workers` concurrent workers until [`ReconcileQueue::shut_down`]. A failed reconcile
    /// is logged, counted in `metrics`, and retried with exponential backoff; success resets the
    /// key's backoff.
    pub async fn run<F, Fut, E>(&self, workers: usize, metrics: Option<Arc<Metrics>>, reconcile: F)
    where
        F: Fn(K) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Outcome, E>> + Send,
        E: Display,
    {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let queue = self.clone();
            let reconcile = reconcile.clone();
            let metrics = metrics.clone();
            tasks.spawn(async move {
                while let Some(key) = queue.next().await {
                    let result = reconcile(key.clone()).await;
                    queue.done(&key);
                    match result {
                        Ok(outcome) => {
                            queue.state().failures.remove(&key);
                            if let Outcome::RequeueAfter(delay) = outcome {
                                queue.add_after(key, delay);
                            }
                        }
                        Err(err) => {
                            let failures = {
                                let mut state = queue.state();
                                let n = state.failures.entry(key.clone()).or_insert(0);
                                *n = n.saturating_add(1);
                                *n
                            };
                            let delay = queue.backoff(failures);
                            if let Some(metrics) = &metrics {
                                metrics.reconcile_error(&queue.inner.options.name);
                            }
                            tracing::warn!(
                                queue = %queue.inner.options.name, id = %key, failures, retry_in = ?delay,
                                "reconcile failed: {err}"
                            );
                            queue.add_after(key, delay);
                        }
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Every `period`, adds every key `keys` returns: the resync that repairs drift the change
    /// feed cannot see (a VM that died, a file someone removed).
    pub fn spawn_resync(&self, period: Duration, keys: impl Fn() -> Vec<K> + Send + 'static) {
        let queue = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if queue.state().shut_down {
                    return;
                }
                for key in keys() {
                    queue.add(key);
                }
            }
        });
    }

    /// Exports this queue's depth as `iri_reconcile_queue_depth{queue}`.
    pub fn register_metrics(&self, metrics: &Metrics) {
        let queue = self.clone();
        let name = self.inner.options.name.clone();
        metrics.register_gauge(
            "iri_reconcile_queue_depth",
            "Keys waiting for a reconcile worker",
            move || vec![(vec![("queue".to_string(), name.clone())], queue.len() as i64)],
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn queue() -> ReconcileQueue<String> {
        ReconcileQueue::new(QueueOptions {
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            ..QueueOptions::named("test")
        })
    }

    #[tokio::test]
    async fn deduplicates_pending_keys() {
        let q = queue();
        for _ in 0..5 {
            q.add("a".to_string());
        }
        q.add("b".to_string());
        assert_eq!(q.len(), 2);
    }

    #[tokio::test]
    async fn never_runs_a_key_twice_at_once_and_loses_no_add() {
        let q = queue();
        let running = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let (r, n) = (running.clone(), runs.clone());
        let worker = {
            let q = q.clone();
            tokio::spawn(async move {
                q.run(4, None, move |_key: String| {
                    let (r, n) = (r.clone(), n.clone());
                    async move {
                        assert_eq!(
                            r.fetch_add(1, Ordering::SeqCst),
                            0,
                            "concurrent reconcile of one key"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        r.fetch_sub(1, Ordering::SeqCst);
                        n.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, String>(Outcome::Done)
                    }
                })
                .await
            })
        };
        q.add("a".to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Added while processing: must run once more afterwards.
        q.add("a".to_string());
        q.add("a".to_string());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        q.shut_down();
        worker.await.unwrap();
    }

    #[tokio::test]
    async fn retries_failures_with_growing_backoff() {
        let q = queue();
        let metrics = Arc::new(Metrics::new());
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let a = attempts.clone();
        let worker = {
            let q = q.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                q.run(1, Some(metrics), move |_key: String| {
                    let a = a.clone();
                    async move {
                        let mut a = a.lock().unwrap();
                        a.push(tokio::time::Instant::now());
                        if a.len() < 4 {
                            Err("backend down")
                        } else {
                            Ok(Outcome::Done)
                        }
                    }
                })
                .await
            })
        };
        q.add("a".to_string());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let attempts = attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 4, "three failures, then success, then quiet");
        let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= Duration::from_millis(10));
        assert!(gaps[1] >= Duration::from_millis(20));
        assert!(gaps[2] >= Duration::from_millis(40));
        assert!(
            metrics
                .encode()
                .contains(r#"iri_reconcile_errors_total{queue="test"} 3"#)
        );
        q.shut_down();
        worker.await.unwrap();
    }

    #[tokio::test]
    async fn requeue_after_and_resync_bring_keys_back() {
        let q = queue();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let worker = {
            let q = q.clone();
            tokio::spawn(async move {
                q.run(2, None, move |key: String| {
                    let s = s.clone();
                    async move {
                        let mut s = s.lock().unwrap();
                        s.push(key.clone());
                        let first = s.iter().filter(|k| **k == key).count() == 1;
                        Ok::<_, String>(if key == "pending" && first {
                            Outcome::RequeueAfter(Duration::from_millis(20))
                        } else {
                            Outcome::Done
                        })
                    }
                })
                .await
            })
        };
        q.add("pending".to_string());
        q.spawn_resync(Duration::from_millis(30), || vec!["resynced".to_string()]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.iter().filter(|k| *k == "pending").count(), 2, "{seen:?}");
        assert!(seen.iter().filter(|k| *k == "resynced").count() >= 2, "{seen:?}");
        q.shut_down();
        worker.await.unwrap();
    }
}
