//! What the workers of a fleet say to each other on the fleet exchange: one
//! JSON object per message, read as hostile (anyone allowed to publish to
//! the exchange can send anything).

use serde::{Deserialize, Serialize};

/// The version this build speaks; others are ignored.
pub(crate) const VERSION: u32 = 1;

/// The largest message read; a bigger one is ignored unread.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

/// At most this many breakers in one message.
const MAX_ENTRIES: usize = 1024;

/// Names and reasons longer than this are refused.
const MAX_TEXT: usize = 255;

/// A breaker's state as the fleet announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum WireState {
    Open,
    HalfOpen,
    Closed,
    Reset,
    ForcedOpen,
    Disabled,
}

impl WireState {
    pub(crate) fn name(self) -> &'static str {
        match self {
            WireState::Open => "open",
            WireState::HalfOpen => "half-open",
            WireState::Closed => "closed",
            WireState::Reset => "reset",
            WireState::ForcedOpen => "forced-open",
            WireState::Disabled => "disabled",
        }
    }
}

/// One breaker's state, stamped with the epoch and the worker that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub name: String,
    pub epoch: u64,
    /// The worker (`ID#INCARNATION`) whose change this is.
    pub origin: String,
    pub state: WireState,
    /// Why (a transition reason: `consecutive-failures`, `manual-open`, …).
    pub reason: String,
    /// For `open`: the end of the open period, in Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
}

/// What a message asks of its readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// States to take over where newer.
    State,
    /// A worker joined: every other worker answers with its states.
    Sync,
    /// A worker's failures in a row, or its window's counts, changed.
    Streak,
    /// A worker is alive: sent every heartbeat, with the probe leases it
    /// holds. A worker also reads its own to know it is still heard.
    Hello,
}

/// One breaker's failures in a row on the sending worker, while closed at
/// `epoch` (a streak from an older epoch is out of date), and the calls in
/// its window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StreakEntry {
    pub name: String,
    pub epoch: u64,
    pub failures: u32,
    /// The sender's window now (for the fleet-wide rate rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WireCounts>,
}

/// Calls, failures and slow calls in a worker's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireCounts {
    pub calls: u64,
    pub failures: u64,
    pub slow: u64,
}

impl WireCounts {
    /// Counts that make sense (failures and slow calls are calls).
    pub(crate) fn is_sane(&self) -> bool {
        self.failures <= self.calls && self.slow <= self.calls
    }
}

/// One message on the fleet exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub v: u32,
    /// The sender (`ID#INCARNATION`).
    pub worker: String,
    /// The sender's message counter, for logs and duplicates.
    pub seq: u64,
    pub kind: Kind,
    #[serde(default)]
    pub breakers: Vec<Entry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streaks: Vec<StreakEntry>,
    /// For `hello`: the breakers whose probe lease the sender holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<String>,
    /// For `hello`: the epoch of each breaker's state the sender holds, so
    /// a worker that made a change knows who has taken it over.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub epochs: std::collections::BTreeMap<String, u64>,
    /// For `state`: an answer to a `sync` (a joiner takes its states over
    /// whatever their epoch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answer: bool,
    /// When it was sent, in Unix milliseconds (with `fleet.key_file`,
    /// older than a minute is a replay).
    #[serde(default)]
    pub at_ms: u64,
}

impl Envelope {
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Reads a message, or says in a few words why it is not one.
pub(crate) fn parse(body: &[u8]) -> Result<Envelope, String> {
    if body.len() > MAX_MESSAGE {
        return Err(format!(
            "{} bytes is over the {MAX_MESSAGE}-byte limit",
            body.len()
        ));
    }
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| format!("not a fleet message: {e}"))?;
    if envelope.v != VERSION {
        return Err(format!(
            "version {} (this worker speaks {VERSION})",
            envelope.v
        ));
    }
    if envelope.worker.is_empty() || envelope.worker.len() > MAX_TEXT {
        return Err("no worker, or a worker name over 255 bytes".into());
    }
    if envelope.breakers.len() > MAX_ENTRIES
        || envelope.streaks.len() > MAX_ENTRIES
        || envelope.leases.len() > MAX_ENTRIES
    {
        return Err(format!("over {MAX_ENTRIES} breakers"));
    }
    if envelope.epochs.len() > MAX_ENTRIES {
        return Err(format!("over {MAX_ENTRIES} breakers"));
    }
    if envelope
        .leases
        .iter()
        .chain(envelope.epochs.keys())
        .any(|l| l.len() > MAX_TEXT)
    {
        return Err("a breaker name over 255 bytes".into());
    }
    if envelope
        .streaks
        .iter()
        .any(|s| s.window.is_some_and(|w| !w.is_sane()))
    {
        return Err("a window with more failures or slow calls than calls".into());
    }
    for e in &envelope.breakers {
        if e.name.len() > MAX_TEXT || e.origin.len() > MAX_TEXT || e.reason.len() > MAX_TEXT {
            return Err("a name, origin or reason over 255 bytes".into());
        }
        if e.origin.is_empty() {
            return Err("an entry without origin".into());
        }
    }
    if envelope.streaks.iter().any(|s| s.name.len() > MAX_TEXT) {
        return Err("a breaker name over 255 bytes".into());
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            name: "payments".into(),
            epoch: 3,
            origin: "host-1#ab".into(),
            state: WireState::Open,
            reason: "consecutive-failures".into(),
            until_ms: Some(1_800_000_000_000),
        }
    }

    #[test]
    fn a_message_reads_back_as_written() {
        let m = Envelope {
            v: VERSION,
            worker: "host-1#ab".into(),
            seq: 7,
            kind: Kind::State,
            breakers: vec![entry()],
            streaks: vec![StreakEntry {
                name: "payments".into(),
                epoch: 3,
                failures: 2,
                window: Some(WireCounts {
                    calls: 10,
                    failures: 4,
                    slow: 1,
                }),
            }],
            leases: vec!["payments".into()],
            epochs: [("payments".to_owned(), 3)].into(),
            answer: true,
            at_ms: 1_800_000_000_000,
        };
        assert_eq!(parse(&m.encode()), Ok(m));
    }

    #[test]
    fn foreign_versions_oversized_and_malformed_messages_are_refused() {
        let mut m = Envelope {
            v: 2,
            worker: "w".into(),
            seq: 1,
            kind: Kind::Sync,
            breakers: vec![],
            streaks: vec![],
            leases: vec![],
            epochs: std::collections::BTreeMap::new(),
            answer: false,
            at_ms: 0,
        };
        assert!(parse(&m.encode()).unwrap_err().contains("version 2"));
        m.v = VERSION;
        m.breakers = vec![Entry {
            reason: "x".repeat(300),
            ..entry()
        }];
        assert!(parse(&m.encode()).is_err());
        assert!(parse(&vec![b' '; MAX_MESSAGE + 1]).is_err());
        assert!(parse(b"{\"v\":1}").is_err());
        assert!(
            parse(&[b'['; 10_000]).is_err(),
            "deep nesting is an error, not a crash"
        );
        m.breakers.clear();
        m.kind = Kind::Streak;
        m.streaks = vec![StreakEntry {
            name: "b".into(),
            epoch: 1,
            failures: 1,
            window: Some(WireCounts {
                calls: 1,
                failures: 5,
                slow: 0,
            }),
        }];
        assert!(
            parse(&m.encode()).unwrap_err().contains("more failures"),
            "a window with more failures than calls"
        );
    }

    #[test]
    fn a_message_from_a_build_before_hello_and_windows_still_reads() {
        let old = br#"{"v":1,"worker":"a#1","seq":3,"kind":"streak","breakers":[],"streaks":[{"name":"b","epoch":2,"failures":4}]}"#;
        let m = parse(old).unwrap();
        assert_eq!((m.streaks[0].failures, m.streaks[0].window), (4, None));
        assert!(!m.answer && m.leases.is_empty());
    }
}
