//! Limits every part checks against: past them a value would overflow the
//! clock, not fit the protocol, or cost without bound.

use std::time::Duration;

/// The longest duration any setting takes: 100 years (`"100y"`), which
/// means "forever" and still leaves room to add it to the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000);

/// Longest name AMQP can carry (a queue, an exchange, a routing key, a
/// short string): 255 bytes.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// Most `retry.immediate` calls per delivery: each one is another call to
/// a dependency that just failed, inside one delivery's time.
pub(crate) const MAX_IMMEDIATE_RETRIES: u32 = 10;
