//! Carries bytes between an overlay stream and a TCP connection, or between
//! two overlay streams (a relay), without an intermediate buffer: what the
//! socket yields is handed to QUIC as an owned chunk, and what QUIC received
//! is written from the chunk it arrived in. Each generic copy
//! (`tokio::io::copy_bidirectional`) would move every byte through a buffer
//! of its own first: one memory copy per byte more, on paths whose cost is
//! the CPU (encryption and copies on small devices).

use std::future::Future;
use std::io;

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::datagram::Room;
use crate::mesh::OverlayStream;

/// Most bytes read from a socket at once.
const CHUNK: usize = 256 * 1024;

/// Below this much room left in the read block, a new block is taken.
const MIN_READ: usize = 16 * 1024;

/// Most chunks (about a packet each) taken from QUIC at once.
const CHUNKS: usize = 128;

/// The code a stream is reset or stopped with when the other side failed.
const FAILED: u32 = 0;

impl OverlayStream {
    /// Carries bytes both ways between this stream and `tcp` until both
    /// directions have ended (an end read on one side shuts the other's
    /// write side) or either fails (which ends both at once: the other
    /// direction would otherwise wait on an idle peer for ever). The bytes
    /// carried to the overlay and from it.
    pub async fn join_tcp(self, tcp: &mut TcpStream) -> io::Result<(u64, u64)> {
        let moved = AtomicU64::new(0);
        self.join_tcp_until(tcp, std::future::pending(), FAILED, &moved)
            .await
    }

    /// [`join_tcp`](Self::join_tcp), or until `cut` resolves: then the
    /// stream is reset (and stopped) with `code`, and `tcp` shut. Every
    /// byte carried either way is added to `moved` as it goes.
    pub async fn join_tcp_until(
        self,
        tcp: &mut TcpStream,
        cut: impl Future<Output = ()>,
        code: u32,
        moved: &AtomicU64,
    ) -> io::Result<(u64, u64)> {
        let OverlayStream {
            mut send,
            mut recv,
            bytes: counted,
            datagrams,
            mut room,
        } = self;
        // A TCP connection takes no QUIC datagrams: its flow's place goes.
        drop(datagrams);
        let (mut from_tcp, mut to_tcp) = tcp.split();
        let up = async {
            let mut total = 0u64;
            let mut buf = BytesMut::new();
            loop {
                // Reads share one block until it is nearly used up: a block
                // handed to QUIC stays alive until every chunk cut from it
                // is acknowledged, so a block per (small) read would hold
                // 256 KiB per chunk in flight.
                if buf.capacity() < MIN_READ {
                    buf.reserve(CHUNK);
                }
                let n = from_tcp.read_buf(&mut buf).await?;
                if n == 0 {
                    let _ = send.finish();
                    return Ok::<_, io::Error>(total);
                }
                total += n as u64;
                room.write(send.write_chunk(buf.split().freeze())).await?;
                moved.fetch_add(n as u64, Ordering::Relaxed);
                counted.sent(n as u64);
            }
        };
        let down = async {
            let mut total = 0u64;
            let mut chunks: [Bytes; CHUNKS] = std::array::from_fn(|_| Bytes::new());
            while let Some(n) = recv.read_chunks(&mut chunks).await? {
                let bytes = chunks[..n].iter().map(|c| c.len() as u64).sum::<u64>();
                write_all_vectored(&mut to_tcp, &mut chunks[..n]).await?;
                total += bytes;
                moved.fetch_add(bytes, Ordering::Relaxed);
                counted.received(bytes);
            }
            to_tcp.shutdown().await?;
            Ok::<_, io::Error>(total)
        };
        let (carried, code) = tokio::select! {
            r = async { tokio::try_join!(up, down) } => (r, FAILED),
            () = cut => (Err(io::Error::from(io::ErrorKind::ConnectionAborted)), code),
        };
        if carried.is_err() {
            let _ = send.reset(code.into());
            let _ = recv.stop(code.into());
            let _ = tcp.shutdown().await;
        }
        carried
    }

    /// Carries bytes both ways between this stream and `far` (a relay's two
    /// legs), chunk by chunk as QUIC received them, until both directions
    /// have ended or either fails.
    pub async fn join(self, far: OverlayStream) -> io::Result<(u64, u64)> {
        let OverlayStream {
            send: mut near_send,
            recv: mut near_recv,
            bytes: counted,
            datagrams,
            room: mut near_room,
        } = self;
        drop(datagrams);
        let OverlayStream {
            send: mut far_send,
            recv: mut far_recv,
            room: mut far_room,
            ..
        } = far;
        let there = forward(&mut near_recv, (&mut far_send, &mut far_room), &counted);
        let back = forward(&mut far_recv, (&mut near_send, &mut near_room), &counted);
        let carried = tokio::try_join!(there, back);
        if carried.is_err() {
            for s in [&mut near_send, &mut far_send] {
                let _ = s.reset(FAILED.into());
            }
            for r in [&mut near_recv, &mut far_recv] {
                let _ = r.stop(FAILED.into());
            }
        }
        carried
    }
}

/// Moves every chunk `from` receives to `to` (a stream and its room), then
/// finishes `to`; counts what it moves as received and sent.
async fn forward(
    from: &mut quinn::RecvStream,
    (to, room): (&mut quinn::SendStream, &mut Room),
    counted: &crate::mesh::StreamBytes,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut chunks: [Bytes; CHUNKS] = std::array::from_fn(|_| Bytes::new());
    while let Some(n) = from.read_chunks(&mut chunks).await? {
        let mut left = &mut chunks[..n];
        let bytes = left.iter().map(|c| c.len() as u64).sum::<u64>();
        total += bytes;
        counted.received(bytes);
        counted.sent(bytes);
        while !left.is_empty() {
            let written = room.write(to.write_chunks(left)).await?;
            left = &mut left[written.chunks..];
        }
    }
    let _ = to.finish();
    Ok(total)
}

/// Writes every byte of `chunks` to `w`, as many chunks per call as the
/// socket takes (QUIC hands over a chunk per packet received, about a
/// kilobyte: a call per chunk would cost a system call per packet).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<()> {
    let mut i = 0;
    while i < chunks.len() {
        let mut n = {
            let slices: Vec<IoSlice<'_>> = chunks[i..].iter().map(|c| IoSlice::new(c)).collect();
            w.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while i < chunks.len() {
            let len = chunks[i].len();
            if n < len {
                chunks[i].advance(n);
                break;
            }
            n -= len;
            i += 1;
        }
    }
    Ok(())
}
