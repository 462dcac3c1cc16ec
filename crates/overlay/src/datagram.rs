//! UDP flows over the overlay. A flow (one caller's address and port to one
//! endpoint) is one stream; each datagram on it is its length (two bytes,
//! big-endian) and then its bytes. Order holds and nothing is lost while the
//! stream lives (QUIC retransmits); the price is that a lost packet delays
//! the datagrams behind it in the same flow, as any UDP-over-TCP tunnel.
//!
//! A length the stream does not then carry (it ended in the middle of a
//! datagram) is an error, never a panic; every length fits in the two bytes,
//! so a peer cannot make the reader allocate more than [`MAX_DATAGRAM`].

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::net::UdpSocket;

use crate::mesh::{OverlayStream, StreamBytes};

/// Largest datagram a flow carries (a UDP payload is at most 65,507 bytes
/// over IPv4).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// The code a flow's stream is reset with when its socket failed.
const FAILED: u32 = 0;

thread_local! {
    /// Where flows' sockets read into: one buffer per thread.
    static RECEIVED: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// The sending half of a flow.
#[derive(Debug)]
pub struct DatagramSender {
    send: quinn::SendStream,
    bytes: Arc<StreamBytes>,
}

/// The receiving half of a flow.
#[derive(Debug)]
pub struct DatagramReceiver {
    recv: quinn::RecvStream,
    bytes: Arc<StreamBytes>,
}

impl DatagramSender {
    /// Sends one datagram (an error if longer than [`MAX_DATAGRAM`]).
    pub async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        let len = u16::try_from(datagram.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a datagram of {} bytes is longer than {MAX_DATAGRAM}",
                    datagram.len()
                ),
            )
        })?;
        let mut framed = BytesMut::with_capacity(2 + datagram.len());
        framed.put_u16(len);
        framed.extend_from_slice(datagram);
        self.send.write_chunk(framed.freeze()).await?;
        self.bytes.sent(datagram.len() as u64);
        Ok(())
    }

    /// Ends the flow from this side.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Ends the flow at once with `code`.
    pub fn reset(&mut self, code: u32) {
        let _ = self.send.reset(code.into());
    }
}

impl DatagramReceiver {
    /// The next datagram, or `None` once the other side ended the flow.
    /// Not cancel-safe: a call dropped halfway through a datagram loses the
    /// flow's framing, so read a flow from one loop for its whole life.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        let mut len = [0u8; 2];
        match self.recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the flow ended inside a datagram's length",
                ))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let mut datagram = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match self.recv.read_exact(&mut datagram).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the flow ended inside a datagram ({n} of {} bytes)",
                        datagram.len()
                    ),
                ))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        self.bytes.received(datagram.len() as u64);
        Ok(Some(Bytes::from(datagram)))
    }

    /// Tells the other side to stop sending, with `code`.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(code.into());
    }
}

impl OverlayStream {
    /// This stream as a flow of datagrams.
    pub fn into_datagrams(self) -> (DatagramSender, DatagramReceiver) {
        let OverlayStream { send, recv, bytes } = self;
        (
            DatagramSender {
                send,
                bytes: bytes.clone(),
            },
            DatagramReceiver { recv, bytes },
        )
    }

    /// Carries datagrams both ways between this stream and `udp` (a socket
    /// connected to its one peer) until the other side ends the flow, either
    /// fails, or `cut` resolves (then the stream is reset and stopped with
    /// `code`). An ICMP "port unreachable" from the peer (nothing listening
    /// yet) loses that datagram only. Every byte carried is added to `moved`.
    pub async fn join_udp_until(
        self,
        udp: &UdpSocket,
        cut: impl Future<Output = ()>,
        code: u32,
        moved: &AtomicU64,
    ) -> io::Result<()> {
        let (mut tx, mut rx) = self.into_datagrams();
        let up = async {
            loop {
                udp.readable().await?;
                // Read into the thread's buffer (never held across an
                // await), not one of 64 KiB per flow.
                let read = RECEIVED.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    udp.try_recv(&mut buf)
                        .map(|n| Bytes::copy_from_slice(&buf[..n]))
                });
                let d = match read {
                    Ok(d) => d,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err::<(), _>(e),
                };
                tx.send(&d).await?;
                moved.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        };
        let down = async {
            while let Some(d) = rx.recv().await? {
                match udp.send(&d).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e),
                }
                moved.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        };
        let (carried, code) = tokio::select! {
            r = up => (r, FAILED),
            r = down => (r, FAILED),
            () = cut => (Err(io::Error::from(io::ErrorKind::ConnectionAborted)), code),
        };
        match carried {
            // The other side ended the flow: end ours too.
            Ok(()) => tx.finish(),
            Err(_) => {
                tx.reset(code);
                rx.stop(code);
            }
        }
        carried
    }
}
