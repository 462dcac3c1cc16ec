//! Sockets the node's resolver and its ingress share a port number with.
//! The resolver listens on the bridge's address at port 53; an ingress
//! port 53 (a DNS server reached from the internet) listens on every
//! address. Linux lets the two bind together only when both ask to share
//! (`SO_REUSEADDR` for UDP, `SO_REUSEPORT` for TCP, whose listeners must
//! belong to one user); the more specific address then takes what is sent
//! to it, the wildcard the rest.
//!
//! Sharing also lets another socket that asks for it bind the same address
//! and port (and, for UDP, take its datagrams), so it is asked for only at
//! port 53, where binding needs privilege anyway: by the resolver, and by an
//! ingress port 53 after [`ingress_shared`] found no other program holding
//! the port on every address.

use std::io;
use std::net::SocketAddrV4;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

/// The port of the node's resolver.
pub const DNS_PORT: u16 = 53;

/// Whether an ingress listener on every address at `port` (UDP: `udp`)
/// binds shared: at the resolver's port, unless another program already
/// holds it on every address (a host DNS server that shares its port
/// would otherwise share it with the ingress silently): then the error
/// says so.
pub fn ingress_shared(port: u16, udp: bool) -> io::Result<bool> {
    if port != DNS_PORT {
        return Ok(false);
    }
    let files: &[&str] = if udp {
        &["/proc/net/udp", "/proc/net/udp6"]
    } else {
        &["/proc/net/tcp", "/proc/net/tcp6"]
    };
    for f in files {
        let table = std::fs::read_to_string(f).unwrap_or_default();
        if held_on_every_address(&table, port, !udp) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "port {port}/{} is held on every address by another socket ({f}): a DNS server of the host, or this agent's own one for the port still closing",
                    if udp { "udp" } else { "tcp" }
                ),
            ));
        }
    }
    Ok(true)
}

/// Whether a `/proc/net/{udp,tcp}[6]` table holds a socket bound to every
/// address at `port` (listening, for TCP: `listening`).
fn held_on_every_address(table: &str, port: u16, listening: bool) -> bool {
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace().skip(1);
        let (Some(local), Some(_), Some(state)) = (cols.next(), cols.next(), cols.next()) else {
            return false;
        };
        let Some((addr, p)) = local.rsplit_once(':') else {
            return false;
        };
        addr.bytes().all(|b| b == b'0')
            && u16::from_str_radix(p, 16) == Ok(port)
            && (!listening || state == "0A")
    })
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
    fn a_port_held_on_every_address_is_found_in_the_kernels_tables() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
          0: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 0\n";
        assert!(!held_on_every_address(udp, 53, false), "127.0.0.1 only");
        let every = format!("{udp}   1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 0\n");
        assert!(held_on_every_address(&every, 53, false));
        assert!(!held_on_every_address(&every, 54, false));
        let v6 = "  sl  local_address                         remote_address                        st\n\
          0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 0A\n";
        assert!(
            held_on_every_address(v6, 53, true),
            "a TCP listener on [::]"
        );
        let established = v6.replace(" 0A", " 01");
        assert!(!held_on_every_address(&established, 53, true));
        // Other ports never share.
        assert_eq!(ingress_shared(18453, true).ok(), Some(false));
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
