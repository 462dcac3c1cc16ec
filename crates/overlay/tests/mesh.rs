//! Overlay endpoints on loopback UDP with certificates from a real cluster CA.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudless_overlay::{
    ConnectFuture, Connected, Overlay, OverlayConfig, OverlayError, OverlayTls, Resolver,
    StaticResolver,
};
use cloudless_pki::{ClusterCa, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn node(id: &str) -> Identity {
    Identity::Node(id.to_owned())
}

fn tls(ca: &ClusterCa, who: &Identity) -> OverlayTls {
    let issued = ca.issue(who, &[], 3600, now()).expect("issue");
    let (tls, identity) = OverlayTls::new(
        ca.cert_pem(),
        &issued.cert_pem,
        issued.key_pem.expect("key"),
    )
    .expect("overlay tls");
    assert_eq!(&identity, who);
    tls
}

/// Hole punching off unless a test turns it on: on loopback every
/// introduction succeeds, and these tests are about the other paths.
fn config(relay: bool) -> OverlayConfig {
    OverlayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        idle_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_millis(700),
        relay,
        hole_punching: false,
        datagram_flows: true,
        relayed_datagrams: true,
    }
}

/// A node of the previous release (`cloudless-overlay/2`: QUIC datagrams
/// between nodes joined directly, a relayed flow's on its stream).
fn previous(relay: bool) -> OverlayConfig {
    OverlayConfig {
        relayed_datagrams: false,
        ..config(relay)
    }
}

/// Records who each stream came from, then resolves like `inner`.
struct Recording {
    inner: StaticResolver,
    origins: Mutex<Vec<Identity>>,
}

impl Resolver for Recording {
    fn connect<'a>(&'a self, origin: &'a Identity, target: &'a str) -> ConnectFuture<'a> {
        self.origins.lock().expect("origins").push(origin.clone());
        // `never`: a target whose connect never ends (a node that does not
        // answer).
        if target == "never" {
            return Box::pin(std::future::pending());
        }
        // `udp/<address>`: a UDP flow to that address.
        if let Some(to) = target.strip_prefix("udp/") {
            let to: SocketAddr = match to.parse() {
                Ok(a) => a,
                Err(e) => return Box::pin(async move { Err(e.to_string()) }),
            };
            return Box::pin(async move {
                let s = UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                s.connect(to).await.map_err(|e| e.to_string())?;
                Ok(Connected::Udp(s))
            });
        }
        self.inner.connect(origin, target)
    }
}

/// A UDP service that answers each datagram with `echo:` and the datagram.
async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&answer, from).await;
        }
    });
    addr
}

/// A TCP service that reads until EOF and answers with the bytes uppercased.
async fn upper_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    all.make_ascii_uppercase();
                    let _ = s.write_all(&all).await;
                }
            });
        }
    });
    addr
}

struct Node {
    overlay: Overlay,
    origins: Arc<Recording>,
}

fn start(ca: &ClusterCa, id: &str, relay: bool, service: Option<SocketAddr>) -> Node {
    start_with(ca, id, config(relay), service)
}

fn start_with(
    ca: &ClusterCa,
    id: &str,
    config: OverlayConfig,
    service: Option<SocketAddr>,
) -> Node {
    let mut r = StaticResolver::default();
    if let Some(addr) = service {
        r = r.with("upper", addr);
    }
    let origins = Arc::new(Recording {
        inner: r,
        origins: Mutex::default(),
    });
    let overlay =
        Overlay::bind(config, tls(ca, &node(id)), node(id), origins.clone()).expect("bind overlay");
    Node { overlay, origins }
}

fn addr(n: &Node) -> SocketAddr {
    n.overlay.local_addr().expect("local addr")
}

/// How often `o` reached a peer by `method`: (succeeded, failed).
fn traversal(o: &cloudless_overlay::Overlay, method: &str) -> (u64, u64) {
    let t = o
        .stats()
        .traversal
        .into_iter()
        .find(|t| t.method == method)
        .expect("a traversal method");
    (t.succeeded, t.failed)
}

/// Sends `data` through a stream, half-closes, returns what came back.
async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    data: &[u8],
) -> Vec<u8> {
    s.write_all(data).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back))
        .await
        .expect("answer in time")
        .expect("read");
    back
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

#[tokio::test]
async fn a_tcp_connection_crosses_the_overlay_both_ways_with_half_close() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let service = upper_service().await;
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, Some(service));
    a.overlay.set_peer(node("b"), vec![addr(&b)]);

    // Through a local listener, as a workload would use it; 4 MiB each way.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let local = listener.local_addr().expect("addr");
    let fwd = a.overlay.forward(listener, node("b"), "upper".into());
    let data = payload(4 << 20);
    let back = round_trip(TcpStream::connect(local).await.expect("connect"), &data).await;
    assert_eq!(back.len(), data.len());
    assert_eq!(back, data.to_ascii_uppercase());

    // Several at once over the one connection.
    let mut tasks = Vec::new();
    for i in 0..16 {
        tasks.push(tokio::spawn(async move {
            let data = payload(10_000 + i);
            let back = round_trip(TcpStream::connect(local).await.expect("connect"), &data).await;
            back == data.to_ascii_uppercase()
        }));
    }
    for t in tasks {
        assert!(t.await.expect("task"));
    }
    fwd.abort();

    // B saw A as the origin every time; one connection each way at most.
    assert!(b
        .origins
        .origins
        .lock()
        .expect("origins")
        .iter()
        .all(|o| *o == node("a")));
    assert_eq!(b.overlay.stats().streams_served, 17);
    assert_eq!(a.overlay.stats().streams_opened, 17);
    assert_eq!(b.overlay.stats().connections_accepted, 1);
    assert_eq!(a.overlay.connected_peers(), vec![node("b")]);
    // What A wrote into its streams B read, and back (payload bytes).
    let (sa, sb) = (a.overlay.stats(), b.overlay.stats());
    assert!(sa.bytes_sent > 17, "{sa:?}");
    assert_eq!(sa.bytes_sent, sb.bytes_received);
    assert_eq!(sa.bytes_received, sb.bytes_sent);
    // One dial, then the live connection carried every stream.
    assert_eq!(traversal(&a.overlay, "direct"), (1, 0));
    assert_eq!(traversal(&a.overlay, "relay"), (0, 0));

    // B sees A at A's address.
    assert_eq!(
        a.overlay
            .observed_address(&node("b"))
            .await
            .expect("whoami"),
        addr(&a)
    );
}

#[tokio::test]
async fn an_unknown_target_is_refused_with_the_reason_and_the_connection_stays_usable() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let service = upper_service().await;
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, Some(service));
    a.overlay.set_peer(node("b"), vec![addr(&b)]);
    match a.overlay.open(&node("b"), "nope").await {
        Err(OverlayError::Refused { peer, reason }) => {
            assert_eq!(peer, "cloudless://node/b");
            assert!(reason.contains("no target \"nope\""), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(b.overlay.stats().streams_refused, 1);
    let s = a.overlay.open(&node("b"), "upper").await.expect("open");
    assert_eq!(round_trip(s, b"ok").await, b"OK");
}

#[tokio::test]
async fn certificates_from_another_cluster_are_refused_both_ways() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let other = ClusterCa::generate("mesh", now()).expect("other ca");
    let service = upper_service().await;
    let b = start(&ca, "b", false, Some(service));
    // An intruder with the same node name, certified by another CA.
    let intruder = start(&other, "a", false, None);
    intruder.overlay.set_peer(node("b"), vec![addr(&b)]);
    let e = intruder
        .overlay
        .open(&node("b"), "upper")
        .await
        .expect_err("refused");
    assert!(matches!(e, OverlayError::Unreachable { .. }), "{e}");
    assert_eq!(b.overlay.stats().connections_accepted, 0);
    assert_eq!(b.overlay.stats().streams_served, 0);
    // Nor does B accept the intruder as a server.
    b.overlay.set_peer(node("a"), vec![addr(&intruder)]);
    let e = b
        .overlay
        .open(&node("a"), "upper")
        .await
        .expect_err("refused");
    assert!(matches!(e, OverlayError::Unreachable { .. }), "{e}");
    assert_eq!(intruder.overlay.stats().streams_served, 0);
}

#[tokio::test]
async fn an_address_that_answers_as_another_node_is_not_used() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let service = upper_service().await;
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, Some(service));
    // A believes C lives at B's address.
    a.overlay.set_peer(node("c"), vec![addr(&b)]);
    let e = a
        .overlay
        .open(&node("c"), "upper")
        .await
        .expect_err("wrong peer");
    let text = e.to_string();
    assert!(
        text.contains("is cloudless://node/b, not cloudless://node/c"),
        "{text}"
    );
    assert_eq!(b.overlay.stats().streams_served, 0);
}

#[tokio::test]
async fn a_node_that_cannot_be_dialed_is_reached_through_its_relay() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let service = upper_service().await;
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, Some(service));
    let r = start(&ca, "r", true, None);
    let plain = start(&ca, "p", false, None);

    // B is "behind NAT": nobody has an address for it; it dials its relay.
    b.overlay.set_peer(node("r"), vec![addr(&r)]);
    b.overlay.set_relays(vec![node("r")]);
    assert!(b.overlay.keep_relays_connected().await.is_empty());

    // A has a dead address for B and knows a relay.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    a.overlay
        .set_peer(node("b"), vec![dead.local_addr().expect("addr")]);
    a.overlay.set_peer(node("r"), vec![addr(&r)]);
    a.overlay.set_peer(node("p"), vec![addr(&plain)]);
    a.overlay.set_relays(vec![node("p"), node("r")]);

    let s = a
        .overlay
        .open(&node("b"), "upper")
        .await
        .expect("via relay");
    let data = payload(1 << 20);
    assert_eq!(round_trip(s, &data).await, data.to_ascii_uppercase());
    assert_eq!(r.overlay.stats().streams_relayed, 1);
    assert_eq!(plain.overlay.stats().streams_refused, 1, "p does not relay");
    // The direct dial failed, p refused, r carried it.
    assert_eq!(traversal(&a.overlay, "direct").0, 0);
    assert!(traversal(&a.overlay, "direct").1 >= 1);
    assert_eq!(traversal(&a.overlay, "relay"), (1, 1));
    // B's resolver saw A (named by its chosen relay), not R.
    assert_eq!(
        b.origins.origins.lock().expect("origins").as_slice(),
        &[node("a")]
    );

    // With no relay able to help, the error lists every attempt.
    a.overlay.set_relays(vec![node("p")]);
    let e = a
        .overlay
        .open(&node("b"), "upper")
        .await
        .expect_err("unreachable");
    let text = e.to_string();
    assert!(text.contains("direct:"), "{text}");
    assert!(text.contains("does not relay"), "{text}");
}

#[tokio::test]
async fn a_relay_introduces_two_nodes_that_then_connect_directly() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let service = upper_service().await;
    let punching = OverlayConfig {
        hole_punching: true,
        ..config(false)
    };
    let a = start_with(&ca, "a", punching.clone(), None);
    let b = start_with(&ca, "b", punching, Some(service));
    let r = start(&ca, "r", true, None);
    for n in [&a, &b] {
        n.overlay.set_peer(node("r"), vec![addr(&r)]);
        n.overlay.set_relays(vec![node("r")]);
        assert!(n.overlay.keep_relays_connected().await.is_empty());
    }
    // A knows no address for B at all: R tells each where it sees the other.
    let s = a.overlay.open(&node("b"), "upper").await.expect("punched");
    assert_eq!(round_trip(s, b"hi").await, b"HI");
    assert_eq!(r.overlay.stats().streams_relayed, 0, "nothing was relayed");
    assert!(a.overlay.connected_peers().contains(&node("b")));
    assert_eq!(
        traversal(&a.overlay, "direct"),
        (0, 1),
        "no address to dial"
    );
    assert_eq!(traversal(&a.overlay, "hole_punch"), (1, 0));
    assert_eq!(traversal(&a.overlay, "relay"), (0, 0));
}

#[tokio::test]
async fn a_udp_flow_crosses_the_overlay_directly_and_through_a_relay() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let echo = udp_echo().await;
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, None);
    let r = start(&ca, "r", true, None);
    let target = format!("udp/{echo}");

    // Sizes from empty to about the largest UDP payload; each comes back
    // whole (in order when every datagram travels on the stream).
    let sizes = [0usize, 1, 1200, 9000, 65_000];
    async fn flow(s: cloudless_overlay::OverlayStream, sizes: &[usize], in_order: bool) {
        let (mut tx, mut rx) = s.into_datagrams();
        for &n in sizes {
            tx.send(&payload(n)).await.expect("send");
        }
        let mut answers = Vec::new();
        for _ in sizes {
            let back = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an answer in time")
                .expect("read")
                .expect("a datagram");
            answers.push(back);
        }
        if !in_order {
            answers.sort_by_key(|a| a.len());
        }
        for (&n, back) in sizes.iter().zip(&answers) {
            let mut want = b"echo:".to_vec();
            want.extend_from_slice(&payload(n));
            assert_eq!(back.len(), want.len());
            assert_eq!(back, &want);
        }
        // Ending the flow here ends it there.
        tx.finish();
        let end = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the end in time")
            .expect("read");
        assert!(end.is_none(), "nothing after the flow ended");
    }

    // Directly: what fits in a packet as QUIC datagrams (the empty and the
    // one-byte datagram at least, whatever the path's packet size), the
    // rest on the stream; both ways.
    a.overlay.set_peer(node("b"), vec![addr(&b)]);
    let s = a.overlay.open(&node("b"), &target).await.expect("open");
    flow(s, &sizes, false).await;
    for o in [&a.overlay, &b.overlay] {
        let st = o.stats();
        assert!(st.datagrams_as_frames >= 2, "{st:?}");
        assert!(st.datagrams_on_streams >= 2, "9000 and 65000 bytes: {st:?}");
        assert_eq!(st.datagrams_as_frames + st.datagrams_on_streams, 5);
        assert_eq!(st.datagrams_dropped, 0);
    }

    // Through a relay: C reaches B only through R. What fits in a packet
    // as QUIC datagrams that R forwards from one flow to the other, both
    // ways; the rest on the stream R joins.
    let c = start(&ca, "c", false, None);
    behind_relay(&c, &b, &r).await;
    let before = (b.overlay.stats(), r.overlay.stats());
    let s = c
        .overlay
        .open_flow(&node("b"), &target)
        .await
        .expect("via relay");
    flow(s, &sizes, false).await;
    let (st, b_st, r_st) = (c.overlay.stats(), b.overlay.stats(), r.overlay.stats());
    assert_eq!(r_st.streams_relayed, before.1.streams_relayed + 1);
    // Through a relay only what its other leg carries even at QUIC's
    // smallest packets (about 1,160 bytes) as QUIC datagrams: 0 and 1 byte.
    assert_eq!(
        (st.datagrams_as_frames, st.datagrams_on_streams),
        (2, 3),
        "{st:?}"
    );
    let b_frames = b_st.datagrams_as_frames - before.0.datagrams_as_frames;
    assert_eq!(
        (
            b_frames,
            b_st.datagrams_on_streams - before.0.datagrams_on_streams
        ),
        (2, 3),
        "B's answers: {b_st:?}"
    );
    assert_eq!(
        r_st.datagrams_relayed,
        st.datagrams_as_frames + b_frames,
        "R forwarded each QUIC datagram: {r_st:?}"
    );
    assert_eq!((r_st.datagrams_dropped, r_st.datagrams_queue_full), (0, 0));
    // Payload bytes are counted as datagrams, not frames.
    let sent: usize = sizes.iter().sum();
    assert_eq!(st.bytes_sent, sent as u64);
    assert_eq!(st.bytes_received, (sent + 5 * sizes.len()) as u64);

    // A stream opened as a plain stream (not a flow) to a UDP target
    // through the relay keeps every datagram on the stream, in order.
    let s = c
        .overlay
        .open(&node("b"), &target)
        .await
        .expect("via relay");
    flow(s, &sizes, true).await;
    let after = c.overlay.stats();
    assert_eq!(after.datagrams_as_frames, st.datagrams_as_frames);
    assert_eq!(after.datagrams_on_streams, st.datagrams_on_streams + 5);
}

/// Makes `b` reachable from `a` only through the relay `r`.
async fn behind_relay(a: &Node, b: &Node, r: &Node) {
    for n in [a, b] {
        n.overlay.set_peer(node("r"), vec![addr(r)]);
        n.overlay.set_relays(vec![node("r")]);
        assert!(n.overlay.keep_relays_connected().await.is_empty());
    }
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    a.overlay
        .set_peer(node("b"), vec![dead.local_addr().expect("addr")]);
}

#[tokio::test]
async fn a_relay_or_node_of_the_previous_release_keeps_relayed_datagrams_on_the_stream() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let echo = udp_echo().await;
    // Each of the three in turn of the previous release, the others of
    // this one: the flow works, every datagram on the stream, and a relay
    // of this release forwards none as a QUIC datagram.
    let cases = [
        ("the relay", config(false), previous(true), config(false)),
        (
            "the target's node",
            config(false),
            config(true),
            previous(false),
        ),
        ("the opener", previous(false), config(true), config(false)),
    ];
    for (old, a_config, r_config, b_config) in cases {
        let a = start_with(&ca, "a", a_config, None);
        let r = start_with(&ca, "r", r_config, None);
        let b = start_with(&ca, "b", b_config, None);
        behind_relay(&a, &b, &r).await;
        let back = echo_once(&a, "b", echo, b"ping").await;
        assert_eq!(&back[..], b"echo:ping", "{old} of the previous release");
        for (who, n) in [("opener", &a), ("target's node", &b)] {
            let st = n.overlay.stats();
            assert_eq!(
                (st.datagrams_as_frames, st.datagrams_on_streams),
                (0, 1),
                "the {who}, with {old} of the previous release: {st:?}"
            );
        }
        let st = r.overlay.stats();
        assert_eq!(st.streams_relayed, 1);
        assert_eq!(st.datagrams_relayed, 0, "{old}: {st:?}");
    }
}

/// A UDP service that records the sequence number (4 bytes, big-endian)
/// each datagram starts with.
async fn udp_sink() -> (SocketAddr, Arc<Mutex<Vec<u32>>>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = s.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok(n) = s.recv(&mut buf).await {
            if let Some(seq) = buf
                .get(..4.min(n))
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
            {
                record.lock().expect("seen").push(u32::from_be_bytes(seq));
            }
        }
    });
    (addr, seen)
}

/// A new flow from `from` to the UDP service at `sink` on node b.
async fn flow_to(
    from: &Node,
    sink: SocketAddr,
) -> (
    cloudless_overlay::datagram::DatagramSender,
    cloudless_overlay::datagram::DatagramReceiver,
) {
    from.overlay
        .open_flow(&node("b"), &format!("udp/{sink}"))
        .await
        .expect("open")
        .into_datagrams()
}

/// Datagram `i`: its number (4 bytes, big-endian) padded to `len` bytes.
fn numbered(i: u32, len: usize) -> Vec<u8> {
    let mut d = i.to_be_bytes().to_vec();
    d.resize(len, 0);
    d
}

/// A link to `to` that drops every `nth` packet toward `to` while `lossy`
/// is set (netem is missing here); the address to dial instead of `to`.
async fn lossy_link(
    to: SocketAddr,
    lossy: Arc<std::sync::atomic::AtomicBool>,
    nth: usize,
) -> SocketAddr {
    use std::sync::atomic::Ordering;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    back.connect(to).await.expect("connect");
    let at = front.local_addr().expect("addr");
    let dialer: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let (f, b, d) = (front.clone(), back.clone(), dialer.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let mut count = 0usize;
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *d.lock().expect("dialer") = Some(from);
            count += 1;
            if lossy.load(Ordering::Relaxed) && count.is_multiple_of(nth) {
                continue;
            }
            let _ = b.send(&buf[..n]).await;
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *dialer.lock().expect("dialer");
            if let Some(to) = to {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    at
}

/// A link to `to` that carries at most `rate` bytes a second each way and
/// queues at most `queue` packets each way (one that finds the queue full
/// is dropped, as a slow link's buffer drops); the address to dial instead
/// of `to`.
async fn slow_link(to: SocketAddr, rate: f64, queue: usize) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    back.connect(to).await.expect("connect");
    let at = front.local_addr().expect("addr");
    let (there, there_rx) = tokio::sync::mpsc::channel(queue);
    let (back_tx, back_rx) = tokio::sync::mpsc::channel(queue);
    paced(there_rx, back.clone(), rate);
    paced(back_rx, front.clone(), rate);
    let dialer: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let d = dialer.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            *d.lock().expect("dialer") = Some(from);
            let _ = there.try_send((buf[..n].to_vec(), None));
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *dialer.lock().expect("dialer");
            if to.is_some() {
                let _ = back_tx.try_send((buf[..n].to_vec(), to));
            }
        }
    });
    at
}

/// Sends each packet `rx` yields on `out` (to the address with it, else to
/// the socket's peer), at most `rate` bytes a second.
fn paced(
    mut rx: tokio::sync::mpsc::Receiver<(Vec<u8>, Option<SocketAddr>)>,
    out: Arc<UdpSocket>,
    rate: f64,
) {
    tokio::spawn(async move {
        // When each packet is due at the rate; the timer's millisecond
        // steps send a few at once, on time on average.
        let mut next = tokio::time::Instant::now();
        while let Some((packet, to)) = rx.recv().await {
            let now = tokio::time::Instant::now();
            if next + Duration::from_millis(20) < now {
                next = now;
            }
            next += Duration::from_secs_f64(packet.len() as f64 / rate);
            if next > now {
                tokio::time::sleep_until(next).await;
            }
            let _ = match to {
                Some(to) => out.send_to(&packet, to).await,
                None => out.send(&packet).await,
            };
        }
    });
}

/// Sends 200 numbered datagrams on a flow from `a` to `b`'s sink through a
/// link that loses every fifth packet toward `b` once the flow is open;
/// what the sink received, in order.
async fn through_loss(a: &Node, b: &Node) -> Vec<u32> {
    through_loss_via(a, "b", b).await
}

/// [`through_loss`] with the lossy link in front of `hop` (node `b` itself,
/// or the relay `a` reaches it through).
async fn through_loss_via(a: &Node, hop: &str, at: &Node) -> Vec<u32> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (sink, seen) = udp_sink().await;
    let lossy = Arc::new(AtomicBool::new(false));
    let link = lossy_link(addr(at), lossy.clone(), 5).await;
    a.overlay.set_peer(node(hop), vec![link]);
    let (mut tx, _rx) = flow_to(a, sink).await;
    lossy.store(true, Ordering::Relaxed);
    for seq in 0u32..200 {
        tx.send(&numbered(seq, 100)).await.expect("send");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    settled(&seen, 200).await
}

/// What `seen` holds once it holds `all`, or once nothing more arrived for
/// 2 s (what is lost stays lost).
async fn settled(seen: &Mutex<Vec<u32>>, all: usize) -> Vec<u32> {
    let mut last = (usize::MAX, tokio::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = seen.lock().expect("seen").len();
        if now >= all || (now == last.0 && last.1.elapsed() > Duration::from_secs(2)) {
            return seen.lock().expect("seen").clone();
        }
        if now != last.0 {
            last = (now, tokio::time::Instant::now());
        }
    }
}

#[tokio::test]
async fn a_lost_packet_loses_its_datagrams_as_udp_would_and_is_not_sent_again() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, None);
    let got = through_loss(&a, &b).await;
    lost_some_none_twice_none_late(&got);
    let st = a.overlay.stats();
    assert_eq!((st.datagrams_as_frames, st.datagrams_on_streams), (200, 0));

    // The same through a relay, the loss on the leg to the relay: what the
    // relay received it forwarded, as QUIC datagrams.
    let c = start(&ca, "c", false, None);
    let r = start(&ca, "r", true, None);
    let b2 = start(&ca, "b", false, None);
    b2.overlay.set_peer(node("r"), vec![addr(&r)]);
    b2.overlay.set_relays(vec![node("r")]);
    assert!(b2.overlay.keep_relays_connected().await.is_empty());
    // C's connection to R is made through the link, when the flow opens.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    c.overlay
        .set_peer(node("b"), vec![dead.local_addr().expect("addr")]);
    c.overlay.set_relays(vec![node("r")]);
    let got = through_loss_via(&c, "r", &r).await;
    lost_some_none_twice_none_late(&got);
    let st = c.overlay.stats();
    assert_eq!((st.datagrams_as_frames, st.datagrams_on_streams), (200, 0));
    assert_eq!(r.overlay.stats().streams_relayed, 1);
    assert_eq!(r.overlay.stats().datagrams_relayed, got.len() as u64);
}

/// Some of 200 were lost with their packets (every fifth packet, acks
/// included), none came twice, none out of order, and most arrived.
fn lost_some_none_twice_none_late(got: &[u32]) {
    assert!(
        got.len() < 200,
        "every datagram arrived: {} of 200",
        got.len()
    );
    assert!(got.len() >= 100, "only {} of 200 arrived", got.len());
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
}

/// Sends `msg` on a new flow from `from` to the UDP echo at `echo` on
/// node `to`; the answer.
async fn echo_once(from: &Node, to: &str, echo: SocketAddr, msg: &[u8]) -> bytes::Bytes {
    let s = from
        .overlay
        .open_flow(&node(to), &format!("udp/{echo}"))
        .await
        .expect("open");
    let (mut tx, mut rx) = s.into_datagrams();
    tx.send(msg).await.expect("send");
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("in time")
        .expect("read")
        .expect("a datagram")
}

#[tokio::test]
async fn a_node_of_the_previous_release_gets_every_datagram_on_the_stream() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    // A speaks only the previous protocol (cloudless-overlay/1); B this one.
    let old = OverlayConfig {
        datagram_flows: false,
        ..config(false)
    };
    let a = start_with(&ca, "a", old.clone(), None);
    let b = start(&ca, "b", false, None);
    let echo = udp_echo().await;
    a.overlay.set_peer(node("b"), vec![addr(&b)]);
    assert_eq!(&echo_once(&a, "b", echo, b"ping").await[..], b"echo:ping");
    for o in [&a.overlay, &b.overlay] {
        let st = o.stats();
        assert_eq!(
            (st.datagrams_as_frames, st.datagrams_on_streams),
            (0, 1),
            "{st:?}"
        );
    }
    // And the stream's guarantee holds: through the same loss as above,
    // every datagram arrives, in order.
    let c = start_with(&ca, "c", old.clone(), None);
    let got = through_loss(&c, &b).await;
    assert_eq!(got, (0..200).collect::<Vec<u32>>());

    // The other way round: a node of this release dials one of the
    // previous release.
    let d = start(&ca, "d", false, None);
    let e = start_with(&ca, "e", old, None);
    d.overlay.set_peer(node("e"), vec![addr(&e)]);
    assert_eq!(&echo_once(&d, "e", echo, b"pong").await[..], b"echo:pong");
    assert_eq!(d.overlay.stats().datagrams_as_frames, 0);
}

#[tokio::test]
async fn datagrams_sent_just_before_a_flow_ends_are_delivered() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, None);
    a.overlay.set_peer(node("b"), vec![addr(&b)]);
    five_flows_end_right_after_their_datagrams(&a).await;

    // And through a relay: the datagrams cross it as QUIC datagrams, the
    // end on the stream it joins, and still all arrive.
    let c = start(&ca, "c", false, None);
    let r = start(&ca, "r", true, None);
    behind_relay(&c, &b, &r).await;
    five_flows_end_right_after_their_datagrams(&c).await;
    assert_eq!(r.overlay.stats().streams_relayed, 5);
    assert_eq!(r.overlay.stats().datagrams_relayed, 250);
}

/// Five flows from `a` to a sink on node b, each of 50 datagrams with its
/// end right behind them: all 250 arrive, as QUIC datagrams.
async fn five_flows_end_right_after_their_datagrams(a: &Node) {
    let (sink, seen) = udp_sink().await;
    for round in 0..5u32 {
        let (mut tx, _rx) = flow_to(a, sink).await;
        for i in 0..50u32 {
            tx.send(&(round * 50 + i).to_be_bytes())
                .await
                .expect("send");
        }
        // The end right behind them, on the stream.
        tx.finish();
    }
    let mut got = settled(&seen, 250).await;
    got.sort_unstable();
    assert_eq!(got, (0..250).collect::<Vec<u32>>());
    assert_eq!(a.overlay.stats().datagrams_as_frames, 250);
}

#[tokio::test]
async fn a_burst_beyond_the_datagram_queue_loses_the_excess_as_a_full_link_would() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, None);
    a.overlay.set_peer(node("b"), vec![addr(&b)]);
    let (sink, _seen) = udp_sink().await;
    let (mut tx, _rx) = flow_to(&a, sink).await;
    // 400 KB at once (this task does not yield meanwhile, so nothing is
    // sent yet): the queue takes its 256 KiB, the rest is dropped here and
    // counted, rather than quinn dropping queued datagrams of any flow or
    // the queue growing without end; nothing goes on the stream.
    for i in 0..400u32 {
        tx.send(&numbered(i, 1000)).await.expect("send");
    }
    let st = a.overlay.stats();
    assert_eq!(st.datagrams_on_streams, 0, "{st:?}");
    assert_eq!(st.datagrams_as_frames + st.datagrams_queue_full, 400);
    assert!(
        (240..=270).contains(&st.datagrams_as_frames),
        "about 256 KiB queued: {st:?}"
    );
}

#[tokio::test]
async fn a_flow_sending_faster_than_the_path_loses_its_own_datagrams_not_its_neighbours() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, None);
    a.overlay.set_peer(node("b"), vec![addr(&b)]);
    let (sink, _seen) = udp_sink().await;
    let ((mut heavy, _heavy_rx), (mut light, _light_rx)) =
        (flow_to(&a, sink).await, flow_to(&a, sink).await);
    let dropped = || a.overlay.stats().datagrams_queue_full;
    // 400 KB from one flow at once (nothing is sent meanwhile: this task
    // does not yield), a small datagram of another flow beside every tenth:
    // the heavy flow's excess is dropped from half the queue on, and the
    // light flow, far below its share, loses none.
    for i in 0..400u32 {
        heavy.send(&numbered(i, 1000)).await.expect("send");
        if i % 10 == 0 {
            let before = dropped();
            light.send(&i.to_be_bytes()).await.expect("send");
            assert_eq!(
                dropped(),
                before,
                "the light flow's datagram {i} was dropped"
            );
        }
    }
    let st = a.overlay.stats();
    assert_eq!(st.datagrams_as_frames + st.datagrams_queue_full, 440);
    assert!(
        (120..=140).contains(&(st.datagrams_as_frames - 40)),
        "about half of 256 KiB queued for the heavy flow: {st:?}"
    );

    // Two flows sending alike, in turns, are each within their share: the
    // queue fills to its 256 KiB before either loses a datagram.
    let c = start(&ca, "c", false, None);
    c.overlay.set_peer(node("b"), vec![addr(&b)]);
    let ((mut one, _one_rx), (mut two, _two_rx)) =
        (flow_to(&c, sink).await, flow_to(&c, sink).await);
    for i in 0..200u32 {
        one.send(&numbered(i, 1000)).await.expect("send");
        two.send(&numbered(i, 1000)).await.expect("send");
    }
    let st = c.overlay.stats();
    assert!(
        (240..=270).contains(&st.datagrams_as_frames),
        "about 256 KiB queued: {st:?}"
    );
}

/// A TCP service that reads until EOF and adds what it read to `count`.
async fn counting_service(count: Arc<std::sync::atomic::AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    addr
}

/// Node b, whose service counts the bytes it reads (in the counter).
async fn counting_b(ca: &ClusterCa) -> (Node, Arc<std::sync::atomic::AtomicU64>) {
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let b = start(
        ca,
        "b",
        false,
        Some(counting_service(received.clone()).await),
    );
    (b, received)
}

/// The slow links' rate: 2 MB/s (16 Mbit/s).
const SLOW: f64 = 2_000_000.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_faster_than_the_path_leaves_tcp_connections_their_share() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let a = start(&ca, "a", false, None);
    let (b, received) = counting_b(&ca).await;
    a.overlay
        .set_peer(node("b"), vec![slow_link(addr(&b), SLOW, 64).await]);
    halves_of_a_slow_link(&a, &received, "directly").await;

    // Through a relay whose leg to B is the slow link (B dialed the relay
    // through it, as a node behind NAT does): the relay forwards the flow's
    // QUIC datagrams and the connection's stream on that one leg.
    let c = start(&ca, "c", false, None);
    let r = start(&ca, "r", true, None);
    let (b, received) = counting_b(&ca).await;
    b.overlay
        .set_peer(node("r"), vec![slow_link(addr(&r), SLOW, 64).await]);
    c.overlay.set_peer(node("r"), vec![addr(&r)]);
    for n in [&b, &c] {
        n.overlay.set_relays(vec![node("r")]);
        assert!(n.overlay.keep_relays_connected().await.is_empty());
    }
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    c.overlay
        .set_peer(node("b"), vec![dead.local_addr().expect("addr")]);
    halves_of_a_slow_link(&c, &received, "through a relay").await;
    let st = r.overlay.stats();
    assert!(st.datagrams_relayed > 1000, "{st:?}");
    assert_eq!(st.streams_relayed, 3, "{st:?}");
}

/// From `from` to node b over a [`SLOW`] link: a workload's TCP connection
/// to b's service (which adds what it reads to `received`) sending all it
/// can, a UDP flow sending 1,100-byte datagrams (a packet each, with little
/// room left beside) at twice the link's rate, and a call beside them (200
/// bytes every 5 ms), for 5 s. Over the last 4 the TCP connection and the
/// heavy flow got about half each (without the hold, the TCP connection got
/// only the room the datagrams' packets left: a fifth), and the call lost
/// next to nothing.
async fn halves_of_a_slow_link(from: &Node, received: &std::sync::atomic::AtomicU64, how: &str) {
    use std::sync::atomic::Ordering;
    let (sink, seen) = udp_sink().await;
    let (mut flow, _flow_rx) = flow_to(from, sink).await;
    let (call_sink, call_seen) = udp_sink().await;
    let (mut call, _call_rx) = flow_to(from, call_sink).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let local = listener.local_addr().expect("addr");
    let fwd = from.overlay.forward(listener, node("b"), "upper".into());
    let mut tcp = TcpStream::connect(local).await.expect("connect");
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 65_536];
        while tcp.write_all(&chunk).await.is_ok() {}
    });
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut since = None;
    let mut i = 0u32;
    while started.elapsed() < Duration::from_secs(5) {
        tick.tick().await;
        for _ in 0..20 {
            flow.send(&numbered(i, 1100)).await.expect("send");
            i += 1;
        }
        call.send(&numbered(i / 20, 200)).await.expect("send");
        if since.is_none() && started.elapsed() >= Duration::from_secs(1) {
            since = Some((
                received.load(Ordering::Relaxed),
                seen.lock().expect("seen").len(),
            ));
        }
    }
    let (tcp_since, udp_since) = since.expect("a second passed");
    let tcp = received.load(Ordering::Relaxed) - tcp_since;
    let udp = (seen.lock().expect("seen").len() - udp_since) as u64 * 1100;
    writer.abort();
    fwd.abort();
    let calls = (i / 20) as usize;
    let heard = settled(&call_seen, calls).await.len();
    assert!(
        heard * 100 >= calls * 95,
        "{how}: the call beside the heavy flow lost {} of {calls}",
        calls - heard
    );
    // The link carried 8 MB at most in those 4 s.
    let (total, enough) = (tcp + udp, 500_000);
    assert!(
        tcp * 100 >= total * 35 && tcp >= enough,
        "{how}: the TCP connection got {tcp} bytes, the UDP flow {udp}"
    );
    assert!(
        udp * 100 >= total * 35 && udp >= enough,
        "{how}: the UDP flow got {udp} bytes, the TCP connection {tcp}"
    );
}

#[tokio::test]
async fn an_open_that_gets_no_answer_fails_after_ten_seconds() {
    let ca = ClusterCa::generate("mesh", now()).expect("ca");
    let a = start(&ca, "a", false, None);
    let b = start(&ca, "b", false, Some(upper_service().await));
    a.overlay.set_peer(node("b"), vec![addr(&b)]);
    let t = std::time::Instant::now();
    let e = a
        .overlay
        .open(&node("b"), "never")
        .await
        .expect_err("no answer");
    let waited = t.elapsed();
    assert!(e.to_string().contains("did not answer within 10s"), "{e}");
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(15)).contains(&waited),
        "{waited:?}"
    );
    // The connection stays usable.
    let s = a.overlay.open(&node("b"), "upper").await.expect("open");
    assert_eq!(round_trip(s, b"hi").await, b"HI");
}
