//! The node's resolver for its replicas: listens on the bridge's address
//! (port 53, UDP and TCP), answers the names of the cluster's services
//! (`<workload>.<namespace>.<cluster domain>`, A records of their VIPs;
//! replicas' search path makes the short name work in their namespace) and
//! forwards every other query unchanged to the host's resolvers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::services::SharedServices;
use crate::NetworkError;

/// How long answers about services may be cached (endpoints come and go;
/// the VIP does not, but a deleted service should vanish soon).
const TTL_S: u32 = 5;
/// The longest wait for a forwarded answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// Most queries being forwarded at once (more are dropped: clients retry).
const MAX_FORWARDS: usize = 256;
/// Most TCP connections at once.
const MAX_TCP: usize = 64;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answer with these bytes.
    Local(Vec<u8>),
    /// Pass it to the host's resolvers.
    Forward,
    /// Not a DNS query: drop it.
    Drop,
}

/// The answer to `query` from the service table.
pub fn answer(services: &SharedServices, query: &[u8]) -> Answer {
    let Ok(msg) = Message::from_vec(query) else {
        return Answer::Drop;
    };
    if msg.message_type() != MessageType::Query {
        return Answer::Drop;
    }
    let table = services.get();
    let [q] = msg.queries() else {
        return Answer::Forward;
    };
    let name = q.name().to_ascii();
    if msg.op_code() != OpCode::Query || !table.in_domain(&name) {
        return Answer::Forward;
    }
    let mut reply = Message::new();
    reply
        .set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(true)
        .add_query(q.clone());
    match table.resolve(&name) {
        Some(vip) => {
            if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
                reply.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL_S,
                    RData::A(A(vip)),
                ));
            }
            reply.set_response_code(ResponseCode::NoError);
        }
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    match reply.to_vec() {
        Ok(bytes) => Answer::Local(bytes),
        Err(_) => Answer::Drop,
    }
}

/// The host's resolvers, from a `resolv.conf` text (port 53).
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The node's resolver.
#[derive(Debug, Clone)]
pub struct Resolver {
    services: SharedServices,
    upstreams: Arc<Vec<SocketAddr>>,
    forwards: Arc<tokio::sync::Semaphore>,
    /// Who may ask (the node's replicas); `None`: anyone who reaches it.
    clients: Option<ipnet::IpNet>,
}

impl Resolver {
    /// A resolver of `services`, forwarding to `upstreams`.
    pub fn new(services: SharedServices, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            services,
            upstreams: Arc::new(upstreams),
            forwards: Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS)),
            clients: None,
        }
    }

    /// Answers only queries from `clients` (the node's replica subnet): the
    /// host's neighbours get no forwarder into the host's resolvers.
    pub fn only_from(mut self, clients: ipnet::IpNet) -> Self {
        self.clients = Some(clients);
        self
    }

    fn admits(&self, from: std::net::IpAddr) -> bool {
        self.clients.is_none_or(|c| c.contains(&from))
    }

    /// Serves on `addr` (UDP and TCP) until the returned tasks are aborted.
    pub async fn serve(
        &self,
        addr: SocketAddr,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, NetworkError> {
        let bind_err = |e: std::io::Error| NetworkError::Config {
            field: "resolver",
            message: format!("cannot listen on {addr}: {e}"),
        };
        // Shared (see crate::sockets): an ingress port 53 of the node
        // listens on every address beside it.
        let (udp, tcp) = match addr {
            SocketAddr::V4(v4) => (
                crate::sockets::udp(v4, true)
                    .and_then(UdpSocket::from_std)
                    .map_err(bind_err)?,
                crate::sockets::tcp_listener(v4, true).map_err(bind_err)?,
            ),
            SocketAddr::V6(_) => (
                UdpSocket::bind(addr).await.map_err(bind_err)?,
                TcpListener::bind(addr).await.map_err(bind_err)?,
            ),
        };
        let udp = Arc::new(udp);
        let (me, me2) = (self.clone(), self.clone());
        Ok(vec![
            tokio::spawn(async move { me.serve_udp(udp).await }),
            tokio::spawn(async move { me2.serve_tcp(tcp).await }),
        ])
    }

    async fn serve_udp(self, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            if !self.admits(from.ip()) {
                continue;
            }
            let query = buf[..n].to_vec();
            match answer(&self.services, &query) {
                Answer::Local(bytes) => {
                    let _ = sock.send_to(&bytes, from).await;
                }
                Answer::Drop => {}
                Answer::Forward => {
                    let Ok(permit) = self.forwards.clone().try_acquire_owned() else {
                        continue;
                    };
                    let (me, sock) = (self.clone(), sock.clone());
                    tokio::spawn(async move {
                        if let Some(reply) = me.forward_udp(&query).await {
                            let _ = sock.send_to(&reply, from).await;
                        }
                        drop(permit);
                    });
                }
            }
        }
    }

    /// Asks each upstream in turn over UDP; the first answer.
    async fn forward_udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        for up in self.upstreams.iter() {
            let local: SocketAddr = if up.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(s) = UdpSocket::bind(local).await else {
                continue;
            };
            if s.connect(up).await.is_err() || s.send(query).await.is_err() {
                continue;
            }
            // Answers can be as large as UDP allows (EDNS).
            let mut buf = vec![0u8; 65_535];
            if let Ok(Ok(n)) = tokio::time::timeout(FORWARD_TIMEOUT, s.recv(&mut buf)).await {
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }

    async fn serve_tcp(self, listener: TcpListener) {
        let conns = Arc::new(tokio::sync::Semaphore::new(MAX_TCP));
        loop {
            let Ok((c, from)) = listener.accept().await else {
                continue;
            };
            if !self.admits(from.ip()) {
                continue;
            }
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), me.tcp_conn(c)).await;
                drop(permit);
            });
        }
    }

    async fn tcp_conn(&self, mut c: TcpStream) -> std::io::Result<()> {
        loop {
            let len = usize::from(c.read_u16().await?);
            let mut query = vec![0u8; len];
            c.read_exact(&mut query).await?;
            let reply = match answer(&self.services, &query) {
                Answer::Local(bytes) => bytes,
                Answer::Drop => return Ok(()),
                Answer::Forward => match self.forward_tcp(&query).await {
                    Some(r) => r,
                    None => return Ok(()),
                },
            };
            let Ok(len) = u16::try_from(reply.len()) else {
                return Ok(());
            };
            c.write_u16(len).await?;
            c.write_all(&reply).await?;
        }
    }

    /// Asks each upstream in turn over TCP; the first answer.
    async fn forward_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let len = u16::try_from(query.len()).ok()?;
        for up in self.upstreams.iter() {
            let asked = tokio::time::timeout(FORWARD_TIMEOUT, async {
                let mut s = TcpStream::connect(up).await?;
                s.write_u16(len).await?;
                s.write_all(query).await?;
                let n = usize::from(s.read_u16().await?);
                let mut buf = vec![0u8; n];
                s.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            })
            .await;
            if let Ok(Ok(reply)) = asked {
                return Some(reply);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;
    use crate::services::{LoadBalancing, Service, ServiceTable};

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7)
            .set_message_type(MessageType::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m.to_vec().expect("encode")
    }

    fn services() -> SharedServices {
        let s = SharedServices::default();
        s.set(ServiceTable::new(
            "cloudless.local",
            vec![Service {
                namespace: "default".into(),
                name: "api".into(),
                vip: [10, 96, 0, 9].into(),
                ports: vec![],
                policy: LoadBalancing::RoundRobin,
                allow_from: vec![],
                weights: BTreeMap::new(),
                endpoints: vec![],
            }],
        ));
        s
    }

    fn decode(a: Answer) -> Message {
        let Answer::Local(bytes) = a else {
            panic!("not answered here: {a:?}")
        };
        Message::from_vec(&bytes).expect("decode")
    }

    #[test]
    fn service_names_are_answered_with_their_vip_and_others_forwarded() {
        let s = services();
        let m = decode(answer(
            &s,
            &query("api.default.cloudless.local.", RecordType::A),
        ));
        assert_eq!(m.id(), 7);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(m.answers().len(), 1);
        assert_eq!(m.answers()[0].data(), &RData::A(A([10, 96, 0, 9].into())));
        // Known name, no IPv6: an empty answer, not an error.
        let m = decode(answer(
            &s,
            &query("api.default.cloudless.local.", RecordType::AAAA),
        ));
        assert_eq!(
            (m.response_code(), m.answers().len()),
            (ResponseCode::NoError, 0)
        );
        // In the domain but unknown (the search path tries these first).
        let m = decode(answer(
            &s,
            &query("api.other.cloudless.local.", RecordType::A),
        ));
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        assert_eq!(
            answer(&s, &query("example.com.", RecordType::A)),
            Answer::Forward
        );
        assert_eq!(answer(&s, b"\x00\x01garbage"), Answer::Drop);
    }

    #[test]
    fn the_hosts_resolvers_come_from_resolv_conf() {
        let conf =
            "# comment\nsearch example\nnameserver 127.0.0.53\nnameserver ::1\nnameserver bogus\n";
        assert_eq!(
            upstreams(conf),
            [
                "127.0.0.53:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
    }

    #[tokio::test]
    async fn it_answers_over_udp_and_tcp_and_forwards_the_rest() {
        // An upstream that answers everything with REFUSED (id kept).
        let up = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let up_addr = up.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = up.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).expect("query");
                let r = Message::error_msg(q.id(), OpCode::Query, ResponseCode::Refused);
                let _ = up.send_to(&r.to_vec().expect("encode"), from).await;
            }
        });
        let r = Resolver::new(services(), vec![up_addr]);
        // One port for UDP and TCP (port 0 would bind them apart).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let at: SocketAddr = ([127, 0, 0, 1], port).into();
        let tasks = r.serve(at).await.expect("serve");
        // An ingress port of the same number on every address binds beside
        // it (as an ingress port 53 beside the node's resolver).
        let every = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
        let _ingress_udp = crate::sockets::udp(every, true).expect("shared UDP");
        let _ingress_tcp = crate::sockets::tcp_listener(every, true).expect("shared TCP");
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        c.connect(at).await.expect("connect");
        let mut buf = [0u8; 512];
        c.send(&query("api.default.cloudless.local.", RecordType::A))
            .await
            .expect("send");
        let n = c.recv(&mut buf).await.expect("recv");
        let m = Message::from_vec(&buf[..n]).expect("decode");
        assert_eq!(m.answers().len(), 1);
        c.send(&query("example.com.", RecordType::A))
            .await
            .expect("send");
        let n = c.recv(&mut buf).await.expect("recv");
        let m = Message::from_vec(&buf[..n]).expect("decode");
        assert_eq!(m.response_code(), ResponseCode::Refused, "forwarded");
        let mut t = TcpStream::connect(at).await.expect("tcp");
        let q = query("api.default.cloudless.local.", RecordType::A);
        t.write_u16(u16::try_from(q.len()).expect("len"))
            .await
            .expect("w");
        t.write_all(&q).await.expect("w");
        let n = usize::from(t.read_u16().await.expect("r"));
        let mut body = vec![0u8; n];
        t.read_exact(&mut body).await.expect("r");
        assert_eq!(Message::from_vec(&body).expect("decode").answers().len(), 1);
        for task in tasks {
            task.abort();
        }
    }
}
