//! Who may speak for the fleet.
//!
//! Anyone with write permission on the fleet exchange can publish to it, so
//! a message is taken only when
//! - its AMQP `user_id` is one of `fleet.users` (the broker refuses a
//!   `user_id` that is not the publishing connection's user, so it cannot
//!   be forged without that user's password or the `impersonator` tag), and
//! - with `fleet.key_file`, it carries a valid HMAC-SHA256 of its body, was
//!   sent within [`MAX_AGE`] and is newer than the last message of its
//!   sender (a recorded message cannot be replayed).
//!
//! Everything else is ignored, counted, and logged once per user and reason.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::time::Instant;
use tracing::{debug, warn};

/// The header carrying the HMAC (lowercase hex) when `fleet.key_file` is set.
pub(crate) const MAC_HEADER: &str = "x-rabbit-guard-mac";

/// The shortest key `fleet.key_file` may hold.
pub(crate) const MIN_KEY: usize = 32;

/// With a key, messages sent longer ago than this (by the sender's clock,
/// against this worker's) are refused: a replay window.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(60);

/// At most this many senders' last sequence numbers are kept.
const MAX_SENDERS: usize = 1024;

/// At most this many (user, reason) pairs are remembered as logged.
const MAX_LOGGED: usize = 64;

/// The fleet's shared secret; `Debug` shows `***`, never the bytes.
#[derive(Clone)]
pub(crate) struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(***)")
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// The secret in a key file: its bytes without surrounding whitespace, if
/// long enough.
pub(crate) fn key_from(bytes: &[u8]) -> Option<Key> {
    let key = bytes.trim_ascii();
    (key.len() >= MIN_KEY).then(|| Key(key.to_vec()))
}

/// The lowercase hex HMAC-SHA256 of `body` under `key`.
pub(crate) fn mac(key: &[u8], body: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn verify(key: &[u8], body: &[u8], hex: &[u8]) -> bool {
    if hex.len() != 64 {
        return false;
    }
    let mut tag = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let Some(byte) = std::str::from_utf8(pair)
            .ok()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
        else {
            return false;
        };
        tag[i] = byte;
    }
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body);
    // Constant-time comparison.
    m.verify_slice(&tag).is_ok()
}

/// Why a message was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No `user_id`, or one not in `fleet.users`.
    User(Option<String>),
    /// No MAC, or a wrong one.
    Mac,
    /// Sent too long ago, or not newer than the sender's last message.
    Replay,
}

impl Refusal {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Refusal::User(_) => "user",
            Refusal::Mac => "mac",
            Refusal::Replay => "replay",
        }
    }
}

/// The fleet's trust rule, and what it refused.
#[derive(Debug)]
pub(crate) struct Trust {
    users: BTreeSet<String>,
    key: Option<Key>,
    /// Per sender (origin), the last sequence number taken.
    last_seq: Mutex<BTreeMap<String, (u64, Instant)>>,
    logged: Mutex<BTreeSet<(String, &'static str)>>,
}

impl Trust {
    /// Takes messages from `users` (signed with `key`, if any).
    pub(crate) fn new(users: impl IntoIterator<Item = String>, key: Option<Key>) -> Self {
        Self {
            users: users.into_iter().collect(),
            key,
            last_seq: Mutex::new(BTreeMap::new()),
            logged: Mutex::new(BTreeSet::new()),
        }
    }

    pub(crate) fn users(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(String::as_str)
    }

    /// The MAC header value for a body this worker sends, if keyed.
    pub(crate) fn sign(&self, body: &[u8]) -> Option<String> {
        self.key.as_ref().map(|k| mac(k, body))
    }

    /// Checks who sent a message, before its body is read.
    pub(crate) fn check_sender(
        &self,
        user_id: Option<&str>,
        mac: Option<&[u8]>,
        body: &[u8],
    ) -> Result<(), Refusal> {
        match user_id {
            Some(u) if self.users.contains(u) => {}
            other => return Err(Refusal::User(other.map(crate::text::printable))),
        }
        if let Some(key) = &self.key
            && !mac.is_some_and(|m| verify(key, body, m))
        {
            return Err(Refusal::Mac);
        }
        Ok(())
    }

    /// With a key, refuses a replayed message: one sent more than
    /// [`MAX_AGE`] from now, or not newer than its sender's last.
    pub(crate) fn check_fresh(
        &self,
        origin: &str,
        seq: u64,
        sent_ms: u64,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        if self.key.is_none() {
            return Ok(());
        }
        let age = now_ms.abs_diff(sent_ms);
        if u128::from(age) > MAX_AGE.as_millis() {
            return Err(Refusal::Replay);
        }
        let mut last = lock(&self.last_seq);
        if last.get(origin).is_some_and(|(s, _)| seq <= *s) {
            return Err(Refusal::Replay);
        }
        if last.len() >= MAX_SENDERS && !last.contains_key(origin) {
            // Forget the longest-silent sender: its next message is then
            // judged by its age alone.
            if let Some(oldest) = last
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                last.remove(&oldest);
            }
        }
        last.insert(origin.to_owned(), (seq, Instant::now()));
        Ok(())
    }

    /// Logs a refusal: a warning the first time for this user and reason,
    /// then at debug level.
    pub(crate) fn log(&self, exchange: &str, refusal: &Refusal) {
        let user = match refusal {
            Refusal::User(u) => u.clone().unwrap_or_else(|| "(none)".into()),
            _ => String::new(),
        };
        let first = {
            let mut logged = lock(&self.logged);
            logged.len() < MAX_LOGGED && logged.insert((user.clone(), refusal.kind()))
        };
        let why = match refusal {
            Refusal::User(None) => {
                "it carries no user_id: fleet members always send theirs".to_owned()
            }
            Refusal::User(Some(_)) => format!(
                "its sender's broker user {user:?} is not in fleet.users ({})",
                self.users.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            Refusal::Mac => "its HMAC is missing or wrong (fleet.key_file)".to_owned(),
            Refusal::Replay => {
                "it is a replay: sent over a minute before or after now by this worker's clock (if no one replays \
                 messages, the two workers' clocks differ by that much: keep them in sync, with NTP say), \
                 or not newer than its sender's last"
                    .to_owned()
            }
        };
        if first {
            warn!(exchange = %exchange, refused = refusal.kind(), user = %user, "ignored a message on the fleet exchange: {why}; further ones like it are counted in /breakers (fleet.refused) and logged at debug level");
        } else {
            debug!(exchange = %exchange, refused = refusal.kind(), user = %user, "ignored a message on the fleet exchange: {why}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_users_are_taken() {
        let t = Trust::new(["guest".to_owned()], None);
        assert_eq!(t.check_sender(Some("guest"), None, b"{}"), Ok(()));
        assert_eq!(
            t.check_sender(Some("mallory"), None, b"{}"),
            Err(Refusal::User(Some("mallory".into())))
        );
        assert_eq!(t.check_sender(None, None, b"{}"), Err(Refusal::User(None)));
    }

    #[test]
    fn with_a_key_only_signed_fresh_unreplayed_messages_are_taken() {
        let key = key_from(&[b'k'; 40]).unwrap();
        let t = Trust::new(["guest".to_owned()], Some(key.clone()));
        let body = br#"{"v":1}"#;
        let good = mac(&key, body);
        assert_eq!(
            t.check_sender(Some("guest"), Some(good.as_bytes()), body),
            Ok(())
        );
        assert_eq!(t.check_sender(Some("guest"), None, body), Err(Refusal::Mac));
        let other = mac(&key_from(&[b'x'; 40]).unwrap(), body);
        assert_eq!(
            t.check_sender(Some("guest"), Some(other.as_bytes()), body),
            Err(Refusal::Mac)
        );
        assert_eq!(
            t.check_sender(Some("guest"), Some(b"zz"), body),
            Err(Refusal::Mac)
        );
        assert_eq!(
            t.check_sender(Some("guest"), Some(good.as_bytes()), b"{\"v\":2}"),
            Err(Refusal::Mac),
            "a signature covers its body only"
        );
        let now = 1_000_000_000;
        assert_eq!(t.check_fresh("a#1", 5, now - 1_000, now), Ok(()));
        assert_eq!(
            t.check_fresh("a#1", 5, now, now),
            Err(Refusal::Replay),
            "the same sequence number again"
        );
        assert_eq!(t.check_fresh("a#1", 6, now, now), Ok(()));
        assert_eq!(
            t.check_fresh("b#1", 1, now - 61_000, now),
            Err(Refusal::Replay),
            "too old"
        );
        assert!(key_from(b"  short  \n").is_none());
    }

    #[test]
    fn without_a_key_freshness_is_not_checked() {
        let t = Trust::new(["guest".to_owned()], None);
        assert_eq!(t.check_fresh("a#1", 1, 0, u64::MAX), Ok(()));
        assert_eq!(t.check_fresh("a#1", 1, 0, u64::MAX), Ok(()));
    }
}
