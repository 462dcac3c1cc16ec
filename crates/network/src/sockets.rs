//! Sockets the node's resolver and its ingress share a port number with.
//! The resolver listens on the bridge's address at port 53; an ingress
//! port 53 (a DNS server reached from the internet) listens on every
//! address. Linux lets the two bind together only when both ask to share
//! (`SO_REUSEADDR` for UDP, `SO_REUSEPORT` for TCP, whose listeners must
//! belong to one user); the more specific address then takes what is sent
//! to it, the wildcard the rest.
//!
//! Sharing also lets another socket bind the same address and port, so it
//! is asked for only where that needs privilege anyway: by the resolver
//! (port 53) and by ingress ports below 1024.

use std::io;
use std::net::SocketAddrV4;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

/// Whether an ingress port shares with the node's own listeners: below
/// 1024, where only privileged processes can bind.
pub fn shared_port(port: u16) -> bool {
    port < 1024
}

/// A non-blocking UDP socket bound to `addr`, sharing it (`SO_REUSEADDR`)
/// when `shared`.
pub fn udp(addr: SocketAddrV4, shared: bool) -> io::Result<std::net::UdpSocket> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if shared {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(addr),
    )?;
    Ok(std::net::UdpSocket::from(fd))
}

/// A TCP listener on `addr`, sharing it (`SO_REUSEPORT`) when `shared`.
/// Must be called within a Tokio runtime.
pub fn tcp_listener(addr: SocketAddrV4, shared: bool) -> io::Result<tokio::net::TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    if shared {
        s.set_reuseport(true)?;
    }
    s.bind(addr.into())?;
    s.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    /// A free port on 127.0.0.5 (UDP and TCP).
    fn free_port() -> u16 {
        let t = std::net::TcpListener::bind("127.0.0.5:0").expect("bind");
        t.local_addr().expect("addr").port()
    }

    #[test]
    fn a_specific_and_a_wildcard_udp_socket_share_a_port_and_each_gets_its_own() {
        let port = free_port();
        let specific = udp(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 5), port), true)
            .expect("the resolver's socket");
        // Without sharing, the wildcard cannot bind beside it.
        assert!(udp(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), false).is_err());
        let wildcard =
            udp(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), true).expect("the ingress socket");
        for s in [&specific, &wildcard] {
            s.set_nonblocking(false).expect("blocking");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
        }
        let c = std::net::UdpSocket::bind("127.0.0.9:0").expect("bind");
        let mut buf = [0u8; 16];
        c.send_to(b"resolver", (Ipv4Addr::new(127, 0, 0, 5), port))
            .expect("send");
        let n = specific
            .recv(&mut buf)
            .expect("the specific socket takes it");
        assert_eq!(&buf[..n], b"resolver");
        c.send_to(b"ingress", (Ipv4Addr::new(127, 0, 0, 6), port))
            .expect("send");
        let n = wildcard
            .recv(&mut buf)
            .expect("the wildcard takes the rest");
        assert_eq!(&buf[..n], b"ingress");
        assert!(specific.recv(&mut buf).is_err(), "nothing else for it");
    }

    #[tokio::test]
    async fn a_specific_and_a_wildcard_tcp_listener_share_a_port_and_each_gets_its_own() {
        let port = free_port();
        let specific = tcp_listener(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 5), port), true)
            .expect("the resolver's listener");
        assert!(tcp_listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), false).is_err());
        let wildcard = tcp_listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), true)
            .expect("the ingress listener");
        for (to, want_specific) in [([127, 0, 0, 5], true), ([127, 0, 0, 6], false)] {
            let _c = tokio::net::TcpStream::connect((Ipv4Addr::from(to), port))
                .await
                .expect("connect");
            let (hit, other) = if want_specific {
                (&specific, &wildcard)
            } else {
                (&wildcard, &specific)
            };
            tokio::time::timeout(Duration::from_secs(1), hit.accept())
                .await
                .expect("accepted by the expected listener")
                .expect("accept");
            assert!(
                tokio::time::timeout(Duration::from_millis(200), other.accept())
                    .await
                    .is_err(),
                "accepted by the other listener too"
            );
        }
    }
}
