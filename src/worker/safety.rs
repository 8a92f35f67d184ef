//! Startup safety checks: settings that are valid but risky against this
//! broker. Each finding names the key, the risk and what to do.

use crate::config::{QueueType, Settings};

/// A quorum queue's delivery limit below this can dead-letter a message by
/// requeues alone: each breaker trip may requeue a prefetched message once,
/// and before RabbitMQ 4.3 requeues count towards the limit.
pub const MIN_SAFE_DELIVERY_LIMIT: u32 = 100;

/// Every risk found in `settings`, one sentence each.
#[must_use]
pub fn risks(settings: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let consumer_timeout = settings.broker.consumer_timeout;
    for (i, c) in settings.consumers.iter().enumerate() {
        if c.queue_type == QueueType::Quorum {
            match c.delivery_limit {
                None => out.push(format!(
                    "consumers[{i}] (queue {:?}): quorum queue without consumers[{i}].delivery_limit; RabbitMQ 4.0+ \
                     defaults to 20 deliveries and, before 4.3, counts requeues, so repeated breaker trips could \
                     dead-letter messages behind your back: set delivery_limit (at least {MIN_SAFE_DELIVERY_LIMIT}) \
                     or raise it with a policy",
                    c.queue
                )),
                Some(limit) if limit < MIN_SAFE_DELIVERY_LIMIT => out.push(format!(
                    "consumers[{i}].delivery_limit = {limit}: requeues on breaker trips count towards a quorum \
                     queue's delivery limit (before RabbitMQ 4.3); below {MIN_SAFE_DELIVERY_LIMIT} an outage could \
                     dead-letter messages behind your back"
                )),
                Some(_) => {}
            }
        }
        for name in c.breaker_names() {
            if let Some(b) = settings.breakers.get(name)
                && b.call_timeout >= consumer_timeout
            {
                out.push(format!(
                    "breakers.{}.call_timeout = {:?} is not below the broker's consumer_timeout ({:?}, \
                     broker.consumer_timeout): the broker would close the channel under a slow handler of queue {:?}",
                    name,
                    humantime::format_duration(b.call_timeout).to_string(),
                    humantime::format_duration(consumer_timeout).to_string(),
                    c.queue
                ));
            }
        }
    }
    out
}

/// Advice that does not stop a start even with `worker.safety_checks =
/// "refuse"`: choices that are common and valid but leave a known gap.
/// `check-config` prints them; `run` logs them once (unless
/// `worker.safety_checks = "off"`).
#[must_use]
pub fn advisories(settings: &Settings) -> Vec<String> {
    let classic = settings
        .consumers
        .iter()
        .enumerate()
        .filter(|(_, c)| c.queue_type == QueueType::Classic)
        .map(|(i, c)| {
            format!(
                "consumers[{i}] (queue {:?}): a classic work queue has no delivery limit, so a message \
                 that keeps taking its consumer down (a crash, an OOM kill) is redelivered forever; \
                 prefer queue_type = \"quorum\" with delivery_limit = 1000 (a new queue: an existing \
                 one keeps its type)",
                c.queue
            )
        });
    let vhost =
        crate::amqp::parse_uri(&settings.broker.url).map_or_else(|_| "/".to_owned(), |u| u.vhost);
    let policies = settings.consumers.iter().enumerate().filter_map(|(i, c)| {
        let command = crate::amqp::topology::Topology::of(i, c).policy_command(&vhost)?;
        Some(format!(
            "consumers[{i}] (queue {:?}): declare = \"policy\" leaves the work queue's arguments alone, \
             so the broker dead-letters what it drops itself (delivery limit, TTL, overflow) only once \
             a policy says where to; apply it with: {command}",
            c.queue
        ))
    });
    classic
        .chain(policies)
        .chain(exposed(
            "admin.token_file",
            settings.admin.token_file.as_deref(),
            "can open and close every breaker",
        ))
        .chain(exposed(
            "fleet.key_file",
            settings.fleet.key_file.as_deref(),
            "can speak for the fleet (open, close and disable every worker's breakers)",
        ))
        .collect()
}

/// A secret file readable by its group or by others.
fn exposed(key: &str, path: Option<&std::path::Path>, power: &str) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path?).ok()?.permissions().mode();
        (mode & 0o077 != 0).then(|| {
            format!(
                "{key} {} is readable by {} (mode {:o}): anyone who can read it {power}; chmod 600 it",
                path.unwrap_or_else(|| std::path::Path::new("")).display(),
                if mode & 0o007 != 0 { "every user" } else { "its group" },
                mode & 0o777
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = (key, path, power);
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::breaker::BreakerConfig;
    use crate::config::ConsumerSettings;

    fn one(c: ConsumerSettings, b: BreakerConfig) -> Settings {
        let mut s = Settings::default();
        s.breakers.insert("dep".into(), b);
        s.consumers.push(ConsumerSettings {
            queue: "q".into(),
            breaker: "dep".into(),
            handler: "noop".into(),
            ..c
        });
        s
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t0ken\n").unwrap();
        let mut s = Settings::default();
        s.admin.token_file = Some(path.clone());
        for (mode, warned) in [(0o600, false), (0o640, true), (0o644, true)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let advice = advisories(&s);
            assert_eq!(
                advice
                    .iter()
                    .any(|a| a.contains("admin.token_file") && a.contains("chmod 600")),
                warned,
                "mode {mode:o}: {advice:?}"
            );
            assert!(!advice.iter().any(|a| a.contains("t0ken")), "{advice:?}");
        }
    }

    #[test]
    fn quorum_without_or_with_a_low_delivery_limit_is_a_risk() {
        let quorum = |limit| ConsumerSettings {
            queue_type: QueueType::Quorum,
            delivery_limit: limit,
            ..ConsumerSettings::default()
        };
        let r = risks(&one(quorum(None), BreakerConfig::default()));
        assert!(r.len() == 1 && r[0].contains("delivery_limit"), "{r:?}");
        let r = risks(&one(quorum(Some(20)), BreakerConfig::default()));
        assert!(r.len() == 1 && r[0].contains("= 20"), "{r:?}");
        assert!(risks(&one(quorum(Some(1_000)), BreakerConfig::default())).is_empty());
        assert!(risks(&one(ConsumerSettings::default(), BreakerConfig::default())).is_empty());
    }

    #[test]
    fn a_classic_work_queue_is_advised_against_a_quorum_one_is_not() {
        let a = advisories(&one(ConsumerSettings::default(), BreakerConfig::default()));
        assert!(a.len() == 1 && a[0].contains("delivery limit"), "{a:?}");
        let quorum = ConsumerSettings {
            queue_type: QueueType::Quorum,
            delivery_limit: Some(1_000),
            ..ConsumerSettings::default()
        };
        assert!(advisories(&one(quorum, BreakerConfig::default())).is_empty());
    }

    #[test]
    fn call_timeout_at_or_over_the_consumer_timeout_is_a_risk() {
        let b = BreakerConfig {
            call_timeout: Duration::from_secs(45 * 60),
            ..BreakerConfig::default()
        };
        let r = risks(&one(ConsumerSettings::default(), b));
        assert!(r.len() == 1 && r[0].contains("consumer_timeout"), "{r:?}");
    }
}
