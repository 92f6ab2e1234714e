//! Write combining for local sets that do not wait for an fsync.
//!
//! Two runtime threads that both write to a collection would otherwise meet
//! at its writer lock: one blocks the whole thread (and every connection on
//! it) in a futex while the other writes. Here, whoever finds nobody writing
//! becomes the *leader* and writes; a set arriving meanwhile is queued, and
//! its task waits without holding its thread. The leader writes whatever
//! queued up in one go per collection (one lock, one `pwrite` for many
//! connections' batches), answers each waiting set, and repeats until the
//! queue is empty.
//!
//! A set never waits for a leader that has stopped: leadership is released
//! before a last look at the queue, and a set queued just then takes the
//! lead itself (either its own attempt or the leader's last look sees it).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use dhrt_storage::{Error as StorageError, Store, Version};
use tokio::sync::oneshot;

type Answer = Result<Vec<Version>, StorageError>;

/// A queued set of one collection's entries, and who waits for it.
struct Job {
    collection: String,
    entries: Vec<(Bytes, Bytes)>,
    done: oneshot::Sender<Answer>,
}

/// How many rounds a leader writes for others before it hands the lead to
/// a task of its own, so that its own connection is not kept waiting by a
/// queue that never empties.
const MAX_ROUNDS: usize = 8;

/// The combining queue of one node.
#[derive(Default)]
pub(crate) struct Combiner {
    queue: Mutex<Vec<Job>>,
    leading: AtomicBool,
}

impl std::fmt::Debug for Combiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("leading", &self.leading.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn write(store: &Store, collection: &str, entries: &[(Bytes, Bytes)]) -> Answer {
    let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    store.set_many(collection, &refs)
}

impl Combiner {
    fn try_lead(&self) -> bool {
        !self.leading.load(Ordering::Relaxed)
            && self
                .leading
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    /// Sets `entries` in `collection` (as [`Store::set_many`]), combined
    /// with the sets of other tasks running at the same time.
    pub(crate) async fn set_many(
        self: &std::sync::Arc<Self>,
        store: &Store,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
    ) -> Answer {
        if self.try_lead() {
            let mine = write(store, collection, &entries);
            self.lead(store);
            return mine;
        }
        let (done, answer) = oneshot::channel();
        self.queue.lock().unwrap().push(Job {
            collection: collection.to_owned(),
            entries,
            done,
        });
        if self.try_lead() {
            self.lead(store);
        }
        answer
            .await
            .expect("a leader answers every queued set before it stops")
    }

    /// Writes queued sets until the queue is empty, then gives up the lead.
    fn lead(self: &std::sync::Arc<Self>, store: &Store) {
        let mut rounds = 0;
        loop {
            let jobs = std::mem::take(&mut *self.queue.lock().unwrap());
            if jobs.is_empty() {
                self.leading.store(false, Ordering::Release);
                // A set queued after the take saw us leading and left the
                // work to us: look once more.
                if self.queue.lock().unwrap().is_empty() || !self.try_lead() {
                    return;
                }
                continue;
            }
            rounds += 1;
            write_jobs(store, jobs);
            if rounds == MAX_ROUNDS && tokio::runtime::Handle::try_current().is_ok() {
                // Still leading: a task of our own goes on with the queue.
                let (me, store) = (self.clone(), store.clone());
                tokio::spawn(async move { me.lead(&store) });
                return;
            }
        }
    }
}

/// Writes `jobs`, consecutive jobs of one collection in one go. If a
/// combined write fails (one job's entry is invalid, or the collection
/// refuses writes), each of its jobs is written alone, so each gets its own
/// answer.
fn write_jobs(store: &Store, jobs: Vec<Job>) {
    let mut jobs = jobs.into_iter().peekable();
    while let Some(first) = jobs.next() {
        let mut group = vec![first];
        while let Some(next) = jobs.peek()
            && next.collection == group[0].collection
        {
            group.push(jobs.next().expect("peeked"));
        }
        if group.len() > 1 {
            let refs: Vec<(&[u8], &[u8])> = group
                .iter()
                .flat_map(|j| j.entries.iter().map(|(k, v)| (&k[..], &v[..])))
                .collect();
            if let Ok(mut versions) = store.set_many(&group[0].collection, &refs) {
                for job in group.into_iter().rev() {
                    let own = versions.split_off(versions.len() - job.entries.len());
                    let _ = job.done.send(Ok(own));
                }
                continue;
            }
        }
        for job in group {
            let answer = write(store, &job.collection, &job.entries);
            let _ = job.done.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn store() -> Store {
        Store::memory(dhrt_storage::Options::default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_set_lands_once_with_its_own_answer_under_contention() {
        let store = store();
        let combiner = Arc::new(Combiner::default());
        let mut tasks = Vec::new();
        for t in 0..16u32 {
            let (store, combiner) = (store.clone(), combiner.clone());
            tasks.push(tokio::spawn(async move {
                let collection = if t % 2 == 0 { "even" } else { "odd" };
                for round in 0..200u32 {
                    let entries: Vec<(Bytes, Bytes)> = (0..4u32)
                        .map(|i| {
                            let key = Bytes::from(format!("{t}-{round}-{i}"));
                            (key.clone(), key)
                        })
                        .collect();
                    let versions = combiner
                        .set_many(&store, collection, entries.clone())
                        .await
                        .unwrap();
                    assert_eq!(versions.len(), entries.len());
                    for ((key, _), version) in entries.iter().zip(versions) {
                        let (value, stored) =
                            store.get_versioned(collection, key).unwrap().unwrap();
                        assert_eq!(value.as_deref(), Some(&key[..]));
                        assert_eq!(stored, version, "the answer is this entry's version");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(!combiner.leading.load(Ordering::Relaxed));
        assert!(combiner.queue.lock().unwrap().is_empty());
        let keys = |c: &str| {
            store
                .stats()
                .collections
                .iter()
                .find(|s| s.name == c)
                .unwrap()
                .keys
        };
        assert_eq!(keys("even"), 8 * 200 * 4);
        assert_eq!(keys("odd"), 8 * 200 * 4);
    }

    #[test]
    fn a_bad_job_fails_alone_when_combined() {
        let store = store();
        let (good_tx, mut good) = oneshot::channel();
        let (bad_tx, mut bad) = oneshot::channel();
        let (late_tx, mut late) = oneshot::channel();
        write_jobs(
            &store,
            vec![
                Job {
                    collection: "c".into(),
                    entries: vec![("a".into(), "1".into())],
                    done: good_tx,
                },
                Job {
                    collection: "c".into(),
                    entries: vec![("".into(), "empty key".into())],
                    done: bad_tx,
                },
                Job {
                    collection: "c".into(),
                    entries: vec![("b".into(), "2".into()), ("c".into(), "3".into())],
                    done: late_tx,
                },
            ],
        );
        assert_eq!(good.try_recv().unwrap().unwrap().len(), 1);
        assert!(bad.try_recv().unwrap().is_err());
        assert_eq!(late.try_recv().unwrap().unwrap().len(), 2);
        for key in ["a", "b", "c"] {
            assert!(store.get("c", key.as_bytes()).unwrap().is_some(), "{key}");
        }
    }
}
