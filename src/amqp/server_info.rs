//! Which broker a connection reached: product, version, Erlang release and
//! cluster name, from the server properties of `connection.start`, which
//! rabbit-guard's lapin keeps (`Configuration::server_properties`, a few
//! lines of `vendor/lapin.patch`).

use lapin::types::{AMQPValue, FieldTable};

/// How much of each property is kept.
const MAX_FIELD: usize = 80;

/// What a broker says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerInfo {
    /// `RabbitMQ`.
    pub(crate) product: Option<String>,
    /// `4.0.5`.
    pub(crate) version: Option<String>,
    /// `Erlang/OTP 27.2`.
    pub(crate) platform: Option<String>,
    /// `rabbit@node1`.
    pub(crate) cluster_name: Option<String>,
}

impl std::fmt::Display for ServerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.product.as_deref().unwrap_or("unknown broker"),
            self.version.as_deref().unwrap_or("(version unknown)")
        )?;
        if let Some(platform) = &self.platform {
            write!(f, " on {platform}")?;
        }
        if let Some(cluster) = &self.cluster_name {
            write!(f, ", cluster {cluster}")?;
        }
        Ok(())
    }
}

impl ServerInfo {
    /// The properties a broker sent, each made printable and bounded.
    #[must_use]
    pub(crate) fn from_properties(properties: &FieldTable) -> Self {
        let field = |name: &str| {
            let value = properties.inner().get(name)?;
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => return None,
            };
            let text = crate::text::truncate(&crate::text::printable(text.trim()), MAX_FIELD);
            (!text.is_empty()).then_some(text)
        };
        Self {
            product: field("product"),
            version: field("version"),
            platform: field("platform"),
            cluster_name: field("cluster_name"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_read_bounded_and_printable() {
        let mut t = FieldTable::default();
        t.insert("product".into(), AMQPValue::LongString("RabbitMQ".into()));
        t.insert("version".into(), AMQPValue::LongString("4.0.5".into()));
        t.insert(
            "platform".into(),
            AMQPValue::LongString("Erlang/OTP 27.2".into()),
        );
        t.insert(
            "cluster_name".into(),
            AMQPValue::LongString(format!("rabbit@n1\u{1b}[2J{}", "x".repeat(500)).into()),
        );
        let info = ServerInfo::from_properties(&t);
        let shown = info.to_string();
        assert!(
            shown.starts_with("RabbitMQ 4.0.5 on Erlang/OTP 27.2, cluster rabbit@n1"),
            "{shown}"
        );
        assert!(!shown.contains('\u{1b}'), "{shown}");
        assert!(shown.len() < 200, "{shown}");
        assert_eq!(
            ServerInfo::from_properties(&FieldTable::default()).to_string(),
            "unknown broker (version unknown)"
        );
        let mut odd = FieldTable::default();
        odd.insert("version".into(), AMQPValue::LongLongInt(4));
        assert_eq!(ServerInfo::from_properties(&odd).version, None);
    }
}
