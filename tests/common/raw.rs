//! A publisher that writes AMQP 0-9-1 frames byte by byte, for messages no
//! well-behaved client would send: headers nested thousands of levels deep,
//! names that are not UTF-8. It speaks just enough of the protocol to log
//! in, open a channel in confirm mode, publish and wait for the confirm.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const FRAME_END: u8 = 0xCE;

/// Properties of a raw message; header tables are given as wire bytes
/// (length prefix included), so they can be anything.
#[derive(Debug, Default, Clone)]
pub struct RawProps {
    pub content_type: Option<Vec<u8>>,
    pub headers: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
}

pub struct RawPublisher {
    stream: TcpStream,
    frame_max: u32,
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("short string"));
    out.extend_from_slice(s);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s);
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// A table with one entry `key` → `value` (type byte included), as wire bytes.
pub fn table(entries: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in entries {
        short(&mut body, k);
        body.extend_from_slice(v);
    }
    let mut t = Vec::new();
    long(&mut t, &body);
    t
}

/// A long-string value (type byte `S`).
pub fn long_string(s: &[u8]) -> Vec<u8> {
    let mut v = vec![b'S'];
    long(&mut v, s);
    v
}

/// Headers `{"deep": {"k": {"k": …}}}` nested `depth` tables deep.
pub fn nested_headers(depth: usize) -> Vec<u8> {
    let mut inner = table(&[]);
    for _ in 0..depth {
        let mut v = vec![b'F'];
        v.extend_from_slice(&inner);
        inner = table(&[(b"k", v)]);
    }
    let mut v = vec![b'F'];
    v.extend_from_slice(&inner);
    table(&[(b"deep", v)])
}

/// Parses `amqp://user:pass@host:port/vhost`.
fn parts(uri: &str) -> (String, String, String, String) {
    let url = url::Url::parse(uri).expect("AMQP_ADDR is a URL");
    let user = url.username();
    let user = if user.is_empty() { "guest" } else { user };
    let pass = url.password().unwrap_or("guest");
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5672);
    let vhost = url.path().trim_start_matches('/');
    let vhost = if vhost.is_empty() {
        "/".to_owned()
    } else {
        url::form_urlencoded::parse(format!("v={vhost}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| "/".into())
    };
    (
        user.to_owned(),
        percent(pass),
        format!("{host}:{port}"),
        vhost,
    )
}

fn percent(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl RawPublisher {
    /// Logs in to the broker at `uri` and opens channel 1 in confirm mode.
    pub fn connect(uri: &str) -> io::Result<Self> {
        let (user, pass, addr, vhost) = parts(uri);
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut p = Self {
            stream,
            frame_max: 131_072,
        };
        p.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        p.expect_method(0, 10, 10)?; // connection.start
        let mut args = Vec::new();
        long(&mut args, &[]); // client properties: an empty table
        short(&mut args, b"PLAIN");
        let mut response = vec![0];
        response.extend_from_slice(user.as_bytes());
        response.push(0);
        response.extend_from_slice(pass.as_bytes());
        long(&mut args, &response);
        short(&mut args, b"en_US");
        p.send_method(0, 10, 11, &args)?;
        let tune = p.expect_method(0, 10, 30)?; // connection.tune
        let channel_max = u16::from_be_bytes([tune[0], tune[1]]);
        let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
        if frame_max != 0 {
            p.frame_max = frame_max;
        }
        let mut args = channel_max.to_be_bytes().to_vec();
        args.extend_from_slice(&p.frame_max.to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        p.send_method(0, 10, 31, &args)?;
        let mut args = Vec::new();
        short(&mut args, vhost.as_bytes());
        short(&mut args, b"");
        args.push(0);
        p.send_method(0, 10, 40, &args)?;
        p.expect_method(0, 10, 41)?;
        p.send_method(1, 20, 10, &[0])?; // channel.open
        p.expect_method(1, 20, 11)?;
        p.send_method(1, 85, 10, &[0])?; // confirm.select
        p.expect_method(1, 85, 11)?;
        Ok(p)
    }

    /// The broker's frame_max: a header frame must fit in it.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Publishes to `queue` through the default exchange and waits for the
    /// broker's confirm.
    pub fn publish(&mut self, queue: &str, props: &RawProps, body: &[u8]) -> io::Result<()> {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, b"");
        short(&mut args, queue.as_bytes());
        args.push(0);
        self.send_method(1, 60, 40, &args)?;
        let mut flags = 0x1000u16; // delivery mode
        let mut list = Vec::new();
        if let Some(ct) = &props.content_type {
            flags |= 0x8000;
            short(&mut list, ct);
        }
        if let Some(h) = &props.headers {
            flags |= 0x2000;
            list.extend_from_slice(h);
        }
        list.push(2); // persistent
        if let Some(id) = &props.message_id {
            flags |= 0x0080;
            short(&mut list, id);
        }
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&list);
        assert!(
            header.len() + 8 <= self.frame_max as usize,
            "the header frame ({} bytes) must fit in frame_max {}",
            header.len(),
            self.frame_max
        );
        self.send_frame(2, 1, &header)?;
        for chunk in body.chunks(self.frame_max as usize - 8) {
            self.send_frame(3, 1, chunk)?;
        }
        let ack = self.read_method(1)?;
        match (ack.0, ack.1) {
            (60, 80) => Ok(()),
            other => Err(io::Error::other(format!(
                "expected basic.ack, got class/method {other:?}"
            ))),
        }
    }

    pub fn close(mut self) {
        let mut args = 200u16.to_be_bytes().to_vec();
        short(&mut args, b"bye");
        args.extend_from_slice(&[0, 0, 0, 0]);
        let _ = self.send_method(0, 10, 50, &args);
        let _ = self.read_method(0);
    }

    fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) -> io::Result<()> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        f.extend_from_slice(payload);
        f.push(FRAME_END);
        self.stream.write_all(&f)
    }

    fn send_method(&mut self, channel: u16, class: u16, id: u16, args: &[u8]) -> io::Result<()> {
        self.send_frame(1, channel, &method(class, id, args))
    }

    /// The next method frame on `channel`: (class, method, arguments).
    /// Heartbeats and other channels' frames are skipped.
    fn read_method(&mut self, channel: u16) -> io::Result<(u16, u16, Vec<u8>)> {
        loop {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head)?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload)?;
            payload.pop();
            let on = u16::from_be_bytes([head[1], head[2]]);
            if head[0] != 1 || on != channel {
                continue;
            }
            let class = u16::from_be_bytes([payload[0], payload[1]]);
            let id = u16::from_be_bytes([payload[2], payload[3]]);
            if (class, id) == (10, 50) || (class, id) == (20, 40) {
                return Err(io::Error::other(format!(
                    "the broker closed the {}: {}",
                    if class == 10 { "connection" } else { "channel" },
                    String::from_utf8_lossy(&payload[7..])
                )));
            }
            return Ok((class, id, payload[4..].to_vec()));
        }
    }

    fn expect_method(&mut self, channel: u16, class: u16, id: u16) -> io::Result<Vec<u8>> {
        let (c, m, args) = self.read_method(channel)?;
        if (c, m) == (class, id) {
            Ok(args)
        } else {
            Err(io::Error::other(format!(
                "expected method {class}.{id}, got {c}.{m}"
            )))
        }
    }
}
