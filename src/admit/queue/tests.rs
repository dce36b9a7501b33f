//! The queue's behaviour, on tokio's paused clock where time matters: admission, order,
//! fairness, shedding, bounds, timeouts, cancellation, and no lost wake-ups under concurrency.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

fn t(name: &str) -> Tenant {
    Tenant(Arc::from(name))
}

fn queue(max_queued: usize, capacity: Arc<dyn Capacity>) -> FairQueue {
    FairQueue::new(
        QueueLimits {
            max_queued,
            queue_timeout: HOUR,
        },
        capacity,
    )
}

/// Engines' room set by the test, as the lead's scraped figures would be.
#[derive(Default)]
struct Room(AtomicUsize);

impl Capacity for Room {
    fn headroom(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Yields to the spawned tasks until `cond` holds (a safety net, not a clock).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

type Outcomes = mpsc::UnboundedSender<(String, Result<Admitted, Refused>)>;

/// Spawns a request that reports its outcome (holding its guard in the message).
fn spawn_request(
    queue: &FairQueue,
    out: &Outcomes,
    label: &str,
    tenant: &str,
    priority: Priority,
    cost: u64,
) -> tokio::task::JoinHandle<()> {
    let (q, out, label, tenant) = (queue.clone(), out.clone(), label.to_owned(), t(tenant));
    tokio::spawn(async move {
        let outcome = q.wait(tenant, priority, cost).await;
        let _ = out.send((label, outcome));
    })
}

/// [`spawn_request`], returning once the request waits in the queue.
async fn enqueue(
    queue: &FairQueue,
    out: &Outcomes,
    label: &str,
    tenant: &str,
    priority: Priority,
    cost: u64,
) -> tokio::task::JoinHandle<()> {
    let before = queue.snapshot().queued;
    let task = spawn_request(queue, out, label, tenant, priority, cost);
    until("request queued", || queue.snapshot().queued == before + 1).await;
    task
}

/// Releases one place at a time (the guard of each admitted request is dropped before the
/// next is let through) and returns the labels in admission order.
async fn admit_one_by_one(
    rx: &mut mpsc::UnboundedReceiver<(String, Result<Admitted, Refused>)>,
    holder: Admitted,
    n: usize,
) -> Vec<String> {
    drop(holder);
    let mut order = Vec::new();
    for _ in 0..n {
        let (label, outcome) = rx.recv().await.unwrap();
        assert!(outcome.is_ok(), "{label}: {outcome:?}");
        order.push(label);
    }
    order
}

#[tokio::test(start_paused = true)]
async fn admits_at_once_while_there_is_room() {
    let q = queue(10, Arc::new(ConcurrencyLimit(2)));
    let a = q.wait(t("a"), Priority::Standard, 100).now_or_never();
    let b = q.wait(t("b"), Priority::Sheddable, 100).now_or_never();
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(
        (a.waited(), a.priority()),
        (Duration::ZERO, Priority::Standard)
    );
    assert_eq!(b.priority(), Priority::Sheddable);
    assert_eq!(q.snapshot().admitted, 2);
    // A third waits; dropping a guard lets it through, having waited as long as it did.
    let mut third = Box::pin(q.wait(t("c"), Priority::Standard, 100));
    assert!((&mut third).now_or_never().is_none());
    assert_eq!(q.snapshot().queued, 1);
    tokio::time::advance(Duration::from_millis(250)).await;
    drop(a);
    let c = third.await.unwrap();
    assert_eq!(c.waited(), Duration::from_millis(250));
    drop((b, c));
    let s = q.snapshot();
    assert_eq!((s.queued, s.admitted), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn first_in_first_out_within_a_tenant() {
    let q = queue(100, Arc::new(ConcurrencyLimit(1)));
    let (out, mut rx) = mpsc::unbounded_channel();
    let holder = q.wait(t("x"), Priority::Standard, 1).await.unwrap();
    for (i, cost) in [900, 10, 5000, 1, 300].into_iter().enumerate() {
        enqueue(&q, &out, &format!("a{i}"), "a", Priority::Standard, cost).await;
    }
    let order = admit_one_by_one(&mut rx, holder, 5).await;
    assert_eq!(order, ["a0", "a1", "a2", "a3", "a4"]);
}

#[tokio::test(start_paused = true)]
async fn critical_goes_before_standard_whatever_the_arrival() {
    let q = queue(100, Arc::new(ConcurrencyLimit(1)));
    let (out, mut rx) = mpsc::unbounded_channel();
    let holder = q.wait(t("x"), Priority::Standard, 1).await.unwrap();
    for (label, tenant, priority) in [
        ("s1", "a", Priority::Standard),
        ("s2", "b", Priority::Standard),
        ("c1", "a", Priority::Critical),
        ("s3", "a", Priority::Standard),
        ("c2", "b", Priority::Critical),
    ] {
        // One quantum each: one request per tenant's turn.
        enqueue(&q, &out, label, tenant, priority, QUANTUM_TOKENS).await;
    }
    let snapshot = q.snapshot();
    assert_eq!(snapshot.bands[0].priority, "critical");
    assert_eq!((snapshot.bands[0].queued, snapshot.bands[1].queued), (2, 3));
    let order = admit_one_by_one(&mut rx, holder, 5).await;
    assert_eq!(order, ["c1", "c2", "s1", "s2", "s3"]);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_tenant_is_not_stuck_behind_a_noisy_one() {
    let q = queue(1000, Arc::new(ConcurrencyLimit(1)));
    let (out, mut rx) = mpsc::unbounded_channel();
    let holder = q.wait(t("x"), Priority::Standard, 1).await.unwrap();
    for i in 0..100 {
        enqueue(
            &q,
            &out,
            &format!("noisy{i}"),
            "noisy",
            Priority::Standard,
            100,
        )
        .await;
    }
    for i in 0..5 {
        enqueue(
            &q,
            &out,
            &format!("quiet{i}"),
            "quiet",
            Priority::Standard,
            100,
        )
        .await;
    }
    let tenants = &q.snapshot().bands[1].tenants;
    assert_eq!(
        (tenants[0].tenant.as_str(), tenants[0].queued),
        ("noisy", 100)
    );
    let order = admit_one_by_one(&mut rx, holder, 105).await;
    let quiet: Vec<usize> = (0..order.len())
        .filter(|&i| order[i].starts_with("quiet"))
        .collect();
    // 256-token quanta of 100-token requests: noisy 2, quiet 2, noisy 3, quiet 3.
    assert_eq!(quiet, [2, 3, 7, 8, 9], "{order:?}");
    let noisy: Vec<&String> = order.iter().filter(|l| l.starts_with("noisy")).collect();
    assert!(noisy.windows(2).all(|w| {
        let n = |l: &str| l["noisy".len()..].parse::<u32>().unwrap();
        n(w[0]) < n(w[1])
    }));
}

#[tokio::test(start_paused = true)]
async fn weights_two_to_one_admit_two_to_one() {
    let q = queue(1000, Arc::new(ConcurrencyLimit(1)));
    q.set_weights(HashMap::from([(t("gold"), 2), (t("zero"), 0)]));
    let (out, mut rx) = mpsc::unbounded_channel();
    let holder = q.wait(t("x"), Priority::Standard, 1).await.unwrap();
    for i in 0..60 {
        enqueue(&q, &out, "bronze", "bronze", Priority::Standard, 400).await;
        enqueue(&q, &out, "gold", "gold", Priority::Standard, 400).await;
        if i < 3 {
            // Weight 0 counts as 1: this tenant is served too.
            enqueue(&q, &out, "zero", "zero", Priority::Standard, 400).await;
        }
    }
    let weights: Vec<(String, u32)> = q.snapshot().bands[1]
        .tenants
        .iter()
        .map(|t| (t.tenant.clone(), t.weight))
        .collect();
    assert_eq!(
        weights,
        [("bronze".into(), 1), ("gold".into(), 2), ("zero".into(), 1)]
    );
    let order = admit_one_by_one(&mut rx, holder, 123).await;
    // Weight 0 counts as 1: that tenant is served alongside (its 3 among the first 12).
    let zero: Vec<usize> = (0..order.len()).filter(|&i| order[i] == "zero").collect();
    assert!(zero.iter().all(|&i| i < 12), "{order:?}");
    // Gold gets two of bronze's one, at every point while both wait.
    for n in [15, 30, 45, 60] {
        let served: Vec<&String> = order.iter().filter(|l| *l != "zero").take(n).collect();
        let gold = served.iter().filter(|l| **l == "gold").count();
        assert!(
            gold.abs_diff(n * 2 / 3) <= 1,
            "gold {gold} of {n}: {order:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn sheddable_is_refused_at_saturation_and_admitted_when_there_is_room() {
    let q = queue(100, Arc::new(ConcurrencyLimit(1)));
    let held = q.wait(t("a"), Priority::Standard, 100).await.unwrap();
    let shed = q.wait(t("b"), Priority::Sheddable, 100).now_or_never();
    assert_eq!(shed.unwrap().unwrap_err(), Refused::Shed);
    assert_eq!(q.snapshot().queued, 0);
    drop(held);
    let admitted = q.wait(t("b"), Priority::Sheddable, 100).now_or_never();
    assert_eq!(admitted.unwrap().unwrap().priority(), Priority::Sheddable);
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_never_overtakes_waiting_requests() {
    // Room appears without a notify: the next call admits the one waiting, not itself.
    let room = Arc::new(Room::default());
    let q = queue(100, room.clone());
    let (out, mut rx) = mpsc::unbounded_channel();
    enqueue(&q, &out, "waiting", "a", Priority::Standard, 100).await;
    room.0.store(1, Ordering::SeqCst);
    let shed = q.wait(t("b"), Priority::Sheddable, 100).now_or_never();
    assert_eq!(shed.unwrap().unwrap_err(), Refused::Shed);
    let (label, first) = rx.recv().await.unwrap();
    assert_eq!(label, "waiting");
    assert!(first.is_ok());
}

#[tokio::test(start_paused = true)]
async fn critical_is_never_shed_and_displaces_the_newest_standard_when_full() {
    let q = queue(2, Arc::new(ConcurrencyLimit(1)));
    let (out, mut rx) = mpsc::unbounded_channel();
    let holder = q.wait(t("x"), Priority::Standard, 1).await.unwrap();
    enqueue(&q, &out, "s_old", "a", Priority::Standard, 100).await;
    enqueue(&q, &out, "s_new", "b", Priority::Standard, 100).await;
    // Full: a standard request is refused, a critical one takes the newest standard's place.
    let full = q.wait(t("c"), Priority::Standard, 100).now_or_never();
    assert_eq!(full.unwrap().unwrap_err(), Refused::Full);
    let mut critical = Box::pin(q.wait(t("c"), Priority::Critical, 100));
    assert!((&mut critical).now_or_never().is_none());
    let (label, displaced) = rx.recv().await.unwrap();
    assert_eq!(
        (label.as_str(), displaced.unwrap_err()),
        ("s_new", Refused::Displaced)
    );
    spawn_request(&q, &out, "c2", "d", Priority::Critical, 100);
    let (label, displaced) = rx.recv().await.unwrap();
    assert_eq!(
        (label.as_str(), displaced.unwrap_err()),
        ("s_old", Refused::Displaced)
    );
    // Only critical requests wait: nothing to displace, so a third critical is refused Full
    // (never Shed).
    let full = q.wait(t("e"), Priority::Critical, 100).now_or_never();
    assert_eq!(full.unwrap().unwrap_err(), Refused::Full);
    assert_eq!(q.snapshot().queued, 2);
    drop(holder);
    let first = critical.await.unwrap();
    assert_eq!(first.priority(), Priority::Critical);
    drop(first);
    let (label, second) = rx.recv().await.unwrap();
    assert_eq!(label, "c2");
    assert!(second.is_ok());
}

#[tokio::test(start_paused = true)]
async fn max_queued_zero_means_nothing_waits() {
    let q = queue(0, Arc::new(ConcurrencyLimit(1)));
    let held = q
        .wait(t("a"), Priority::Standard, 1)
        .now_or_never()
        .unwrap()
        .unwrap();
    for priority in [Priority::Critical, Priority::Standard] {
        let refused = q.wait(t("b"), priority, 1).now_or_never();
        assert_eq!(refused.unwrap().unwrap_err(), Refused::Full);
    }
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn queues_sharing_a_count_share_max_queued_and_give_places_back() {
    let limits = QueueLimits {
        max_queued: 2,
        queue_timeout: HOUR,
    };
    let total = Arc::new(AtomicUsize::new(0));
    let (room_a, room_b) = (Arc::new(Room::default()), Arc::new(Room::default()));
    let a = FairQueue::sharing(limits, room_a.clone(), total.clone());
    let b = FairQueue::sharing(limits, room_b.clone(), total.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _a1 = enqueue(&a, &tx, "a1", "t", Priority::Standard, 1).await;
    let _b1 = enqueue(&b, &tx, "b1", "t", Priority::Standard, 1).await;
    assert_eq!(total.load(Ordering::SeqCst), 2);
    let full = b.wait(t("u"), Priority::Standard, 1).now_or_never();
    assert_eq!(
        full.unwrap().unwrap_err(),
        Refused::Full,
        "two wait, across both"
    );
    room_a.0.store(1, Ordering::SeqCst);
    a.notify();
    let (label, admitted) = rx.recv().await.unwrap();
    assert_eq!(label, "a1");
    assert_eq!(
        total.load(Ordering::SeqCst),
        1,
        "admitted: its place is free"
    );
    let b2 = b.wait(t("u"), Priority::Standard, 1);
    let mut b2 = Box::pin(b2);
    assert!(
        (&mut b2).now_or_never().is_none(),
        "b2 waits in the freed place"
    );
    drop(b2);
    assert_eq!(
        total.load(Ordering::SeqCst),
        1,
        "left: its place is free again"
    );
    drop(admitted);
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_at_most_the_queue_timeout() {
    let timeout = Duration::from_secs(30);
    let room = Arc::new(Room::default());
    let q = FairQueue::new(
        QueueLimits {
            max_queued: 10,
            queue_timeout: timeout,
        },
        room.clone(),
    );
    let start = Instant::now();
    let refused = q.wait(t("a"), Priority::Critical, 100).await.unwrap_err();
    assert_eq!((refused, start.elapsed()), (Refused::TimedOut, timeout));
    assert_eq!(q.snapshot().queued, 0);

    // Admitted before its deadline: not timed out, and waited what it waited.
    let start = Instant::now();
    let q2 = q.clone();
    let task = tokio::spawn(async move { q2.wait(t("b"), Priority::Standard, 100).await });
    until("queued", || q.snapshot().queued == 1).await;
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(q.snapshot().bands[1].oldest_wait_ms, 29_000);
    room.0.store(1, Ordering::SeqCst);
    q.notify();
    let admitted = task.await.unwrap().unwrap();
    assert_eq!(admitted.waited(), Duration::from_secs(29));
    assert_eq!(start.elapsed(), Duration::from_secs(29));
    // Its guard outlives the queue timeout: a guard is not timed.
    tokio::time::advance(HOUR).await;
    assert_eq!(q.snapshot().admitted, 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_leaves_at_once_and_frees_its_place() {
    let q = queue(1, Arc::new(ConcurrencyLimit(1)));
    let (out, mut rx) = mpsc::unbounded_channel();
    let holder = q.wait(t("x"), Priority::Standard, 1).await.unwrap();
    let gone = enqueue(&q, &out, "gone", "a", Priority::Standard, 100).await;
    // The queue is full until the client goes away.
    let full = q.wait(t("b"), Priority::Standard, 100).now_or_never();
    assert_eq!(full.unwrap().unwrap_err(), Refused::Full);
    gone.abort();
    until("left the queue", || q.snapshot().queued == 0).await;
    enqueue(&q, &out, "stays", "b", Priority::Standard, 100).await;
    let order = admit_one_by_one(&mut rx, holder, 1).await;
    assert_eq!(order, ["stays"]);
    assert!(
        rx.try_recv().is_err(),
        "the dropped waiter was never answered"
    );
    assert_eq!(q.snapshot().admitted, 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_just_after_admission_gives_its_place_back() {
    let q = queue(10, Arc::new(ConcurrencyLimit(1)));
    let holder = q.wait(t("x"), Priority::Standard, 1).await.unwrap();
    let mut first = Box::pin(q.wait(t("a"), Priority::Standard, 100));
    assert!((&mut first).now_or_never().is_none());
    let mut second = Box::pin(q.wait(t("b"), Priority::Standard, 100));
    assert!((&mut second).now_or_never().is_none());
    // `first` is admitted but not polled again: its guard sits in its reply.
    drop(holder);
    let s = q.snapshot();
    assert_eq!((s.queued, s.admitted), (1, 1));
    // The client goes away before reading it: the place passes to `second`.
    drop(first);
    let admitted = (&mut second).now_or_never().unwrap().unwrap();
    assert_eq!(q.snapshot().admitted, 1);
    drop(admitted);
    assert_eq!(q.snapshot().admitted, 0);
}

#[tokio::test(start_paused = true)]
async fn notify_admits_as_far_as_the_engines_have_room() {
    let room = Arc::new(Room::default());
    let q = queue(10, room.clone());
    let (out, mut rx) = mpsc::unbounded_channel();
    for label in ["r0", "r1", "r2"] {
        enqueue(&q, &out, label, "a", Priority::Standard, 100).await;
    }
    q.notify();
    assert_eq!(q.snapshot().queued, 3, "no room, nobody admitted");
    room.0.store(2, Ordering::SeqCst);
    q.notify();
    let (r0, g0) = rx.recv().await.unwrap();
    let (r1, _g1) = rx.recv().await.unwrap();
    assert_eq!((r0.as_str(), r1.as_str()), ("r0", "r1"));
    assert_eq!(q.snapshot().queued, 1);
    // Dispatching r0 to an engine: the lead drops its guard once the engine counts it, and
    // the room the engines report shrinks by one; nobody else goes.
    room.0.store(1, Ordering::SeqCst);
    drop(g0);
    assert_eq!((q.snapshot().queued, q.snapshot().admitted), (1, 1));
}

/// One admitted request in the concurrency test: counts the guards held at once.
struct Holding(Arc<AtomicUsize>);

impl Holding {
    fn new(held: &Arc<AtomicUsize>) -> Holding {
        let now = held.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(now <= 3, "{now} guards held at once");
        Holding(held.clone())
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrency_every_request_is_admitted_exactly_once() {
    const TASKS: usize = 300;
    let q = queue(TASKS, Arc::new(ConcurrencyLimit(3)));
    let held = Arc::new(AtomicUsize::new(0));
    let admissions: Arc<Vec<AtomicUsize>> =
        Arc::new((0..TASKS).map(|_| AtomicUsize::new(0)).collect());
    let mut rng = fastrand::Rng::with_seed(19);
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (q, held, admissions) = (q.clone(), held.clone(), admissions.clone());
        let tenant = t(&format!("t{}", rng.usize(..7)));
        let priority = if rng.u8(..5) == 0 {
            Priority::Critical
        } else {
            Priority::Standard
        };
        let (cost, hold) = (rng.u64(1..4000), rng.usize(..20));
        tasks.push(tokio::spawn(async move {
            let _guard = q.wait(tenant, priority, cost).await.unwrap();
            admissions[i].fetch_add(1, Ordering::SeqCst);
            // Counted down before the guard drops (locals drop in reverse), aborted or not.
            let _holding = Holding::new(&held);
            for _ in 0..hold {
                tokio::task::yield_now().await;
            }
        }));
    }
    // Some clients go away, at random moments.
    let mut aborted = Vec::new();
    for _ in 0..40 {
        let i = rng.usize(..TASKS);
        tasks[i].abort();
        aborted.push(i);
        tokio::task::yield_now().await;
    }
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(()) => assert_eq!(admissions[i].load(Ordering::SeqCst), 1, "task {i}"),
            Err(e) => assert!(e.is_cancelled() && aborted.contains(&i), "task {i}: {e}"),
        }
    }
    for (i, n) in admissions.iter().enumerate() {
        assert!(n.load(Ordering::SeqCst) <= 1, "task {i} admitted twice");
    }
    let s = q.snapshot();
    assert_eq!((s.queued, s.admitted), (0, 0), "no place leaked");
    let again = q.wait(t("late"), Priority::Standard, 1).now_or_never();
    assert!(again.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn metrics_show_lengths_waits_and_rejections() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let q = queue(1, Arc::new(ConcurrencyLimit(1)));
    let mut standard = Box::pin(q.wait(t("c"), Priority::Standard, 100));
    let mut critical = Box::pin(q.wait(t("d"), Priority::Critical, 100));
    metrics::with_local_recorder(&recorder, || {
        register_metrics();
        let held = q.wait(t("a"), Priority::Standard, 100).now_or_never();
        let shed = q.wait(t("b"), Priority::Sheddable, 100).now_or_never();
        assert_eq!(shed.unwrap().unwrap_err(), Refused::Shed);
        assert!((&mut standard).now_or_never().is_none());
        let text = handle.render();
        let line = r#"switchyard_queue_length{priority="standard",tenant="c"} 1"#;
        assert!(text.contains(line), "{line} missing from\n{text}");
        assert!((&mut critical).now_or_never().is_none());
        let displaced = (&mut standard).now_or_never().unwrap();
        assert_eq!(displaced.unwrap_err(), Refused::Displaced);
        drop(held);
        drop((&mut critical).now_or_never().unwrap().unwrap());
    });
    let text = handle.render();
    for line in [
        r#"switchyard_queue_length{priority="standard",tenant="c"} 0"#,
        r#"switchyard_queue_length{priority="critical",tenant="d"} 0"#,
        r#"switchyard_queue_rejections_total{reason="shed"} 1"#,
        r#"switchyard_queue_rejections_total{reason="displaced"} 1"#,
        r#"switchyard_queue_rejections_total{reason="full"} 0"#,
        r#"switchyard_queue_wait_seconds_count{priority="standard",tenant="a"} 1"#,
        r#"switchyard_queue_wait_seconds_count{priority="critical",tenant="d"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}
