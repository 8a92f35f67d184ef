//! What the other workers of the fleet report about one breaker's calls:
//! each one's failures in a row and its window, counted only while fresh
//! (heard lately, so from a live worker) and of the current epoch (a
//! report from before the breaker's last change is about calls that no
//! longer count).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::wire::{StreakEntry, WireCounts};
use crate::breaker::Counts;

/// At most this many workers' reports are kept per breaker.
pub(crate) const MAX_ORIGINS: usize = 256;

/// A worker's window counts only this long after it was heard: a worker
/// re-announces a non-empty window every [`WINDOW_REFRESH`], so a silent
/// one has stopped (or lost the fleet), and its calls are no news.
pub(crate) const WINDOW_FRESH: Duration = Duration::from_millis(1_500);

/// How often a worker re-announces a window that has calls in it.
pub(crate) const WINDOW_REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
struct Report {
    failures: u32,
    window: Option<WireCounts>,
    heard: Instant,
}

/// The other workers' reports on one breaker.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    reports: BTreeMap<String, Report>,
}

/// The fleet's part of a breaker's rules, summed over fresh reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sums {
    pub streak: u32,
    pub window: Counts,
}

impl Tally {
    /// Takes a worker's report (a newer one replaces its last).
    pub(crate) fn report(&mut self, from: &str, entry: &StreakEntry, now: Instant) {
        if self.reports.len() >= MAX_ORIGINS && !self.reports.contains_key(from) {
            return;
        }
        self.reports.insert(
            from.to_owned(),
            Report {
                failures: entry.failures,
                window: entry.window,
                heard: now,
            },
        );
    }

    /// Forgets every report (the breaker changed state).
    pub(crate) fn clear(&mut self) {
        self.reports.clear();
    }

    /// Drops what is out of date and sums the rest: streaks heard within
    /// the breaker's `window`, windows heard within [`WINDOW_FRESH`].
    pub(crate) fn sums(&mut self, window: Duration, now: Instant) -> Sums {
        self.reports.retain(|_, r| {
            let age = now.saturating_duration_since(r.heard);
            (r.failures > 0 && age <= window)
                || (r.window.is_some_and(|w| w.calls > 0) && age <= WINDOW_FRESH)
        });
        let mut sums = Sums::default();
        for r in self.reports.values() {
            let age = now.saturating_duration_since(r.heard);
            if age <= window {
                sums.streak = sums.streak.saturating_add(r.failures);
            }
            if let Some(w) = r.window
                && age <= WINDOW_FRESH
            {
                sums.window.calls = sums.window.calls.saturating_add(w.calls);
                sums.window.failures = sums.window.failures.saturating_add(w.failures);
                sums.window.slow = sums.window.slow.saturating_add(w.slow);
            }
        }
        sums
    }

    /// Who contributed what, for the log line of a trip the fleet caused:
    /// `w1#3f2a: 4 in a row, 6/9 failed; w2#77c1: …`.
    pub(crate) fn contributors(&self) -> String {
        self.reports
            .iter()
            .map(|(origin, r)| {
                let window = r.window.map_or_else(String::new, |w| {
                    format!(", {}/{} failed, {} slow", w.failures, w.calls, w.slow)
                });
                format!(
                    "{}: {} in a row{window}",
                    crate::text::printable(origin),
                    r.failures
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(failures: u32, calls: u64, failed: u64) -> StreakEntry {
        StreakEntry {
            name: "b".into(),
            epoch: 1,
            failures,
            window: Some(WireCounts {
                calls,
                failures: failed,
                slow: 0,
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn windows_count_while_fresh_and_streaks_within_the_window() {
        let mut t = Tally::default();
        let window = Duration::from_secs(10);
        t.report("a#1", &entry(3, 5, 4), Instant::now());
        t.report("b#1", &entry(0, 8, 0), Instant::now());
        let s = t.sums(window, Instant::now());
        assert_eq!((s.streak, s.window.calls, s.window.failures), (3, 13, 4));
        // A newer report from a replaces its last.
        t.report("a#1", &entry(4, 6, 5), Instant::now());
        let s = t.sums(window, Instant::now());
        assert_eq!((s.streak, s.window.calls, s.window.failures), (4, 14, 5));
        // b falls silent: its window no longer counts, a's streak still does.
        tokio::time::advance(WINDOW_FRESH + Duration::from_millis(1)).await;
        let s = t.sums(window, Instant::now());
        assert_eq!((s.streak, s.window.calls), (4, 0), "{s:?}");
        assert!(t.contributors().contains("a#1: 4 in a row"));
        tokio::time::advance(window).await;
        assert_eq!(t.sums(window, Instant::now()), Sums::default());
        assert!(t.is_empty(), "everything out of date is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_origins_is_bounded() {
        let mut t = Tally::default();
        for i in 0..MAX_ORIGINS + 50 {
            t.report(
                &format!("w{i}"),
                &entry(u32::MAX, u64::MAX, u64::MAX),
                Instant::now(),
            );
        }
        let s = t.sums(Duration::from_secs(10), Instant::now());
        assert_eq!(t.reports.len(), MAX_ORIGINS);
        assert_eq!(
            (s.streak, s.window.calls),
            (u32::MAX, u64::MAX),
            "saturates"
        );
    }
}
