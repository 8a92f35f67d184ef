//! Run with `cargo bench --bench breaker`.
//!
//! The breaker's cost per call: a permit and its record while closed (one
//! thread, and 8 threads on one breaker), and a half-open probe.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use tokio::time::Instant;

use criterion::{Criterion, criterion_main};
use rabbit_guard::breaker::{Breaker, BreakerConfig, BreakerState, CallOutcome};

fn closed() -> Breaker {
    Breaker::new("bench", BreakerConfig::default())
}

fn closed_path(c: &mut Criterion) {
    let breaker = closed();
    // The consumer's path: one clock read per call (taken when the handler
    // ends, which it times anyway), permit and record on it.
    c.bench_function("closed: permit + record success (1 thread)", |b| {
        b.iter(|| {
            let now = Instant::now();
            let permit = breaker.try_acquire_at(now).expect("closed admits");
            permit.record(CallOutcome::Success.ended(now))
        });
    });
    // The convenience API reads the clock in both calls.
    c.bench_function(
        "closed: try_acquire + record, clock read twice (1 thread)",
        |b| {
            b.iter(|| {
                let permit = breaker.try_acquire().expect("closed admits");
                permit.record(CallOutcome::Success)
            });
        },
    );
    c.bench_function(
        "closed: permit + record success (8 threads, one breaker)",
        |b| {
            b.iter_custom(|iters| {
                let threads = 8;
                let per_thread = (iters / threads).max(1);
                let start = Arc::new(Barrier::new(threads as usize + 1));
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        let (breaker, start) = (breaker.clone(), start.clone());
                        std::thread::spawn(move || {
                            start.wait();
                            for _ in 0..per_thread {
                                let permit = breaker.try_acquire().expect("closed admits");
                                std::hint::black_box(permit.record(CallOutcome::Success));
                            }
                        })
                    })
                    .collect();
                start.wait();
                let began = Instant::now();
                for h in handles {
                    h.join().expect("bench thread");
                }
                // Wall time per call with all threads calling at once, scaled to
                // the iterations criterion asked for.
                #[allow(clippy::cast_precision_loss)]
                let scale = iters as f64 / (threads * per_thread) as f64;
                began.elapsed().mul_f64(scale)
            });
        },
    );
}

fn half_open_path(c: &mut Criterion) {
    // A breaker that stays half-open: more probes than the bench will make.
    let breaker = Breaker::new("bench", {
        let mut v = BreakerConfig::default();
        v.minimum_calls = 1;
        v.open_timeout = Duration::from_millis(1);
        v.max_open_timeout = Duration::from_millis(1);
        v.half_open_probes = u32::MAX;
        v
    });
    breaker
        .try_acquire()
        .expect("closed admits")
        .record(CallOutcome::Failure);
    // Wait out the 1 ms open time, polling with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !matches!(breaker.state(), BreakerState::HalfOpen { .. }) {
        assert!(
            std::time::Instant::now() < deadline,
            "breaker still {:?} after 5 s",
            breaker.state()
        );
        std::thread::yield_now();
        breaker.check_open_timer();
    }
    c.bench_function("half-open: probe permit + record (1 thread)", |b| {
        b.iter(|| {
            let permit = breaker.try_acquire().expect("a probe slot");
            permit.record(CallOutcome::Ignored)
        });
    });
}

#[allow(missing_docs)] // the macro writes an undocumented function
mod group {
    use super::{closed_path, half_open_path};
    criterion::criterion_group!(benches, closed_path, half_open_path);
}
use group::benches;
criterion_main!(benches);
