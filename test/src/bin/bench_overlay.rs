//! `make bench-overlay`: the QUIC overlay against plain TCP on this machine,
//! in one run. Three overlay endpoints on loopback (A, B, and relay R) with
//! certificates from a fresh cluster CA; B forwards streams to a local TCP
//! service. Measured:
//! - bulk throughput of one connection (A -> B's sink), direct and through R,
//!   against a TCP connection to the same sink;
//! - request/response round trips (64 bytes) on an open connection;
//! - connection setup + first round trip (a new stream per request on the
//!   existing QUIC connection, as upstream listeners do), against a new TCP
//!   connection per request;
//! - 64-byte UDP datagram round trips on one flow: directly, through R (which
//!   forwards the flow's QUIC datagrams) and through a relay of the previous
//!   release (the datagrams on the flow's stream), against UDP on loopback.
//!
//! Prints Markdown tables for docs/benchmarks.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cloudless_overlay::{
    ConnectFuture, Connected, Overlay, OverlayConfig, OverlayTls, Resolver, StaticResolver,
};
use cloudless_pki::{ClusterCa, Identity};
use cloudless_test::bench::bulk;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Parser, Debug)]
struct Args {
    /// MiB sent per bulk transfer.
    #[arg(long, default_value_t = 512)]
    mib: usize,
    /// Round trips per latency row.
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// B's targets: TCP ones from a table, and `udp-echo`, a UDP flow to the
/// UDP echo.
struct Targets {
    tcp: StaticResolver,
    udp_echo: SocketAddr,
}

impl Resolver for Targets {
    fn connect<'a>(&'a self, origin: &'a Identity, target: &'a str) -> ConnectFuture<'a> {
        if target != "udp-echo" {
            return self.tcp.connect(origin, target);
        }
        Box::pin(async move {
            let s = UdpSocket::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?;
            s.connect(self.udp_echo).await.map_err(|e| e.to_string())?;
            Ok(Connected::Udp(s))
        })
    }
}

/// Answers each datagram with itself.
async fn udp_echo() -> anyhow::Result<SocketAddr> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = s.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    Ok(addr)
}

fn endpoint(
    ca: &ClusterCa,
    id: &str,
    relay: bool,
    resolver: impl Resolver,
) -> anyhow::Result<Overlay> {
    endpoint_with(ca, id, relay, true, resolver)
}

/// An endpoint; `relayed_datagrams` off: of the previous release.
fn endpoint_with(
    ca: &ClusterCa,
    id: &str,
    relay: bool,
    relayed_datagrams: bool,
    resolver: impl Resolver,
) -> anyhow::Result<Overlay> {
    let me = Identity::Node(id.into());
    let issued = ca.issue(&me, &[], 3600, now())?;
    let key = issued
        .key_pem
        .ok_or_else(|| anyhow::anyhow!("no key issued"))?;
    let (tls, _) = OverlayTls::new(ca.cert_pem(), &issued.cert_pem, key)?;
    let config = OverlayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        relay,
        relayed_datagrams,
        // On one host a relay's introduction always succeeds, and the
        // relayed rows would measure the punched direct connection.
        hole_punching: false,
        ..OverlayConfig::default()
    };
    Ok(Overlay::bind(config, tls, me, Arc::new(resolver))?)
}

/// Reads everything and answers with the byte count (8 bytes, big endian).
async fn sink() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Echoes fixed 64-byte messages.
async fn echo() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

async fn ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> anyhow::Result<()> {
    let msg = [1u8; 64];
    let mut back = [0u8; 64];
    s.write_all(&msg).await?;
    s.read_exact(&mut back).await?;
    Ok(())
}

fn hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn row(label: &str, h: &Histogram<u64>) {
    println!(
        "| {label} | {} | {:.0} | {:.0} | {:.0} |",
        h.len(),
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
        h.mean()
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca = ClusterCa::generate("bench", now())?;
    let (sink_addr, echo_addr, udp_echo_addr) = (sink().await?, echo().await?, udp_echo().await?);
    let resolver = Targets {
        tcp: StaticResolver::default()
            .with("sink", sink_addr)
            .with("echo", echo_addr),
        udp_echo: udp_echo_addr,
    };
    let a = endpoint(&ca, "a", false, StaticResolver::default())?;
    let b = endpoint(&ca, "b", false, resolver)?;
    let r = endpoint(&ca, "r", true, StaticResolver::default())?;
    let (bid, rid) = (Identity::Node("b".into()), Identity::Node("r".into()));
    a.set_peer(bid.clone(), vec![b.local_addr()?]);
    a.set_peer(rid.clone(), vec![r.local_addr()?]);
    b.set_peer(rid.clone(), vec![r.local_addr()?]);
    b.set_relays(vec![rid.clone()]);
    anyhow::ensure!(
        b.keep_relays_connected().await.is_empty(),
        "B cannot reach R"
    );

    println!(
        "Bulk transfer, one connection, {} MiB (Gbit/s):\n",
        args.mib
    );
    println!("| path | run 1 | run 2 |");
    println!("|---|---:|---:|");
    let mut tcp = Vec::new();
    let mut direct = Vec::new();
    let mut relayed = Vec::new();
    for _ in 0..2 {
        let s = TcpStream::connect(sink_addr).await?;
        s.set_nodelay(true)?;
        tcp.push(bulk(s, args.mib).await?);
        direct.push(bulk(a.open(&bid, "sink").await?, args.mib).await?);
        // Through the relay only: A has no direct address for B here.
        let via = endpoint(&ca, "v", false, StaticResolver::default())?;
        via.set_peer(rid.clone(), vec![r.local_addr()?]);
        via.set_relays(vec![rid.clone()]);
        relayed.push(bulk(via.open(&bid, "sink").await?, args.mib).await?);
    }
    for (label, v) in [
        ("TCP loopback (baseline)", &tcp),
        ("overlay, direct", &direct),
        ("overlay, through a relay", &relayed),
    ] {
        println!("| {label} | {:.2} | {:.2} |", v[0], v[1]);
    }

    println!(
        "\nRound trips of 64 bytes ({} each, microseconds):\n",
        args.round_trips
    );
    println!("| path | round trips | p50 us | p99 us | mean us |");
    println!("|---|---:|---:|---:|---:|");
    let mut s = TcpStream::connect(echo_addr).await?;
    s.set_nodelay(true)?;
    let mut h = hist();
    for _ in 0..args.round_trips {
        let t = Instant::now();
        ping(&mut s).await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    row("TCP loopback, open connection (baseline)", &h);
    let mut s = a.open(&bid, "echo").await?;
    let mut h = hist();
    for _ in 0..args.round_trips {
        let t = Instant::now();
        ping(&mut s).await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    row("overlay, open stream", &h);
    let mut h = hist();
    for _ in 0..args.round_trips {
        let t = Instant::now();
        let mut s = TcpStream::connect(echo_addr).await?;
        s.set_nodelay(true)?;
        ping(&mut s).await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    row("TCP loopback, new connection each (baseline)", &h);
    let mut h = hist();
    for _ in 0..args.round_trips {
        let t = Instant::now();
        let mut s = a.open(&bid, "echo").await?;
        ping(&mut s).await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    row(
        "overlay, new stream each (open + target connect + round trip)",
        &h,
    );

    // UDP: one flow each, a datagram at a time.
    println!(
        "\nUDP round trips of a 64-byte datagram on one flow ({} each, microseconds):\n",
        args.round_trips
    );
    println!("| path | round trips | p50 us | p99 us | mean us |");
    println!("|---|---:|---:|---:|---:|");
    let plain = UdpSocket::bind("127.0.0.1:0").await?;
    plain.connect(udp_echo_addr).await?;
    let (msg, mut back) = ([1u8; 64], [0u8; 64]);
    let mut h = hist();
    for _ in 0..args.round_trips {
        let t = Instant::now();
        plain.send(&msg).await?;
        plain.recv(&mut back).await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    row("UDP loopback (baseline)", &h);
    // B also behind a relay of the previous release.
    let old_relay = endpoint_with(&ca, "r-old", true, false, StaticResolver::default())?;
    let old_id = Identity::Node("r-old".into());
    b.set_peer(old_id.clone(), vec![old_relay.local_addr()?]);
    b.set_relays(vec![rid.clone(), old_id.clone()]);
    anyhow::ensure!(
        b.keep_relays_connected().await.is_empty(),
        "B cannot reach its relays"
    );
    let via = endpoint(&ca, "u", false, StaticResolver::default())?;
    via.set_peer(rid.clone(), vec![r.local_addr()?]);
    via.set_relays(vec![rid.clone()]);
    let via_old = endpoint(&ca, "w", false, StaticResolver::default())?;
    via_old.set_peer(old_id.clone(), vec![old_relay.local_addr()?]);
    via_old.set_relays(vec![old_id.clone()]);
    for (label, from) in [
        ("UDP flow, direct (QUIC datagrams)", &a),
        (
            "UDP flow through a relay (QUIC datagrams it forwards)",
            &via,
        ),
        (
            "UDP flow through a relay of the previous release (on the stream)",
            &via_old,
        ),
    ] {
        let (mut tx, mut rx) = from.open_flow(&bid, "udp-echo").await?.into_datagrams();
        let mut h = hist();
        let mut lost = 0;
        for _ in 0..args.round_trips {
            let t = Instant::now();
            tx.send(&msg).await?;
            // A datagram (or its answer) may be lost: counted, not waited for.
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(answer) => {
                    answer?.ok_or_else(|| anyhow::anyhow!("{label}: the flow ended"))?;
                    h.saturating_record(t.elapsed().as_micros() as u64);
                }
                Err(_) => lost += 1,
            }
        }
        row(label, &h);
        if lost > 0 {
            println!("({label}: {lost} lost)");
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!(
        "\nB served {} streams, R relayed {} and {} QUIC datagrams, the previous release's relay {} and {}.",
        b.stats().streams_served,
        r.stats().streams_relayed,
        r.stats().datagrams_relayed,
        old_relay.stats().streams_relayed,
        old_relay.stats().datagrams_relayed
    );
    Ok(())
}
