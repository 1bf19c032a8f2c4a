//! A short cache of job views, so that polling pages cost S3 little: however many pages
//! ask for one job, one refresh runs at a time for it and its answer serves every ask
//! until it goes stale; a final answer (the job is over) is kept until room is needed.
//!
//! Hostile input: the keys are job ids that passed `is_job_id` and came from a handle or
//! an operator, and the map holds at most `capacity` of them: when full, every entry not
//! being refreshed is dropped (a later ask only refreshes again). A refresh that panics
//! or is cancelled leaves its entry empty, so the next ask refreshes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How long a refreshed value serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fresh {
    /// This long.
    For(Duration),
    /// For good: the value can no longer change.
    Final,
}

struct Entry<V> {
    value: V,
    until: Option<Instant>,
}

type Slot<V> = Arc<tokio::sync::Mutex<Option<Entry<V>>>>;

pub(crate) struct ViewCache<V> {
    slots: Mutex<HashMap<String, Slot<V>>>,
    capacity: usize,
}

impl<V: Clone> ViewCache<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        ViewCache {
            slots: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The value for `key`: the cached one while fresh, else what `refresh` gives (one
    /// refresh at a time per key; the others wait for it and share its answer).
    ///
    /// Cancel safety: cancelling drops this caller's wait only; a refresh cancelled
    /// midway stores nothing.
    pub(crate) async fn get<F, Fut>(&self, key: &str, refresh: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = (V, Fresh)>,
    {
        let slot = self.slot(key);
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref()
            && e.until.is_none_or(|until| Instant::now() < until)
        {
            return e.value.clone();
        }
        let (value, fresh) = refresh().await;
        *entry = Some(Entry {
            value: value.clone(),
            until: match fresh {
                Fresh::For(ttl) => Some(Instant::now() + ttl),
                Fresh::Final => None,
            },
        });
        value
    }

    fn slot(&self, key: &str) -> Slot<V> {
        let mut slots = self
            .slots
            .lock()
            .expect("the cache's lock is never poisoned");
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            // Those being refreshed stay (their waiters share them); the rest go.
            slots.retain(|_, slot| slot.try_lock().is_err());
        }
        let slot: Slot<V> = Arc::new(tokio::sync::Mutex::new(None));
        slots.insert(key.to_string(), slot.clone());
        slot
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().expect("not poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn counted(calls: &AtomicU32, fresh: Fresh) -> (u32, Fresh) {
        // A refresh takes a while, as an S3 request does.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (calls.fetch_add(1, Ordering::SeqCst) + 1, fresh)
    }

    #[tokio::test(start_paused = true)]
    async fn many_askers_share_one_refresh_until_it_goes_stale() {
        let cache = Arc::new(ViewCache::new(16));
        let calls = Arc::new(AtomicU32::new(0));
        let ttl = Fresh::For(Duration::from_secs(5));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache.get("job", || counted(&calls, ttl)).await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.expect("no panic"), 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(cache.get("job", || counted(&calls, ttl)).await, 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(cache.get("job", || counted(&calls, ttl)).await, 2);
        // Another job has its own entry.
        assert_eq!(cache.get("other", || counted(&calls, ttl)).await, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_value_is_kept() {
        let cache = ViewCache::new(16);
        let calls = AtomicU32::new(0);
        assert_eq!(cache.get("job", || counted(&calls, Fresh::Final)).await, 1);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(cache.get("job", || counted(&calls, Fresh::Final)).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_refresh_stores_nothing_and_a_full_cache_makes_room() {
        let cache = ViewCache::new(2);
        let calls = AtomicU32::new(0);
        let ttl = Fresh::For(Duration::from_secs(5));
        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            cache.get("job", || counted(&calls, ttl)),
        )
        .await;
        assert!(cut.is_err());
        assert_eq!(cache.get("job", || counted(&calls, ttl)).await, 1);
        cache.get("b", || counted(&calls, ttl)).await;
        cache.get("c", || counted(&calls, ttl)).await;
        assert!(cache.len() <= 2, "{}", cache.len());
    }
}
