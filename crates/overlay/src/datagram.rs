//! UDP flows over the overlay. A flow (one caller's address and port to one
//! endpoint) is one stream: opening it is how the receiving node admits it,
//! and ending it ends the flow.
//!
//! Between two nodes that agreed on [`crate::ALPN_DATAGRAMS`], on a direct
//! connection, each datagram travels as a QUIC DATAGRAM frame (RFC 9221)
//! carrying the flow's stream id (a QUIC variable-length integer) and then
//! the datagram, as HTTP/3 ties datagrams to a request stream (RFC 9297): a
//! lost packet loses its datagrams, as UDP would, and delays nothing behind
//! it. The connection queues at most [`QUEUE_LIMIT`] bytes of them for the
//! congestion window; a datagram that finds the queue full is dropped and
//! counted, as a full link queue drops. Once the queue is half full, the
//! datagrams of a flow that offered more than an equal share lately are
//! dropped first (fair dropping), so such a flow loses its own excess, not
//! its neighbours' datagrams. QUIC sends queued datagrams before any stream
//! data: while a stream of the connection waits for room to send, the
//! connection's datagrams are held to half the path's rate (`Room`), the
//! flows offering the most losing theirs first, or datagrams offered faster
//! than the path carries would leave the TCP connections between the two
//! nodes only what room their packets leave. The stream
//! carries a datagram instead, its length (two
//! bytes, big-endian) and then its bytes, in order and never lost while the
//! stream lives (a lost packet delays the datagrams behind it), when it is
//! too large for a packet (over about 1,160 to 1,410 bytes, by the path),
//! and on every flow with a node of an earlier release.
//!
//! Through a relay (two nodes that reach each other only through it), when
//! all three agreed on [`crate::ALPN_RELAYED_DATAGRAMS`], the relay moves
//! each QUIC datagram from the flow's id on one connection to its id on the
//! other, as a router forwards packets; each end sends on the
//! stream what is larger than the other leg carries even at QUIC's smallest
//! packet size (about 1,160 bytes), so the relay never has to drop what it
//! promised to carry. Through a relay of an earlier release, the relay
//! joins the two streams' bytes and every datagram rides the stream.
//!
//! A length the stream does not then carry (it ended in the middle of a
//! datagram) is an error, never a panic; every length fits in the two bytes,
//! so a peer cannot make the reader allocate more than [`MAX_DATAGRAM`]. A
//! QUIC datagram naming no open flow of its connection, or one whose queue
//! ([`FLOW_QUEUE`] datagrams) is full, is dropped and counted.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::mesh::{lock, OverlayStream, StreamBytes};

/// Largest datagram a flow carries (a UDP payload is at most 65,507 bytes
/// over IPv4).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// QUIC datagrams a flow holds before its reader takes them; more are
/// dropped.
pub const FLOW_QUEUE: usize = 256;

/// Bytes of QUIC datagrams a connection may queue for sending (about 180
/// full packets: 20 ms at 100 Mbit/s); a datagram that finds more queued is
/// dropped.
pub const QUEUE_LIMIT: usize = 256 * 1024;

/// quinn's queue, twice the limit: quinn drops the oldest queued datagram
/// (any flow's) for a newer one only beyond it, which the limit never
/// reaches.
pub(crate) const SEND_BUFFER: usize = 2 * QUEUE_LIMIT;

/// The smallest packet size QUIC allows (quinn's `min_mtu`, which the
/// overlay leaves at its default): a path whose larger packets stop getting
/// through falls back to it.
const MIN_MTU: u16 = 1200;

/// How long at least a flow whose stream ended still takes QUIC datagrams
/// sent before the end (the two travel apart); two round trips when longer.
const END_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// The code a flow's stream is reset with when its socket failed.
const FAILED: u32 = 0;

thread_local! {
    /// Where flows' sockets read into: one buffer per thread.
    static RECEIVED: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// `v` as a QUIC variable-length integer (RFC 9000, section 16); `None`
/// above 2^62 - 1.
fn encode_varint(v: u64) -> Option<Vec<u8>> {
    Some(match v {
        0..=0x3f => vec![v as u8],
        0x40..=0x3fff => ((v as u16) | 0x4000).to_be_bytes().to_vec(),
        0x4000..=0x3fff_ffff => ((v as u32) | 0x8000_0000).to_be_bytes().to_vec(),
        0x4000_0000..=0x3fff_ffff_ffff_ffff => (v | 0xc000_0000_0000_0000).to_be_bytes().to_vec(),
        _ => return None,
    })
}

/// The variable-length integer `b` starts with, and its length; `None` when
/// `b` is shorter than the integer says.
fn decode_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    let bytes = b.get(..len)?;
    let v = bytes
        .iter()
        .skip(1)
        .fold(u64::from(first & 0x3f), |v, &x| (v << 8) | u64::from(x));
    Some((v, len))
}

/// Hands a connection's QUIC datagrams to its flows by the stream id each
/// carries.
#[derive(Debug)]
pub(crate) struct FlowRouter {
    flows: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    counted: Arc<StreamBytes>,
    /// What each flow sent on the connection lately, for fair dropping.
    shares: Mutex<Shares>,
}

impl FlowRouter {
    pub(crate) fn new(counted: Arc<StreamBytes>) -> Self {
        FlowRouter {
            flows: Mutex::default(),
            counted,
            shares: Mutex::default(),
        }
    }

    /// Delivers one QUIC datagram to its flow (a copy: the datagram is a
    /// slice of a receive batch that a queued slice would keep whole), or
    /// drops it.
    pub(crate) fn dispatch(&self, d: &[u8]) {
        let delivered = decode_varint(d).is_some_and(|(id, len)| {
            lock(&self.flows)
                .get(&id)
                .is_some_and(|tx| tx.try_send(Bytes::copy_from_slice(&d[len..])).is_ok())
        });
        if !delivered {
            self.counted
                .datagrams_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn register(self: &Arc<Self>, id: u64) -> Registered {
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        lock(&self.flows).insert(id, tx);
        Registered {
            rx,
            _registration: Registration {
                router: self.clone(),
                id,
            },
        }
    }
}

/// A flow's place in its router, given up when dropped.
struct Registration {
    router: Arc<FlowRouter>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.router.flows).remove(&self.id);
        lock(&self.router.shares).forget(self.id, std::time::Instant::now());
    }
}

/// How long the bytes a flow sent count toward its recent share (the time
/// constant of their exponential decay).
const SHARE_WINDOW: f64 = 0.1;

/// Bytes sent lately, decaying exponentially with [`SHARE_WINDOW`].
#[derive(Debug, Default, Clone, Copy)]
struct Recent {
    bytes: f64,
    at: Option<std::time::Instant>,
}

impl Recent {
    fn at(&self, now: std::time::Instant) -> f64 {
        self.at.map_or(0.0, |t| {
            self.bytes * (-now.saturating_duration_since(t).as_secs_f64() / SHARE_WINDOW).exp()
        })
    }

    fn add(&mut self, n: usize, now: std::time::Instant) {
        self.bytes = self.at(now) + n as f64;
        self.at = Some(now);
    }
}

/// What the flows of one connection offered to send as QUIC datagrams
/// lately: once the connection's queue is half full, a flow that offered
/// more than its fair share (all flows' recent bytes over the number of
/// flows that sent in the last few windows) is dropped first, so one flow
/// sending faster than the path carries does not take every other flow's
/// datagrams down with its own (approximate fair dropping, as routers
/// share a link among flows without a queue per flow).
#[derive(Debug, Default)]
struct Shares {
    flows: HashMap<u64, Recent>,
    total: Recent,
    /// How many flows sent in the last three windows, and when counted
    /// (again at most every [`COUNT_EVERY`]: a count walks every flow).
    active: Option<(usize, std::time::Instant)>,
    /// Bytes of QUIC datagrams the connection queued lately (not those
    /// dropped).
    queued: Recent,
    /// Streams of the connection waiting for room to send now, and when
    /// one last began or ended a wait.
    streams_waiting: usize,
    streams_waited_at: Option<std::time::Instant>,
    /// The path's rate, bytes a second (the congestion window over the
    /// round trip), and when read (again at most every [`COUNT_EVERY`]).
    path_rate: Option<(f64, std::time::Instant)>,
}

/// How long after a stream of a connection last waited for room to send
/// its datagrams are still held to half the path (a stream sending all it
/// can waits again within a round trip or so).
const STREAMS_HOLD: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a count of the flows sharing a connection holds.
const COUNT_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// A flow quiet for this many windows is forgotten (its bytes have decayed
/// to nothing): the map holds the flows sending lately, not every flow the
/// connection ever carried.
const FORGET_AFTER: f64 = 10.0;

impl Shares {
    /// Counts `n` bytes flow `id` offers now.
    fn offer(&mut self, id: u64, n: usize, now: std::time::Instant) {
        self.total.add(n, now);
        if !self.flows.contains_key(&id) {
            let quiet = std::time::Duration::from_secs_f64(FORGET_AFTER * SHARE_WINDOW);
            let gone: Vec<u64> = self
                .flows
                .iter()
                .filter(|(_, r)| {
                    r.at.is_some_and(|t| now.saturating_duration_since(t) > quiet)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.forget(id, now);
            }
        }
        self.flows
            .entry(id)
            .or_insert_with(|| {
                self.active = None;
                Recent::default()
            })
            .add(n, now);
    }

    /// Takes flow `id` (ended, or quiet) and what is left of its bytes out.
    fn forget(&mut self, id: u64, now: std::time::Instant) {
        if let Some(r) = self.flows.remove(&id) {
            self.active = None;
            let left = (self.total.at(now) - r.at(now)).max(0.0);
            self.total = Recent {
                bytes: left,
                at: Some(now),
            };
        }
    }

    /// Whether flow `id` offered more than its fair share lately: its bytes
    /// over an equal part of all flows' (the flows that sent in the last
    /// three windows).
    fn above_share(&mut self, id: u64, now: std::time::Instant) -> bool {
        let mine = self.flows.get(&id).map_or(0.0, |r| r.at(now));
        let total = self.total.at(now);
        // At most every flow counts: at or below that part, never above
        // (and no need to count who sent lately). A flow alone holds the
        // whole share (the margin keeps rounding from making it more).
        let margin = 1.000_001;
        if mine <= total / self.flows.len().max(1) as f64 * margin {
            return false;
        }
        mine > total / self.active(now) as f64 * margin
    }

    /// How many flows sent in the last three windows (at least one).
    fn active(&mut self, now: std::time::Instant) -> usize {
        match self.active {
            Some((n, at)) if now.saturating_duration_since(at) < COUNT_EVERY => n,
            _ => {
                let lately = std::time::Duration::from_secs_f64(3.0 * SHARE_WINDOW);
                let n = self
                    .flows
                    .values()
                    .filter(|r| {
                        r.at.is_some_and(|t| now.saturating_duration_since(t) <= lately)
                    })
                    .count()
                    .max(1);
                self.active = Some((n, now));
                n
            }
        }
    }

    /// Whether flow `id`'s datagram of `n` bytes is held back: the
    /// connection's datagrams took half the path lately while a stream of
    /// it waits for room ([`above_half_path`](Self::above_half_path)), and
    /// this flow offered at least an equal share of them lately (alone, or
    /// heavy beside light ones: a DNS query or a call beside a flood keeps
    /// its datagrams).
    fn held(
        &mut self,
        id: u64,
        n: usize,
        rate: impl FnOnce() -> f64,
        now: std::time::Instant,
    ) -> bool {
        if !self.above_half_path(rate, n, now) {
            return false;
        }
        let mine = self.flows.get(&id).map_or(0.0, |r| r.at(now));
        // Two flows sending alike are each at their share: both held.
        mine * self.active(now) as f64 >= self.total.at(now) * 0.99
    }

    /// Whether `n` bytes more would take the connection's datagrams above
    /// half the path's rate lately while a stream of it waits for room to
    /// send (or did a moment ago). QUIC sends queued datagrams before any
    /// stream data: without this, datagrams offered faster than the path
    /// carries would leave the streams only the room their packets leave.
    /// `rate` reads the path's rate (bytes a second) when the one read last
    /// is older than [`COUNT_EVERY`].
    fn above_half_path(
        &mut self,
        rate: impl FnOnce() -> f64,
        n: usize,
        now: std::time::Instant,
    ) -> bool {
        let waited = self.streams_waiting > 0
            || self
                .streams_waited_at
                .is_some_and(|t| now.saturating_duration_since(t) < STREAMS_HOLD);
        if !waited {
            return false;
        }
        let rate = match self.path_rate {
            Some((rate, at)) if now.saturating_duration_since(at) < COUNT_EVERY => rate,
            _ => {
                let rate = rate();
                self.path_rate = Some((rate, now));
                rate
            }
        };
        // Bytes sent at a steady rate add up to the rate times the window.
        self.queued.at(now) + n as f64 > rate / 2.0 * SHARE_WINDOW
    }

    /// A stream of the connection began (`true`) or ended a wait for room.
    fn stream_waits(&mut self, waiting: bool, now: std::time::Instant) {
        if waiting {
            self.streams_waiting += 1;
        } else {
            self.streams_waiting = self.streams_waiting.saturating_sub(1);
        }
        self.streams_waited_at = Some(now);
    }
}

/// Tells a connection's router while one of its streams waits for room to
/// send (a write that could not go at once: quinn takes what the stream's
/// flow-control window and the connection's send window allow, so a stream
/// waits once it has that much unsent or unread, as a bulk transfer does),
/// which holds the connection's datagrams to half the path meanwhile
/// ([`Shares::held`]). A write given up while pending counts until the
/// stream's next write, its end, or the room's drop.
#[derive(Debug, Default)]
pub(crate) struct Room {
    router: Option<Arc<FlowRouter>>,
    waiting: bool,
}

impl Room {
    /// The room of a stream on the connection of `router` (none on a
    /// connection that carries no QUIC datagrams).
    pub(crate) fn of(router: Option<Arc<FlowRouter>>) -> Self {
        Room {
            router,
            waiting: false,
        }
    }

    /// Marks the stream waiting (its write was pending) or not.
    pub(crate) fn waiting(&mut self, waiting: bool) {
        if self.waiting != waiting {
            self.waiting = waiting;
            if let Some(r) = &self.router {
                lock(&r.shares).stream_waits(waiting, std::time::Instant::now());
            }
        }
    }

    /// Runs `write`, the stream marked waiting while it is pending.
    pub(crate) async fn write<F: Future>(&mut self, write: F) -> F::Output {
        let mut write = std::pin::pin!(write);
        std::future::poll_fn(|cx| {
            let polled = write.as_mut().poll(cx);
            self.waiting(polled.is_pending());
            polled
        })
        .await
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.waiting(false);
    }
}

/// A flow's queue of QUIC datagrams and its place in the router.
struct Registered {
    rx: mpsc::Receiver<Bytes>,
    _registration: Registration,
}

/// How a flow's stream sends and receives QUIC datagrams: on a connection
/// that speaks [`crate::ALPN_DATAGRAMS`] (straight to the flow's other end)
/// or [`crate::ALPN_RELAYED_DATAGRAMS`] (to it or to a relay that forwards
/// them).
pub(crate) struct DatagramPath {
    conn: quinn::Connection,
    router: Arc<FlowRouter>,
    registered: Option<Registered>,
    /// Largest datagram sent as a QUIC datagram beyond the connection's own
    /// limit: what the rest of a relayed path carries.
    limit: usize,
}

impl std::fmt::Debug for DatagramPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramPath")
            .field("connection", &self.conn.stable_id())
            .finish_non_exhaustive()
    }
}

impl DatagramPath {
    pub(crate) fn new(conn: quinn::Connection, router: Arc<FlowRouter>) -> Self {
        DatagramPath {
            conn,
            router,
            registered: None,
            limit: usize::MAX,
        }
    }

    /// Sends no datagram longer than `max` as a QUIC datagram (the rest of
    /// a relayed path carries no more).
    pub(crate) fn limit(&mut self, max: usize) {
        self.limit = self.limit.min(max);
    }

    /// The largest datagram of the registered flow that fits in one of the
    /// connection's packets even once the path's packets fall back to the
    /// smallest QUIC allows (as quinn does when larger ones stop getting
    /// through), within its limit: what a relay may promise for a leg the
    /// sender cannot see, so that it never has to drop what it promised.
    pub(crate) fn max_payload(&self) -> Option<u32> {
        let id = encode_varint(self.registered.as_ref()?._registration.id)?;
        let probed = self.conn.stats().path.current_mtu.saturating_sub(MIN_MTU);
        let max = self
            .conn
            .max_datagram_size()?
            .checked_sub(id.len())?
            .saturating_sub(usize::from(probed));
        u32::try_from(max.min(self.limit)).ok()
    }

    /// How flow `id` sends on this path's connection.
    fn frames(&self, id: u64) -> Option<Frames> {
        Some(Frames {
            conn: self.conn.clone(),
            router: self.router.clone(),
            id,
            encoded: encode_varint(id)?,
            limit: self.limit,
        })
    }

    /// Takes the datagrams for stream `id` from now on: the opener before
    /// its request and the side that accepts a flow before it answers, so
    /// no first datagram either sends finds no flow.
    pub(crate) fn register(&mut self, id: u64) {
        if self.registered.is_none() {
            self.registered = Some(self.router.register(id));
        }
    }
}

/// Forwards a relayed flow's QUIC datagrams both ways between the opener's
/// connection (`near`) and the target node's (`far`), both registered, as a
/// router forwards packets: one that finds the next connection's queue full
/// is dropped and counted (and one too large for its packets, which the
/// sizes the two ends agreed on when the flow opened never are). Runs until
/// `until` (the relay's join of the flow's two streams) ends, then for a
/// moment more: datagrams sent before the end travel apart from it.
pub(crate) async fn relay<T>(
    mut near: DatagramPath,
    mut far: DatagramPath,
    until: impl Future<Output = T>,
) {
    let grace = END_GRACE.max(2 * near.conn.rtt().max(far.conn.rtt()));
    let counted = near.router.counted.clone();
    let (Some(mut from_near), Some(mut from_far)) = (near.registered.take(), far.registered.take())
    else {
        until.await;
        return;
    };
    let (Some(to_near), Some(to_far)) = (
        near.frames(from_near._registration.id),
        far.frames(from_far._registration.id),
    ) else {
        until.await;
        return;
    };
    let pump = async {
        tokio::join!(
            forward(&mut from_near.rx, &to_far, &counted),
            forward(&mut from_far.rx, &to_near, &counted),
        )
    };
    tokio::pin!(pump);
    tokio::select! {
        _ = &mut pump => return,
        _ = until => {}
    }
    let _ = tokio::time::timeout(grace, pump).await;
}

/// Sends each datagram `from` yields on `to`, until the connection is lost.
async fn forward(from: &mut mpsc::Receiver<Bytes>, to: &Frames, counted: &StreamBytes) {
    while let Some(d) = from.recv().await {
        match send_frame(to, &d) {
            Framed::Sent => {
                counted.sent(d.len() as u64);
                counted.datagrams_relayed.fetch_add(1, Ordering::Relaxed);
            }
            Framed::QueueFull => {
                counted.datagrams_queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Framed::NotSent => {
                counted.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Framed::Lost(_) => return,
        }
    }
}

/// What became of a datagram offered to a connection as a QUIC datagram.
enum Framed {
    /// Queued for sending.
    Sent,
    /// Not sent: the connection's queue held [`QUEUE_LIMIT`] bytes, or
    /// half of it and the flow sent more than its share lately, or the
    /// connection's datagrams took half the path lately while a stream of
    /// it waits for room and the flow offered its share of them or more.
    QueueFull,
    /// Not sent: too large for a packet (or for the rest of the path), or
    /// refused.
    NotSent,
    /// The connection is gone.
    Lost(quinn::ConnectionError),
}

/// Offers `datagram` to the connection as a QUIC datagram of the flow.
fn send_frame(to: &Frames, datagram: &[u8]) -> Framed {
    let Frames {
        conn,
        router,
        id,
        encoded,
        limit,
    } = to;
    let (id, limit) = (*id, *limit);
    let fits = datagram.len() <= limit
        && conn
            .max_datagram_size()
            .is_some_and(|max| encoded.len() + datagram.len() <= max);
    if !fits {
        return Framed::NotSent;
    }
    let queued = SEND_BUFFER.saturating_sub(conn.datagram_send_buffer_space());
    {
        let mut shares = lock(&router.shares);
        let now = std::time::Instant::now();
        // Judged on what the flow sent before this datagram (two flows
        // sending alike are each within their share), counted either way
        // (what a flow offers, not what got through, is its load).
        let dropped = queued > QUEUE_LIMIT
            || (queued > QUEUE_LIMIT / 2 && shares.above_share(id, now))
            || shares.held(id, datagram.len(), || path_rate(conn), now);
        shares.offer(id, datagram.len(), now);
        if dropped {
            return Framed::QueueFull;
        }
        shares.queued.add(datagram.len(), now);
    }
    let mut framed = BytesMut::with_capacity(encoded.len() + datagram.len());
    framed.extend_from_slice(encoded);
    framed.extend_from_slice(datagram);
    match conn.send_datagram(framed.freeze()) {
        Ok(()) => Framed::Sent,
        Err(quinn::SendDatagramError::ConnectionLost(e)) => Framed::Lost(e),
        // Too large after all (the path's packets shrank), or not allowed.
        Err(_) => Framed::NotSent,
    }
}

/// What `conn` may send lately, bytes a second: its congestion window over
/// its round trip.
fn path_rate(conn: &quinn::Connection) -> f64 {
    let path = conn.stats().path;
    path.cwnd as f64 / path.rtt.as_secs_f64().max(1e-4)
}

/// The sending half of a flow.
#[derive(Debug)]
pub struct DatagramSender {
    send: quinn::SendStream,
    bytes: Arc<StreamBytes>,
    /// Where datagrams go as QUIC datagrams, when they may.
    frames: Option<Frames>,
}

/// Where a flow's datagrams go as QUIC datagrams: the connection, its
/// router (for the flows' shares), the flow's id there (and encoded), and
/// the largest datagram the rest of the path carries.
#[derive(Debug)]
struct Frames {
    conn: quinn::Connection,
    router: Arc<FlowRouter>,
    id: u64,
    encoded: Vec<u8>,
    limit: usize,
}

/// The receiving half of a flow.
pub struct DatagramReceiver {
    incoming: Incoming,
    bytes: Arc<StreamBytes>,
}

impl std::fmt::Debug for DatagramReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramReceiver").finish_non_exhaustive()
    }
}

/// Where a flow's datagrams come from.
enum Incoming {
    /// The stream alone.
    Stream(quinn::RecvStream),
    /// QUIC datagrams, and the stream (read by a task of its own, so that a
    /// datagram read halfway is never dropped by a select).
    Both {
        frames: Registered,
        stream: mpsc::Receiver<io::Result<Option<Bytes>>>,
        stop: Option<oneshot::Sender<u32>>,
        /// The stream ended: only QUIC datagrams sent before it still come.
        ended: bool,
        /// How long after the end they may still come.
        grace: std::time::Duration,
    },
}

impl DatagramSender {
    /// Sends one datagram (an error if longer than [`MAX_DATAGRAM`]): as a
    /// QUIC datagram when the flow may and it fits in a packet, else on the
    /// stream.
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
        if let Some(to) = &self.frames {
            match send_frame(to, datagram) {
                Framed::Sent => {
                    self.bytes.sent(datagram.len() as u64);
                    self.bytes
                        .datagrams_as_frames
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Framed::QueueFull => {
                    self.bytes
                        .datagrams_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Framed::Lost(e) => return Err(io::Error::new(io::ErrorKind::ConnectionAborted, e)),
                // The stream carries it.
                Framed::NotSent => {}
            }
        }
        let mut framed = BytesMut::with_capacity(2 + datagram.len());
        framed.put_u16(len);
        framed.extend_from_slice(datagram);
        self.send.write_chunk(framed.freeze()).await?;
        self.bytes.sent(datagram.len() as u64);
        self.bytes
            .datagrams_on_streams
            .fetch_add(1, Ordering::Relaxed);
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

/// The next datagram on `recv`'s stream, or `None` once the other side
/// ended it. Not cancel-safe.
async fn read_framed(
    recv: &mut quinn::RecvStream,
    bytes: &StreamBytes,
) -> io::Result<Option<Bytes>> {
    let mut len = [0u8; 2];
    match recv.read_exact(&mut len).await {
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
    match recv.read_exact(&mut datagram).await {
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
    bytes.received(datagram.len() as u64);
    Ok(Some(Bytes::from(datagram)))
}

impl DatagramReceiver {
    /// The next datagram, or `None` once the other side ended the flow
    /// (and the QUIC datagrams sent before the end have had a moment to
    /// arrive: a call dropped meanwhile starts that moment again). Not
    /// cancel-safe on a flow without QUIC datagrams: a call dropped halfway
    /// through a datagram loses the flow's framing, so read a flow from one
    /// loop for its whole life.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match &mut self.incoming {
            Incoming::Stream(recv) => read_framed(recv, &self.bytes).await,
            Incoming::Both {
                frames,
                stream,
                ended,
                grace,
                ..
            } => {
                if !*ended {
                    // Neither source first: a flow whose QUIC datagrams
                    // keep coming still gets its stream's.
                    let from_stream = tokio::select! {
                        Some(d) = frames.rx.recv() => {
                            self.bytes.received(d.len() as u64);
                            return Ok(Some(d));
                        }
                        r = stream.recv() => r.unwrap_or(Ok(None)),
                    };
                    match from_stream {
                        Ok(None) => *ended = true,
                        other => return other,
                    }
                }
                // The end and the datagrams sent before it travel apart:
                // those already here, and any within a moment, first.
                match tokio::time::timeout(*grace, frames.rx.recv()).await {
                    Ok(Some(d)) => {
                        self.bytes.received(d.len() as u64);
                        Ok(Some(d))
                    }
                    _ => Ok(None),
                }
            }
        }
    }

    /// Tells the other side to stop sending, with `code`.
    pub fn stop(&mut self, code: u32) {
        match &mut self.incoming {
            Incoming::Stream(recv) => {
                let _ = recv.stop(code.into());
            }
            Incoming::Both { stop, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(code);
                }
            }
        }
    }
}

impl OverlayStream {
    /// This stream as a flow of datagrams.
    pub fn into_datagrams(self) -> (DatagramSender, DatagramReceiver) {
        let OverlayStream {
            send,
            mut recv,
            bytes,
            datagrams,
            ..
        } = self;
        let id = u64::from(send.id());
        let Some((mut path, to)) = datagrams.and_then(|p| {
            let to = p.frames(id)?;
            Some((p, to))
        }) else {
            let tx = DatagramSender {
                send,
                bytes: bytes.clone(),
                frames: None,
            };
            let rx = DatagramReceiver {
                incoming: Incoming::Stream(recv),
                bytes,
            };
            return (tx, rx);
        };
        let frames = path
            .registered
            .take()
            .unwrap_or_else(|| path.router.register(id));
        let (stream_tx, stream_rx) = mpsc::channel(1);
        let (stop_tx, mut stop_rx) = oneshot::channel::<u32>();
        let counted = bytes.clone();
        tokio::spawn(async move {
            let stopped = loop {
                let r = tokio::select! {
                    biased;
                    code = &mut stop_rx => break code,
                    r = read_framed(&mut recv, &counted) => r,
                };
                let end = !matches!(r, Ok(Some(_)));
                tokio::select! {
                    biased;
                    code = &mut stop_rx => break code,
                    sent = stream_tx.send(r) => {
                        if sent.is_err() || end {
                            return;
                        }
                    }
                }
            };
            // Told to stop (not merely dropped): with the code given.
            if let Ok(code) = stopped {
                let _ = recv.stop(code.into());
            }
        });
        let grace = END_GRACE.max(2 * path.conn.rtt());
        let tx = DatagramSender {
            send,
            bytes: bytes.clone(),
            frames: Some(to),
        };
        let rx = DatagramReceiver {
            incoming: Incoming::Both {
                frames,
                stream: stream_rx,
                stop: Some(stop_tx),
                ended: false,
                grace,
            },
            bytes,
        };
        (tx, rx)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length_and_short_input_is_none() {
        for v in [
            0u64,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let e = encode_varint(v).expect("in range");
            assert_eq!(decode_varint(&e), Some((v, e.len())), "{v}");
            let mut longer = e.clone();
            longer.extend_from_slice(b"payload");
            assert_eq!(decode_varint(&longer), Some((v, e.len())));
            assert_eq!(decode_varint(&e[..e.len() - 1]), None, "{v} cut short");
        }
        assert_eq!(encode_varint(1 << 62), None);
        assert_eq!(decode_varint(&[]), None);
        // RFC 9000's examples (appendix A.1).
        assert_eq!(
            decode_varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(
            decode_varint(&[0x9d, 0x7f, 0x3e, 0x7d]),
            Some((494_878_333, 4))
        );
        assert_eq!(decode_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(decode_varint(&[0x25]), Some((37, 1)));
    }

    #[test]
    fn the_router_hands_each_flow_its_own_datagrams_and_drops_the_rest() {
        let counted = Arc::new(StreamBytes::default());
        let dropped = || counted.datagrams_dropped.load(Ordering::Relaxed);
        let router = Arc::new(FlowRouter::new(counted.clone()));
        let mut a = router.register(5);
        let mut b = router.register(300);
        let frame = |id: u64, body: &[u8]| {
            let mut f = encode_varint(id).expect("in range");
            f.extend_from_slice(body);
            f
        };
        router.dispatch(&frame(5, b"to a"));
        router.dispatch(&frame(300, b"to b"));
        router.dispatch(&frame(7, b"no such flow"));
        router.dispatch(&[]);
        router.dispatch(&[0x40]); // a two-byte id cut short
        assert_eq!(a.rx.try_recv().expect("a's"), &b"to a"[..]);
        assert_eq!(b.rx.try_recv().expect("b's"), &b"to b"[..]);
        assert!(a.rx.try_recv().is_err() && b.rx.try_recv().is_err());
        assert_eq!(dropped(), 3);
        // A flow whose reader falls behind keeps its queue's worth.
        for i in 0..FLOW_QUEUE + 10 {
            router.dispatch(&frame(5, &[i as u8]));
        }
        assert_eq!(dropped(), 13);
        // A flow gone takes nothing more, and leaves no entry behind.
        drop(a);
        router.dispatch(&frame(5, b"late"));
        assert_eq!(dropped(), 14);
        assert_eq!(lock(&router.flows).len(), 1);
        drop(b);
        assert!(lock(&router.flows).is_empty());
    }

    #[test]
    fn a_flow_above_its_fair_share_of_recent_bytes_is_the_one_dropped() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let mut shares = Shares::default();
        // Alone, a flow holds the whole share, however much it sends.
        for _ in 0..1000 {
            shares.offer(1, 1200, t0);
        }
        assert!(!shares.above_share(1, t0));
        // With a light flow beside it, the heavy one is above its half and
        // the light one is not; with a second as heavy, both heavy ones are
        // above a third (and dropped alike while the queue is over half
        // full), the light one still not.
        shares.offer(2, 100, t0);
        assert!(shares.above_share(1, t0) && !shares.above_share(2, t0));
        shares.offer(3, 1000 * 1200, t0);
        assert!(shares.above_share(1, t0) && shares.above_share(3, t0));
        assert!(!shares.above_share(2, t0));
        // A flow gone quiet for three windows no longer counts among those
        // sharing: flow 1 alone again, after flow 3's bytes have decayed.
        let later = t0 + Duration::from_secs_f64(10.0 * SHARE_WINDOW);
        for _ in 0..10 {
            shares.offer(1, 1200, later);
        }
        assert!(!shares.above_share(1, later));
        // An ended flow's bytes leave the total with it: flow 1 is judged
        // against flow 2 alone, not against a share grown by flow 3's.
        let mut two = Shares::default();
        two.offer(1, 1000, t0);
        two.offer(3, 5000, t0);
        two.offer(2, 10, t0);
        two.forget(3, t0);
        assert!(two.above_share(1, t0) && !two.above_share(2, t0));
        // A flow quiet for long is forgotten when another starts.
        let much_later = t0 + Duration::from_secs_f64(2.0 * FORGET_AFTER * SHARE_WINDOW);
        two.offer(4, 10, much_later);
        assert_eq!(two.flows.len(), 1);
        // Two flows taking turns, each judged before its datagram counts
        // (as `send_frame` does), are never above their share.
        let mut turns = Shares::default();
        for i in 0..1000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 10);
            let id = u64::from(i % 2);
            assert!(!turns.above_share(id, now), "flow {id} at {i}");
            turns.offer(id, 1200, now);
        }
        // Recent bytes decay by e every window.
        let mut r = Recent::default();
        r.add(1000, t0);
        let one = r.at(t0 + Duration::from_secs_f64(SHARE_WINDOW));
        assert!((one - 1000.0 / std::f64::consts::E).abs() < 1.0, "{one}");
    }

    #[test]
    fn datagrams_are_held_to_half_the_path_while_a_stream_waits_for_room() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        // 1 MB/s: half of it over a window is 50,000 bytes.
        let rate = || 1_000_000.0;
        let mut shares = Shares::default();
        // No stream waits: datagrams are not held, however many.
        for _ in 0..100 {
            assert!(!shares.above_half_path(rate, 1000, t0));
            shares.queued.add(1000, t0);
        }
        // A stream waits: what was queued lately is above half already.
        let mut shares = Shares::default();
        shares.stream_waits(true, t0);
        let mut admitted = 0;
        while admitted < 1000 && !shares.above_half_path(rate, 1000, t0) {
            shares.queued.add(1000, t0);
            admitted += 1;
        }
        assert_eq!(admitted, 50);
        // Once the queued bytes decay, more go: half the rate, over time.
        let later = t0 + Duration::from_secs_f64(SHARE_WINDOW);
        assert!(!shares.above_half_path(rate, 1000, later));
        // The wait ended: held for a moment more, then not.
        shares.stream_waits(false, later);
        let (held, over) = (later + STREAMS_HOLD / 2, later + STREAMS_HOLD);
        let mut fill = |at| {
            let room = 50_000.0 - shares.queued.at(at);
            shares.queued.add(room.max(0.0) as usize + 1, at);
            shares.above_half_path(rate, 1000, at)
        };
        assert!(fill(held));
        assert!(!fill(over));
        // Under the hold, a flow that offered an equal share of the
        // datagrams or more is held, alone or beside others; a light flow
        // beside a heavy one is not.
        let held = |flows: &[(u64, usize)], id: u64| {
            let mut shares = Shares::default();
            shares.stream_waits(true, t0);
            shares.queued.add(50_000, t0);
            for &(flow, n) in flows {
                shares.offer(flow, n, t0);
            }
            shares.held(id, 1000, rate, t0)
        };
        assert!(held(&[(1, 100_000)], 1));
        assert!(held(&[(1, 100_000), (2, 200)], 1));
        assert!(!held(&[(1, 100_000), (2, 200)], 2));
        assert!(held(&[(1, 100_000), (3, 100_000)], 3));
        // Not at half the path yet: nobody is held.
        let mut shares = Shares::default();
        shares.stream_waits(true, t0);
        shares.offer(1, 100_000, t0);
        assert!(!shares.held(1, 1000, rate, t0));
        // The path's rate is read again at most every COUNT_EVERY.
        let mut reads = 0;
        let mut shares = Shares::default();
        shares.stream_waits(true, t0);
        for i in 0..20u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            shares.above_half_path(
                || {
                    reads += 1;
                    1e6
                },
                1,
                now,
            );
        }
        assert_eq!(reads, 2);
    }

    #[tokio::test]
    async fn a_stream_counts_as_waiting_while_its_write_is_pending_and_not_after() {
        let router = Arc::new(FlowRouter::new(Arc::default()));
        let waiting = || lock(&router.shares).streams_waiting;
        // A write that goes at once never waited.
        let mut room = Room::of(Some(router.clone()));
        room.write(async {}).await;
        assert_eq!(waiting(), 0);
        assert!(lock(&router.shares).streams_waited_at.is_none());
        // One pending until let go, another dropped while pending.
        let (go, gone) = (oneshot::channel::<()>(), oneshot::channel::<()>());
        let (mut one, mut two) = (
            Room::of(Some(router.clone())),
            Room::of(Some(router.clone())),
        );
        let (rx_one, rx_two) = (go.1, gone.1);
        let first = tokio::spawn(async move { one.write(rx_one).await.is_ok() });
        let second = tokio::spawn(async move {
            let _ = two.write(rx_two).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(waiting(), 2);
        go.0.send(()).expect("send");
        assert!(first.await.expect("first"));
        assert_eq!(waiting(), 1);
        second.abort();
        let _ = second.await;
        assert_eq!(waiting(), 0);
        assert!(lock(&router.shares).streams_waited_at.is_some());
        drop(gone.0);
    }

    #[tokio::test]
    async fn a_datagram_that_arrives_just_after_its_flows_end_is_still_delivered() {
        let counted = Arc::new(StreamBytes::default());
        let router = Arc::new(FlowRouter::new(counted.clone()));
        let (stream_tx, stream_rx) = mpsc::channel(1);
        let mut rx = DatagramReceiver {
            incoming: Incoming::Both {
                frames: router.register(9),
                stream: stream_rx,
                stop: None,
                ended: false,
                // Room for a loaded machine; the flows' own is END_GRACE
                // or two round trips.
                grace: std::time::Duration::from_secs(1),
            },
            bytes: counted,
        };
        // The end comes first, the last datagram 5 ms later.
        stream_tx.send(Ok(None)).await.expect("the end");
        let late = router.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let mut d = encode_varint(9).expect("id");
            d.extend_from_slice(b"last");
            late.dispatch(&d);
        });
        assert_eq!(
            rx.recv().await.expect("read"),
            Some(Bytes::from_static(b"last"))
        );
        assert_eq!(rx.recv().await.expect("read"), None);
    }
}
