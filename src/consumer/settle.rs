//! Settling deliveries with as few frames as possible, without ever acking a
//! delivery before its handler finished.
//!
//! Deliveries are tracked in tag order. A run of finished acks at the front
//! goes out as one `basic.ack(multiple = true)`; a finished delivery stuck
//! behind a slow one is settled on its own once it has waited a flush interval,
//! so a slow handler never holds other messages' prefetch slots for long.

use std::collections::VecDeque;

/// How a finished delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    /// `basic.nack` with requeue: back to the queue, not an attempt.
    Requeue,
}

/// One frame to send on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Ack { tag: u64, multiple: bool },
    Requeue { tag: u64, multiple: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pending,
    Done(Settle),
    /// Settled out of order already; dropped when it reaches the front.
    Sent,
}

#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    entries: VecDeque<(u64, Slot)>,
    /// Finished entries behind the first pending one.
    blocked: usize,
}

impl AckTracker {
    /// A delivery arrived. Tags on one channel only grow.
    pub(crate) fn received(&mut self, tag: u64) {
        debug_assert!(self.entries.back().is_none_or(|(t, _)| *t < tag));
        self.entries.push_back((tag, Slot::Pending));
    }

    /// Deliveries received and not yet settled.
    pub(crate) fn unsettled(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, s)| !matches!(s, Slot::Sent))
            .count()
    }

    /// True when finished deliveries wait behind an unfinished one.
    pub(crate) fn has_blocked(&self) -> bool {
        self.blocked > 0
    }

    /// A delivery's handler finished. Unknown tags (already settled) are ignored
    /// and reported as `false`.
    pub(crate) fn finish(&mut self, tag: u64, settle: Settle) -> bool {
        let Ok(i) = self.entries.binary_search_by_key(&tag, |(t, _)| *t) else {
            return false;
        };
        if self.entries[i].1 != Slot::Pending {
            return false;
        }
        self.entries[i].1 = Slot::Done(settle);
        if i > 0 {
            self.blocked += 1;
        }
        true
    }

    /// Frames for everything settleable in order: runs of acks at the front
    /// merge into one multiple-ack, runs of requeues into one multiple-nack.
    pub(crate) fn take_in_order(&mut self, ops: &mut Vec<Op>) {
        let mut run: Option<(Settle, u64)> = None;
        while let Some(&(tag, slot)) = self.entries.front() {
            match slot {
                Slot::Pending => break,
                Slot::Sent => {
                    // Already settled; it ends a run, since a multiple frame
                    // must not reach past a tag we settled differently.
                    self.entries.pop_front();
                    self.blocked = self.blocked.saturating_sub(1);
                    flush_run(&mut run, ops);
                }
                Slot::Done(settle) => {
                    self.entries.pop_front();
                    if run.is_some_and(|(s, _)| s != settle) {
                        flush_run(&mut run, ops);
                    }
                    run = Some((settle, tag));
                }
            }
        }
        flush_run(&mut run, ops);
        self.recount_blocked();
    }

    /// Frames for finished deliveries stuck behind unfinished ones, one each.
    pub(crate) fn take_blocked(&mut self, ops: &mut Vec<Op>) {
        self.take_in_order(ops);
        for (tag, slot) in &mut self.entries {
            if let Slot::Done(settle) = *slot {
                ops.push(single(settle, *tag));
                *slot = Slot::Sent;
            }
        }
        self.blocked = 0;
    }

    /// Forgets every delivery (the channel is gone: the broker requeued them).
    /// Returns how many were unsettled.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.unsettled();
        self.entries.clear();
        self.blocked = 0;
        n
    }

    fn recount_blocked(&mut self) {
        // After popping the front run, the front (if any) is Pending; every
        // Done entry left is blocked behind it.
        self.blocked = self
            .entries
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Done(_)))
            .count();
    }
}

fn single(settle: Settle, tag: u64) -> Op {
    match settle {
        Settle::Ack => Op::Ack {
            tag,
            multiple: false,
        },
        Settle::Requeue => Op::Requeue {
            tag,
            multiple: false,
        },
    }
}

fn flush_run(run: &mut Option<(Settle, u64)>, ops: &mut Vec<Op>) {
    if let Some((settle, tag)) = run.take() {
        // `multiple` covers every unsettled tag up to `tag`; all of those in
        // this run are ours to settle this way, and earlier ones are settled.
        ops.push(match settle {
            Settle::Ack => Op::Ack {
                tag,
                multiple: true,
            },
            Settle::Requeue => Op::Requeue {
                tag,
                multiple: true,
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(t: &mut AckTracker) -> Vec<Op> {
        let mut v = Vec::new();
        t.take_in_order(&mut v);
        v
    }

    #[test]
    fn in_order_run_becomes_one_multiple_ack() {
        let mut t = AckTracker::default();
        for tag in 1..=5 {
            t.received(tag);
        }
        for tag in [2, 1, 3] {
            t.finish(tag, Settle::Ack);
        }
        assert_eq!(
            ops(&mut t),
            [Op::Ack {
                tag: 3,
                multiple: true
            }]
        );
        assert_eq!(t.unsettled(), 2);
        assert!(ops(&mut t).is_empty(), "4 and 5 are unfinished");
    }

    #[test]
    fn never_acks_past_an_unfinished_delivery() {
        let mut t = AckTracker::default();
        for tag in 1..=4 {
            t.received(tag);
        }
        t.finish(2, Settle::Ack);
        t.finish(4, Settle::Ack);
        assert!(
            ops(&mut t).is_empty(),
            "1 is unfinished: nothing may be acked with multiple"
        );
        assert!(t.has_blocked());
        let mut v = Vec::new();
        t.take_blocked(&mut v);
        assert_eq!(
            v,
            [
                Op::Ack {
                    tag: 2,
                    multiple: false
                },
                Op::Ack {
                    tag: 4,
                    multiple: false
                }
            ]
        );
        t.finish(1, Settle::Ack);
        // 1 goes alone: the run stops at 2, which was already sent.
        assert_eq!(
            ops(&mut t),
            [Op::Ack {
                tag: 1,
                multiple: true
            }]
        );
        assert_eq!(t.unsettled(), 1, "3 is still unfinished");
    }

    #[test]
    fn mixed_settles_split_runs() {
        let mut t = AckTracker::default();
        for tag in 1..=5 {
            t.received(tag);
        }
        t.finish(1, Settle::Ack);
        t.finish(2, Settle::Ack);
        t.finish(3, Settle::Requeue);
        t.finish(4, Settle::Ack);
        assert_eq!(
            ops(&mut t),
            [
                Op::Ack {
                    tag: 2,
                    multiple: true
                },
                Op::Requeue {
                    tag: 3,
                    multiple: true
                },
                Op::Ack {
                    tag: 4,
                    multiple: true
                },
            ]
        );
    }

    #[test]
    fn unknown_or_twice_finished_tags_are_refused() {
        let mut t = AckTracker::default();
        t.received(7);
        assert!(!t.finish(6, Settle::Ack));
        assert!(t.finish(7, Settle::Ack));
        assert!(!t.finish(7, Settle::Ack), "a delivery is settled once");
        assert_eq!(t.clear(), 1);
    }
}
