//! The room's orchestration under tokio's paused clock, with a fake scheduler behind
//! `GpuScheduler` that keeps its own books and checks the invariant at every grant: the
//! call that asked for it is already recorded in the journal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use super::releaser::GIVE_UP_AFTER_FAILURES;
use super::*;
use crate::scheduler::CallFiles;
use std::time::SystemTime;

const ADDRESS: &str = "sched:1";
const S: fn(u64) -> Duration = Duration::from_secs;

/// What the fake answers to the next `-alloc` calls instead of granting for real.
#[derive(Debug, Clone)]
enum Scripted {
    /// The call fails after printing a grant for this job.
    Stray(&'static str),
}

#[derive(Debug, Default)]
struct Books {
    capacity: u32,
    /// Jobs held, with the call (stdout file) that got each.
    held: HashMap<String, PathBuf>,
    next_job: u64,
    script: VecDeque<Scripted>,
    alloc_delay: Duration,
    /// Deallocs fail while this is positive (counting down), or always when `None`.
    dealloc_failures: Option<u32>,
    /// What `settle_orphan` finds in a call's output, by stdout file.
    orphans: HashMap<PathBuf, String>,
    alloc_calls: u32,
    dealloc_calls: Vec<(String, Instant)>,
    /// Set when a grant was made for a call the journal did not record first.
    unrecorded_grant: Option<String>,
}

struct Fake {
    books: Mutex<Books>,
    /// The journal, to check that each call is recorded before it is answered.
    journal: Mutex<Option<Arc<Journal>>>,
}

impl Fake {
    fn new(capacity: u32) -> Arc<Fake> {
        Arc::new(Fake {
            books: Mutex::new(Books {
                capacity,
                dealloc_failures: Some(0),
                ..Books::default()
            }),
            journal: Mutex::new(None),
        })
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().expect("books")
    }
}

impl GpuScheduler for Fake {
    async fn alloc(&self, gpus: u32, call: &CallFiles) -> Result<AllocReply, SchedulerError> {
        let delay = self.books().alloc_delay;
        tokio::time::sleep(delay).await;
        let recorded = self
            .journal
            .lock()
            .expect("journal")
            .as_ref()
            .is_some_and(|j| {
                j.calls()
                    .iter()
                    .any(|c| j.call_files(&c.call_id).stdout == call.stdout)
            });
        let mut books = self.books();
        books.alloc_calls += 1;
        let scripted = books.script.pop_front();
        let job = match scripted {
            Some(Scripted::Stray(job)) => {
                books.held.insert(job.to_owned(), call.stdout.clone());
                return Err(SchedulerError::StrayGrant {
                    job: job.to_owned(),
                    source: Box::new(SchedulerError::Io(std::io::Error::other("killed"))),
                });
            }
            None if books.held.len() as u32 + gpus > books.capacity => {
                return Ok(AllocReply::Busy);
            }
            None => {
                books.next_job += 1;
                format!("job{}", books.next_job)
            }
        };
        if !recorded {
            books.unrecorded_grant = Some(job.clone());
        }
        books.held.insert(job.clone(), call.stdout.clone());
        // What the client printed stays in its output file.
        books.orphans.insert(call.stdout.clone(), job.clone());
        Ok(AllocReply::Granted(Grant {
            scheduler_job_id: job,
            job_field_name: "SSGM_JOB".into(),
            settings: vec![("RCUDA_DEVICE_0".into(), "gpu0:0".into())],
        }))
    }

    async fn dealloc(&self, scheduler_job_id: &str) -> Result<(), SchedulerError> {
        let mut books = self.books();
        books
            .dealloc_calls
            .push((scheduler_job_id.to_owned(), Instant::now()));
        match books.dealloc_failures {
            Some(0) => {}
            Some(n) => {
                books.dealloc_failures = Some(n - 1);
                return Err(SchedulerError::Io(std::io::Error::other("refused")));
            }
            None => return Err(SchedulerError::Io(std::io::Error::other("refused"))),
        }
        books.held.remove(scheduler_job_id);
        Ok(())
    }

    async fn settle_orphan(&self, call: &CallFiles, _started: SystemTime) -> Option<String> {
        self.books().orphans.remove(&call.stdout)
    }
}

struct Room {
    fake: Arc<Fake>,
    journal: Arc<Journal>,
    reservations: Option<Reservations<Fake>>,
    releaser: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn settings() -> ReservationSettings {
    ReservationSettings {
        gpus: 1,
        alloc_retry_interval: S(30),
        alloc_deadline: S(3600),
        scheduler_address: ADDRESS.into(),
    }
}

/// Opens a room on a fresh state directory, after `prepare` wrote what a previous run
/// left into the journal.
fn open_room(fake: Arc<Fake>, prepare: impl FnOnce(&Journal)) -> Room {
    let dir = tempfile::tempdir().expect("state dir");
    {
        let (journal, _) = Journal::open(dir.path()).expect("open");
        prepare(&journal);
    }
    let (journal, leftovers) = Journal::open(dir.path()).expect("reopen");
    let journal = Arc::new(journal);
    *fake.journal.lock().expect("journal") = Some(journal.clone());
    let (reservations, releaser) = Reservations::start(
        fake.clone(),
        journal.clone(),
        leftovers,
        settings(),
        S(32),
        None,
    );
    Room {
        fake,
        journal,
        reservations: Some(reservations),
        releaser,
        _dir: dir,
    }
}

impl Room {
    fn room(&self) -> &Reservations<Fake> {
        self.reservations.as_ref().expect("open")
    }

    async fn allocate(&self) -> Result<Reservation, AllocError> {
        let never = CancellationToken::new();
        self.room().allocate("job-id", "key", &never, &never).await
    }

    /// The invariant, checked from the outside: every job the fake holds for us is in
    /// the journal, as a reservation or as the call that got it.
    fn assert_invariant(&self) {
        let books = self.fake.books();
        assert_eq!(
            books.unrecorded_grant, None,
            "a grant came before its call record"
        );
        let reserved: HashSet<String> = self
            .journal
            .reservations()
            .into_iter()
            .map(|e| e.scheduler_job_id)
            .collect();
        let calls: HashSet<PathBuf> = self
            .journal
            .calls()
            .iter()
            .map(|c| self.journal.call_files(&c.call_id).stdout)
            .collect();
        for (job, call) in &books.held {
            assert!(
                reserved.contains(job) || calls.contains(call),
                "scheduler holds {job} but the journal has no record of it"
            );
        }
    }

    /// Closes the room and waits for the releaser's last pass.
    async fn close(mut self) -> Room {
        self.reservations = None;
        (&mut self.releaser).await.expect("releaser");
        self
    }
}

/// Polls `check` on the paused clock; each turn lets real time pass for the journal's
/// writes on the blocking pool.
async fn until(what: &str, within: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    let step = (within / 600).max(Duration::from_millis(100));
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        tokio::time::sleep(step).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_grant_is_recorded_before_use_and_forgotten_after_release() {
    let room = open_room(Fake::new(1), |_| {});
    let reservation = room.allocate().await.expect("granted");
    room.assert_invariant();
    assert_eq!(room.journal.reservations().len(), 1);
    assert!(room.journal.calls().is_empty());
    assert_eq!(room.room().held(), 1);
    room.room().release(reservation).await;
    assert!(room.journal.reservations().is_empty());
    assert_eq!(room.room().held(), 0);
    assert!(room.fake.books().held.is_empty());
    room.assert_invariant();
}

#[tokio::test(start_paused = true)]
async fn while_busy_the_gate_holds_and_a_release_of_ours_wakes_the_waiter() {
    let room = Arc::new(open_room(Fake::new(1), |_| {}));
    let first = room.allocate().await.expect("granted");
    let waiter = tokio::spawn({
        let room = room.clone();
        async move {
            room.allocate()
                .await
                .map(|r| r.grant().scheduler_job_id.clone())
        }
    });
    // The second asks once, hears busy, and then waits: no hammering.
    tokio::time::sleep(S(20)).await;
    assert_eq!(room.fake.books().alloc_calls, 2);
    assert!(!waiter.is_finished());
    // A third asker waits behind the gate and never reaches the scheduler meanwhile.
    let third = tokio::spawn({
        let room = room.clone();
        async move { room.allocate().await.is_ok() }
    });
    tokio::time::sleep(S(5)).await;
    assert_eq!(room.fake.books().alloc_calls, 2);
    // Our release wakes the waiter long before the 30 s retry interval.
    let released_at = Instant::now();
    room.room().release(first).await;
    let granted = waiter.await.expect("task").expect("granted");
    assert_eq!(granted, "job2");
    assert!(Instant::now() - released_at < S(1));
    assert_eq!(room.fake.books().alloc_calls, 3);
    third.abort();
}

#[tokio::test(start_paused = true)]
async fn busy_with_no_release_of_ours_asks_again_after_the_retry_interval() {
    let room = open_room(Fake::new(0), |_| {});
    let started = Instant::now();
    let asker = room.allocate();
    tokio::pin!(asker);
    let outcome = tokio::time::timeout(S(29), &mut asker).await;
    assert!(outcome.is_err(), "no grant from a full scheduler");
    assert_eq!(
        room.fake.books().alloc_calls,
        1,
        "asked once in the first 29 s"
    );
    let _ = tokio::time::timeout(S(2), &mut asker).await;
    assert_eq!(room.fake.books().alloc_calls, 2, "asked again at 30 s");
    assert!(Instant::now() - started >= S(30));
}

#[tokio::test(start_paused = true)]
async fn a_failed_release_is_retried_with_backoff_until_confirmed() {
    let fake = Fake::new(1);
    fake.books().dealloc_failures = Some(3);
    let room = open_room(fake, |_| {});
    let reservation = room.allocate().await.expect("granted");
    room.room().release(reservation).await;
    assert_eq!(room.room().held(), 1, "still counted until confirmed");
    until("the release", S(600), || room.fake.books().held.is_empty()).await;
    room.assert_invariant();
    assert!(room.journal.reservations().is_empty());
    assert_eq!(room.room().held(), 0);
    let times: Vec<Instant> = room
        .fake
        .books()
        .dealloc_calls
        .iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(times.len(), 4, "one inline attempt, three retries");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Jittered backoff from 1 s, doubling: 0.5..=1 s, 1..=2 s, 2..=4 s; a little slack
    // for the polling.
    let ms = Duration::from_millis;
    assert!(gaps[0] >= ms(500) && gaps[0] <= ms(1500), "{gaps:?}");
    assert!(gaps[1] >= ms(1000) && gaps[1] <= ms(2500), "{gaps:?}");
    assert!(gaps[2] >= ms(2000) && gaps[2] <= ms(4500), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn a_release_that_never_succeeds_is_given_up_by_the_rule_and_never_retried() {
    let fake = Fake::new(1);
    fake.books().dealloc_failures = None;
    let room = open_room(fake, |_| {});
    let reservation = room.allocate().await.expect("granted");
    room.room().release(reservation).await;
    until("the give-up", S(4 * 3600), || {
        room.journal.reservations().is_empty()
    })
    .await;
    let attempts = room.fake.books().dealloc_calls.len() as u32;
    // The inline attempt counts: the rule's count in all.
    assert_eq!(attempts, GIVE_UP_AFTER_FAILURES);
    assert_eq!(
        room.room().held(),
        0,
        "no longer counted: asking is not blocked"
    );
    tokio::time::sleep(S(10 * 3600)).await;
    assert_eq!(room.fake.books().dealloc_calls.len() as u32, attempts);
    let room = room.close().await;
    *room.fake.journal.lock().expect("journal") = None;
    let Room { journal, _dir, .. } = room;
    drop(journal);
    let (_, leftovers) = Journal::open(_dir.path()).expect("reopen");
    assert!(
        leftovers.reservations.is_empty(),
        "not retried at the next start"
    );
    assert_eq!(leftovers.given_up, 1);
}

#[tokio::test(start_paused = true)]
async fn release_failures_count_across_restarts() {
    let fake = Fake::new(0);
    fake.books().dealloc_failures = None;
    let room = open_room(fake, |journal| {
        journal
            .begin_call(call("c1"))
            .and_then(|()| journal.grant_call("c1", entry("old", ADDRESS)))
            .expect("record");
        for _ in 0..GIVE_UP_AFTER_FAILURES - 1 {
            journal.note_release_failure("old").expect("note");
        }
    });
    until("the give-up", S(600), || {
        room.journal.reservations().is_empty()
    })
    .await;
    assert_eq!(
        room.fake.books().dealloc_calls.len(),
        1,
        "one more failure was enough"
    );
}

fn call(id: &str) -> CallEntry {
    CallEntry {
        call_id: id.into(),
        scheduler: ADDRESS.into(),
        job_id: "j".into(),
        key: "k".into(),
        started_unix_ms: 1_000,
    }
}

fn entry(job: &str, scheduler: &str) -> JournalEntry {
    JournalEntry {
        scheduler_job_id: job.into(),
        scheduler: scheduler.into(),
        job_id: "j".into(),
        key: "k".into(),
        since_unix: 1,
        release_failures: 0,
    }
}

#[tokio::test(start_paused = true)]
async fn leftovers_are_settled_and_released_in_the_background_and_counted_meanwhile() {
    let fake = Fake::new(4);
    {
        let mut books = fake.books();
        books.held.insert("left1".into(), PathBuf::new());
        books.held.insert("left2".into(), PathBuf::new());
        books.held.insert("orphan".into(), PathBuf::new());
        books.held.insert("theirs".into(), PathBuf::new());
        // The first attempt at each leftover fails: the start must not wait on it.
        books.dealloc_failures = Some(2);
    }
    let mut orphan_stdout = PathBuf::new();
    let room = open_room(fake.clone(), |journal| {
        for (c, job) in [("c1", "left1"), ("c2", "left2")] {
            journal.begin_call(call(c)).expect("begin");
            journal.grant_call(c, entry(job, ADDRESS)).expect("grant");
        }
        journal.begin_call(call("c3")).expect("begin");
        journal.begin_call(call("c4")).expect("begin");
        journal.begin_call(call("c5")).expect("begin");
        journal
            .grant_call("c5", entry("theirs", "elsewhere:2"))
            .expect("grant");
        orphan_stdout = journal.call_files("c3").stdout;
    });
    fake.books().orphans.insert(orphan_stdout, "orphan".into());
    // `start` returned at once; the two reservations are counted as held right away.
    assert_eq!(room.room().held(), 2);
    until("leftovers released", S(120), || {
        let held = &room.fake.books().held;
        !held.contains_key("left1") && !held.contains_key("left2") && !held.contains_key("orphan")
    })
    .await;
    until("journal updated", S(10), || {
        room.journal.reservations().len() == 1
    })
    .await;
    assert!(room.journal.calls().is_empty(), "both calls settled");
    assert_eq!(room.room().held(), 0);
    let books = room.fake.books();
    assert!(
        books.held.contains_key("theirs"),
        "another scheduler's entry is never released"
    );
    assert!(!books.dealloc_calls.iter().any(|(job, _)| job == "theirs"));
    drop(books);
    assert_eq!(room.journal.reservations()[0].scheduler_job_id, "theirs");
}

#[tokio::test(start_paused = true)]
async fn a_stray_grant_is_recorded_and_released() {
    let fake = Fake::new(1);
    fake.books().script.push_back(Scripted::Stray("stray"));
    let room = open_room(fake, |_| {});
    let err = room
        .allocate()
        .await
        .err()
        .expect("a stray grant is no reservation");
    assert!(matches!(err, AllocError::Scheduler(_)), "{err:?}");
    room.assert_invariant();
    until("the stray released", S(60), || {
        room.fake.books().held.is_empty()
    })
    .await;
    until("journal updated", S(10), || {
        room.journal.reservations().is_empty()
    })
    .await;
    assert_eq!(room.room().held(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_reservation_is_released_by_its_drop_guard() {
    let room = open_room(Fake::new(1), |_| {});
    let reservation = room.allocate().await.expect("granted");
    drop(reservation);
    assert_eq!(room.room().held(), 1, "held until the releaser confirms");
    until("the release", S(60), || room.fake.books().held.is_empty()).await;
    until("journal updated", S(10), || {
        room.journal.reservations().is_empty()
    })
    .await;
    assert_eq!(room.room().held(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_call_finishes_in_the_background_and_its_grant_is_released() {
    let fake = Fake::new(1);
    fake.books().alloc_delay = S(10);
    let room = open_room(fake.clone(), |_| {});
    let abort = CancellationToken::new();
    let never = CancellationToken::new();
    let asked = room.room().allocate("j", "k", &abort, &never);
    tokio::pin!(asked);
    assert!(tokio::time::timeout(S(1), &mut asked).await.is_err());
    assert_eq!(
        room.journal.calls().len(),
        1,
        "the call is recorded while it runs"
    );
    abort.cancel();
    let err = asked.await.err().expect("interrupted");
    assert!(matches!(err, AllocError::Interrupted), "{err:?}");
    // The job stopped waiting, but the call was not cut short: the scheduler granted at
    // 10 s, and the releaser read the grant from the call's output and released it.
    until("the grant released", S(60), || {
        let books = room.fake.books();
        books.alloc_calls == 1 && books.held.is_empty()
    })
    .await;
    until("journal updated", S(10), || {
        room.journal.calls().is_empty() && room.journal.reservations().is_empty()
    })
    .await;
    room.assert_invariant();
}

#[tokio::test(start_paused = true)]
async fn stop_ends_a_wait_but_not_a_call_in_flight() {
    let fake = Fake::new(1);
    fake.books().alloc_delay = S(5);
    let room = open_room(fake, |_| {});
    let stop = CancellationToken::new();
    let never = CancellationToken::new();
    let asked = room.room().allocate("j", "k", &never, &stop);
    tokio::pin!(asked);
    assert!(tokio::time::timeout(S(1), &mut asked).await.is_err());
    stop.cancel();
    let reservation = asked.await.expect("the call in flight completes");
    room.room().release(reservation).await;
    let err = room
        .room()
        .allocate("j", "k", &never, &stop)
        .await
        .err()
        .expect("stopping");
    assert!(matches!(err, AllocError::Stopping), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn at_exit_a_release_never_tried_gets_one_attempt_and_failures_stay_in_the_journal() {
    let fake = Fake::new(2);
    fake.books().dealloc_failures = Some(1);
    let room = open_room(fake, |_| {});
    let first = room.allocate().await.expect("granted");
    let second = room.allocate().await.expect("granted");
    // The first fails its inline attempt; the second is dropped, never tried.
    room.room().release(first).await;
    drop(second);
    let room = room.close().await;
    let books = room.fake.books();
    assert_eq!(
        books.held.len(),
        1,
        "the dropped one was released in the last pass"
    );
    assert_eq!(
        books.dealloc_calls.len(),
        2,
        "the failed one is not retried at exit"
    );
    drop(books);
    assert_eq!(
        room.journal.reservations().len(),
        1,
        "kept for the next start"
    );
    room.assert_invariant();
}
