//! Which broker a connection reached: product, version, Erlang release and
//! cluster name, from the server properties of `connection.start`.
//!
//! lapin reads those properties during its handshake and keeps none of them,
//! so after each connect the worker opens a short second connection to the
//! same node over the same transport (plain or TLS), reads them, and closes
//! it politely (`connection.open`, then `connection.close`, so the broker
//! logs a normal client and no "unexpectedly closed" warning). It is
//! best-effort: a failure is logged at debug level and changes nothing else.

use std::time::Duration;

use futures_util::{AsyncReadExt, AsyncWriteExt};
use lapin::tcp::{AMQPUriTcpExt, TLSConfig};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::{AMQPUri, SASLMechanism};

/// The largest frame read from the broker here (its `connection.start` is
/// about 500 bytes; a peer sending more is not a broker to trust).
const MAX_FRAME: usize = 64 * 1024;
/// How much of each property is kept.
const MAX_FIELD: usize = 80;

const FRAME_METHOD: u8 = 1;
const FRAME_END: u8 = 0xCE;
const CONNECTION: u16 = 10;
const START: u16 = 10;
const START_OK: u16 = 11;
const TUNE: u16 = 30;
const TUNE_OK: u16 = 31;
const OPEN: u16 = 40;
const OPEN_OK: u16 = 41;
const CLOSE: u16 = 50;
const CLOSE_OK: u16 = 51;

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

/// Why the broker could not be asked.
#[derive(Debug)]
pub(crate) enum ProbeError {
    /// No connection to the node (refused, unresolvable, TLS failed, no
    /// answer within the connect timeout): the worker's own connection
    /// would fail the same way.
    Unreachable(std::io::Error),
    /// Connected, but the properties could not be read.
    Unread(String),
}

/// Asks the node at `uri` who it is: connecting may take `connect_timeout`,
/// the rest at most `read_timeout`.
///
/// # Errors
///
/// [`ProbeError::Unreachable`] when the node cannot be reached,
/// [`ProbeError::Unread`] when it answered but not as expected.
pub(crate) async fn probe(
    uri: &AMQPUri,
    name: &str,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<ServerInfo, ProbeError> {
    if login(uri).is_none() {
        return Err(ProbeError::Unread(format!(
            "not read with the {:?} login mechanism",
            uri.query.auth_mechanism
        )));
    }
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| ProbeError::Unread(e.to_string()))?;
    let stream = tokio::time::timeout(
        connect_timeout,
        uri.connect_with_config_async(TLSConfig::default(), &runtime),
    )
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer within broker.connect_timeout ({})",
                humantime::format_duration(connect_timeout)
            ),
        ))
    })
    .map_err(ProbeError::Unreachable)?;
    tokio::time::timeout(read_timeout, read_properties(stream, uri, name))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {}",
                humantime::format_duration(read_timeout)
            ))
        })
        .map_err(ProbeError::Unread)
}

/// The login the worker's own connection uses (so the broker sees the
/// same, never a refused one): mechanism and response.
fn login(uri: &AMQPUri) -> Option<(&'static str, Vec<u8>)> {
    let user = &uri.authority.userinfo;
    match uri.query.auth_mechanism {
        None | Some(SASLMechanism::Plain) => {
            let mut response = vec![0];
            response.extend_from_slice(user.username.as_bytes());
            response.push(0);
            response.extend_from_slice(user.password.as_bytes());
            Some(("PLAIN", response))
        }
        Some(SASLMechanism::External) => Some(("EXTERNAL", Vec::new())),
        Some(SASLMechanism::Anonymous) => Some(("ANONYMOUS", Vec::new())),
        Some(_) => None,
    }
}

async fn read_properties<S>(mut stream: S, uri: &AMQPUri, name: &str) -> Result<ServerInfo, String>
where
    S: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin,
{
    let (mechanism, response) = login(uri).ok_or("unsupported login mechanism")?;
    let io = |e: std::io::Error| e.to_string();
    stream
        .write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .map_err(io)?;
    let start = read_method(&mut stream, START).await?;
    // version-major, version-minor, then the server properties.
    let table = start.get(2..).ok_or("a short connection.start")?;
    let (_, properties) = lapin::types::parsing::parse_field_table(table)
        .map_err(|_| "unreadable server properties".to_owned())?;
    let info = ServerInfo::from_properties(&properties);

    // Log in and out like any client, so the broker sees a clean close.
    let mut start_ok = Vec::new();
    let mut client_properties = Vec::new();
    push_short(&mut client_properties, "connection_name");
    client_properties.push(b'S');
    push_long(
        &mut client_properties,
        format!("{name} (broker info)").as_bytes(),
    );
    push_long(&mut start_ok, &client_properties);
    push_short(&mut start_ok, mechanism);
    push_long(&mut start_ok, &response);
    push_short(&mut start_ok, "en_US");
    write_method(&mut stream, START_OK, &start_ok).await?;
    let tune = read_method(&mut stream, TUNE).await?;
    let mut tune_ok = tune.get(..6).ok_or("a short connection.tune")?.to_vec();
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    write_method(&mut stream, TUNE_OK, &tune_ok).await?;
    let mut open = Vec::new();
    push_short(&mut open, &uri.vhost);
    push_short(&mut open, "");
    open.push(0);
    write_method(&mut stream, OPEN, &open).await?;
    read_method(&mut stream, OPEN_OK).await?;
    let mut close = 200u16.to_be_bytes().to_vec();
    push_short(&mut close, "broker info read");
    close.extend_from_slice(&[0, 0, 0, 0]);
    write_method(&mut stream, CLOSE, &close).await?;
    // The broker's close-ok; the socket closes either way.
    let _ = read_method(&mut stream, CLOSE_OK).await;
    let _ = stream.close().await;
    Ok(info)
}

fn push_short(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(255)];
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

fn push_long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

async fn write_method<S: futures_util::AsyncWrite + Unpin>(
    stream: &mut S,
    method: u16,
    args: &[u8],
) -> Result<(), String> {
    let size = u32::try_from(4 + args.len()).map_err(|_| "frame too large")?;
    let mut frame = vec![FRAME_METHOD, 0, 0];
    frame.extend_from_slice(&size.to_be_bytes());
    frame.extend_from_slice(&CONNECTION.to_be_bytes());
    frame.extend_from_slice(&method.to_be_bytes());
    frame.extend_from_slice(args);
    frame.push(FRAME_END);
    stream.write_all(&frame).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())
}

/// Reads one frame and returns the arguments of connection method `want`.
async fn read_method<S: futures_util::AsyncRead + Unpin>(
    stream: &mut S,
    want: u16,
) -> Result<Vec<u8>, String> {
    let mut header = [0u8; 7];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("reading a frame: {e}"))?;
    if &header[..4] == b"AMQP" {
        return Err("the broker does not speak AMQP 0-9-1".to_owned());
    }
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    if !(4..=MAX_FRAME).contains(&size) {
        return Err(format!("a frame of {size} bytes"));
    }
    let mut payload = vec![0u8; size + 1];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|e| format!("reading a frame: {e}"))?;
    if header[0] != FRAME_METHOD || header[1..3] != [0, 0] || payload[size] != FRAME_END {
        return Err("not a method frame".to_owned());
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    if (class, method) == (CONNECTION, CLOSE) {
        let code = payload
            .get(4..6)
            .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
        return Err(format!("the broker closed the connection ({code})"));
    }
    if (class, method) != (CONNECTION, want) {
        return Err(format!(
            "expected connection method {want}, got {class}.{method}"
        ));
    }
    payload.truncate(size);
    Ok(payload.split_off(4))
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
