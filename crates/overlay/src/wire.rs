//! What opens each overlay stream: a length-prefixed JSON request from the
//! opener, a length-prefixed JSON reply, then the raw bytes of the forwarded
//! connection in both directions.
//!
//! Frames are at most [`MAX_FRAME`] bytes; a longer length, a truncated frame
//! or a body that does not parse is an error naming the problem, never a panic.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::OverlayError;

/// Largest request or reply frame.
pub const MAX_FRAME: usize = 4096;

/// The first frame on a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum StreamRequest {
    /// Connect this stream to `target` on the receiving node.
    #[serde(rename_all = "camelCase")]
    Open {
        /// A service address the receiving node resolves (for example
        /// `replica/<id>:8080`).
        target: String,
        /// Set by a relay: who opened the stream at the other end. Ignored
        /// unless the stream arrives from a relay node.
        #[serde(default)]
        origin: Option<String>,
        /// Set by a relay on a [`crate::ALPN_RELAYED_DATAGRAMS`] connection
        /// (never sent on another, whose nodes would refuse the field): it
        /// forwards this flow's QUIC datagrams, each at most this many bytes
        /// (what it can carry on to the opener in a packet), so a UDP target
        /// may take them. Absent, a relayed flow's datagrams ride its stream.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        datagrams: Option<u32>,
    },
    /// Relay this stream to node `to`, which opens `target`.
    #[serde(rename_all = "camelCase")]
    Relay {
        /// The node id to reach.
        to: String,
        /// The target on that node.
        target: String,
        /// Set by the opener of a UDP flow on a
        /// [`crate::ALPN_RELAYED_DATAGRAMS`] connection (never sent on
        /// another): it takes the flow's QUIC datagrams from the relay.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        datagrams: bool,
    },
    /// Which address does this node see us at (for NAT traversal)?
    WhoAmI,
    /// To a relay: introduce us to node `to` (NAT traversal). The relay
    /// tells `to` the address it sees us at and answers with the address it
    /// sees `to` at; both then dial each other at once.
    #[serde(rename_all = "camelCase")]
    Punch {
        /// The node to reach.
        to: String,
    },
    /// From a relay: node `from`, seen at `address`, is dialing us; dial it
    /// too, so that both NATs let the other's packets in.
    #[serde(rename_all = "camelCase")]
    PunchFrom {
        /// Who.
        from: String,
        /// Its observed address.
        address: String,
    },
}

impl StreamRequest {
    /// Whether it asks for a relayed flow's QUIC datagrams (words of
    /// [`crate::ALPN_RELAYED_DATAGRAMS`] only).
    pub(crate) fn relays_datagrams(&self) -> bool {
        matches!(
            self,
            StreamRequest::Relay {
                datagrams: true,
                ..
            } | StreamRequest::Open {
                datagrams: Some(_),
                ..
            }
        )
    }
}

/// The reply frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamReply {
    /// Whether the stream is now connected.
    pub ok: bool,
    /// Why not, when not.
    #[serde(default)]
    pub error: String,
    /// For `WhoAmI`: the address the peer sees.
    #[serde(default)]
    pub observed: Option<String>,
    /// For a UDP flow opened with `datagrams` (through a relay): the flow's
    /// datagrams may travel as QUIC datagrams, each at most this many
    /// bytes (the flow's own, not counting its id: what the rest of the
    /// path carries in a packet); larger ones ride the stream. Absent, they
    /// all ride the stream. Nodes of earlier releases ignore it; a node
    /// joined directly does not send it (the connection's own limit holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datagrams: Option<u32>,
}

impl StreamReply {
    /// Connected.
    pub fn ok() -> Self {
        StreamReply {
            ok: true,
            error: String::new(),
            observed: None,
            datagrams: None,
        }
    }

    /// Refused, with the reason.
    pub fn refused(why: impl Into<String>) -> Self {
        StreamReply {
            ok: false,
            error: why.into(),
            observed: None,
            datagrams: None,
        }
    }
}

/// Writes one frame: a big-endian u16 length and the JSON body.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> Result<(), OverlayError> {
    let body = serde_json::to_vec(value).map_err(|e| OverlayError::Protocol(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(OverlayError::Protocol(format!(
            "frame of {} bytes exceeds the {MAX_FRAME}-byte limit",
            body.len()
        )));
    }
    let mut buf = Vec::with_capacity(2 + body.len());
    buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
        .await
        .map_err(|e| OverlayError::Io(format!("writing a frame: {e}")))
}

/// Reads one frame written by [`write_frame`].
pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<T, OverlayError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)
        .await
        .map_err(|e| OverlayError::Protocol(format!("reading a frame length: {e}")))?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_FRAME {
        return Err(OverlayError::Protocol(format!(
            "frame length {len} exceeds the {MAX_FRAME}-byte limit"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| OverlayError::Protocol(format!("reading a {len}-byte frame: {e}")))?;
    serde_json::from_slice(&body).map_err(|e| OverlayError::Protocol(format!("bad frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_errors() {
        let req = StreamRequest::Open {
            target: "replica/r1:8080".into(),
            origin: None,
            datagrams: None,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).await.expect("write");
        let back: StreamRequest = read_frame(&mut buf.as_slice()).await.expect("read");
        assert_eq!(back, req);
        // Without `datagrams` the request is what nodes of earlier
        // releases read (they refuse unknown fields).
        assert_eq!(
            &buf[2..],
            &br#"{"kind":"open","target":"replica/r1:8080","origin":null}"#[..]
        );
        let relay = StreamRequest::Relay {
            to: "cloudless://node/b".into(),
            target: "t".into(),
            datagrams: true,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &relay).await.expect("write");
        let back: StreamRequest = read_frame(&mut buf.as_slice()).await.expect("read");
        assert_eq!(back, relay);
        // A reply of an earlier release (no `datagrams`) reads as none, and
        // an earlier release reads ours (unknown fields are ignored there).
        let old: StreamReply = serde_json::from_str(r#"{"ok":true,"error":""}"#).expect("old");
        assert_eq!(old, StreamReply::ok());
        let ours = serde_json::to_string(&StreamReply {
            datagrams: Some(1_200),
            ..StreamReply::ok()
        })
        .expect("json");
        assert!(ours.contains(r#""datagrams":1200"#), "{ours}");

        // Truncated body.
        let cut = &buf[..buf.len() - 1];
        let e = read_frame::<_, StreamRequest>(&mut &cut[..])
            .await
            .expect_err("truncated");
        assert!(e.to_string().contains("reading a"), "{e}");
        // Oversized length.
        let big = [0xff, 0xff, b'{'];
        let e = read_frame::<_, StreamRequest>(&mut &big[..])
            .await
            .expect_err("too long");
        assert!(e.to_string().contains("exceeds"), "{e}");
        // Unknown kind and unknown fields.
        for body in [
            &br#"{"kind":"format","disk":"/"}"#[..],
            br#"{"kind":"open","target":"x","extra":1}"#,
        ] {
            let mut framed = (body.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(body);
            let e = read_frame::<_, StreamRequest>(&mut framed.as_slice())
                .await
                .expect_err("bad body");
            assert!(e.to_string().contains("bad frame"), "{e}");
        }
        // Writing an oversized frame is refused before anything is sent.
        let huge = StreamRequest::Open {
            target: "x".repeat(MAX_FRAME),
            origin: None,
            datagrams: None,
        };
        let mut out = Vec::new();
        assert!(write_frame(&mut out, &huge).await.is_err());
        assert!(out.is_empty());
    }
}
