//! Copies between two TCP connections with `splice(2)` through a pipe per
//! direction: the bytes go from one socket to the other inside the kernel,
//! never through the proxy's memory. What the service proxy uses when both
//! ends are TCP (an endpoint on this node).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most bytes moved per call (and the pipe's size).
const CHUNK: usize = 1 << 20;

/// Copies both ways until both directions have ended (each end's write side
/// is shut when the other's read side ends); the bytes each way. Every byte
/// moved is added to `moved` as it goes.
pub async fn splice_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    moved: &AtomicU64,
) -> io::Result<(u64, u64)> {
    // A failure either way (a reset) ends both: the other direction would
    // otherwise wait on an idle peer for ever.
    let end_both = || {
        for s in [a, b] {
            let _ = nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    };
    let (ab, ba) = tokio::join!(
        async {
            let r = one_way(a, b, moved).await;
            if r.is_err() {
                end_both();
            }
            r
        },
        async {
            let r = one_way(b, a, moved).await;
            if r.is_err() {
                end_both();
            }
            r
        }
    );
    Ok((ab?, ba?))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A bigger pipe moves more per call; the default (64 KiB) still works.
    let _ = nix::fcntl::fcntl(&w, FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
    Ok((r, w))
}

async fn one_way(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<u64> {
    let (pr, pw) = pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // Socket to pipe: the pipe is empty here, so EAGAIN means the
        // socket has nothing to read yet.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, &pw, None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(total);
        }
        // Pipe to socket, all of it.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pr, None, to.as_fd(), None, left, flags).map_err(io::Error::from)
            }) {
                Ok(m) => {
                    left -= m;
                    // Each part counts: a slow reader draining a full pipe
                    // over minutes is not idle.
                    moved.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn bytes_cross_both_ways_and_an_end_is_passed_on() {
        // client <-> (a | b) <-> server
        let l1 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let l2 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(l1.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (a, _) = l1.accept().await.expect("accept");
        let b = TcpStream::connect(l2.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = l2.accept().await.expect("accept");
        let copier = tokio::spawn(async move {
            let moved = AtomicU64::new(0);
            let r = splice_bidirectional(&a, &b, &moved).await;
            assert_eq!(moved.load(Ordering::Relaxed), (5 << 20) + 4);
            r
        });
        let big = vec![7u8; 5 << 20];
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), big.len());
        server.write_all(b"done").await.expect("reply");
        drop(server);
        assert_eq!(writer.await.expect("writer"), b"done");
        let (ab, ba) = copier.await.expect("copier").expect("copied");
        assert_eq!((ab, ba), (5 << 20, 4));
    }
}
