//! A TCP proxy in front of one coordinator that a test can cut: every
//! connection through it is dropped and new ones are closed at once, as
//! when a network partition isolates the node from everyone who reaches it
//! through its advertised address.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards `127.0.0.1:<port>` to a target until cut.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl TcpProxy {
    /// Listens on a fresh loopback port and forwards to `target`. Call
    /// inside a Tokio runtime.
    pub fn start(target: SocketAddr) -> Self {
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std.set_nonblocking(true).expect("nonblocking");
        let addr = std.local_addr().expect("proxy address");
        let listener = TcpListener::from_std(std).expect("tokio listener");
        let (open, watch_open) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !*watch_open.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut cut = watch_open.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open }
    }

    /// The address to advertise.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }
}
