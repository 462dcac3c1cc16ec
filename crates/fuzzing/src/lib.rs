//! The entry functions of the fuzz targets in `fuzz/` (cargo-fuzz, run by
//! `make fuzz`), kept in the workspace so that `cargo test` replays the
//! checked-in corpus through exactly the same code on stable Rust.
//!
//! Each function takes bytes an attacker could send or write and must
//! return without panicking, whatever they are. Where a decoder has an
//! encoder, what decodes must also encode and decode back to the same value.

use std::future::Future;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use cloudless_overlay::wire::{read_frame, write_frame, StreamReply, StreamRequest};
use cloudless_pki::{ClusterCa, Identity, TokenKey};
use cloudless_secrets::AccessTokenKey;
use cloudless_state::{NodeId, Proposal, TypeConfig};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

/// A fuzz target's entry function.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (each has `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/`).
pub const TARGETS: [(&str, Target); 5] = [
    ("manifest", manifest),
    ("overlay_frame", overlay_frame),
    ("token", token),
    ("csr", csr),
    ("raft_entry", raft_entry),
];

/// A workload manifest (YAML or JSON) as `cloudlessctl apply` and the
/// coordinator read it.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(w) = cloudless_types::parse_manifest(&text) {
        // What validates once validates again after a JSON round trip.
        let json = serde_json::to_string(&w).expect("a parsed workload serializes");
        let back: cloudless_types::Workload =
            serde_json::from_str(&json).expect("a serialized workload parses");
        assert_eq!(back, w, "JSON round trip changed the workload");
    }
}

/// Polls a future that cannot wait (it reads from a slice or writes to a
/// `Vec`) to completion.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("in-memory I/O never waits"),
    }
}

/// The first frames of an overlay stream: a request as a node receives it
/// from a peer, and a reply as the opener receives it.
pub fn overlay_frame(data: &[u8]) {
    let mut input = data;
    if let Ok(req) = ready(read_frame::<_, StreamRequest>(&mut input)) {
        let mut out = Vec::new();
        ready(write_frame(&mut out, &req)).expect("a decoded request encodes");
        let back: StreamRequest =
            ready(read_frame(&mut out.as_slice())).expect("an encoded request decodes");
        assert_eq!(back, req, "request round trip");
    }
    let mut input = data;
    if let Ok(reply) = ready(read_frame::<_, StreamReply>(&mut input)) {
        let mut out = Vec::new();
        ready(write_frame(&mut out, &reply)).expect("a decoded reply encodes");
        let back: StreamReply =
            ready(read_frame(&mut out.as_slice())).expect("an encoded reply decodes");
        assert_eq!(back, reply, "reply round trip");
    }
}

/// The token key every target uses (fixed so that signed inputs verify).
fn token_key() -> TokenKey {
    TokenKey::from_bytes(&[7u8; 32]).expect("32 bytes")
}

/// Must match `cloudless_secrets::token::KEY_CONTEXT`, so that claims this
/// target signs reach the access token's claim checks.
const ACCESS_KEY_CONTEXT: &str = "cloudless secret access tokens v1";

/// Join tokens (enrollment) and secret access tokens (reveal), as text from
/// the network; and, when the bytes are JSON, those claims correctly signed,
/// so the checks after the signature are reached too.
pub fn token(data: &[u8]) {
    let key = token_key();
    let access = AccessTokenKey::from_cluster_key(&key);
    let now = 1_800_000_000;
    let text = String::from_utf8_lossy(data);
    let _ = key.verify(&text, now);
    let _ = access.verify(&text, now * 1000);
    let _ = AccessTokenKey::peek(&text);
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(t) = key.sign_claims(&claims) {
            let _ = key.verify(&t, now);
        }
        if let Ok(t) = key.derive(ACCESS_KEY_CONTEXT).sign_claims(&claims) {
            let _ = access.verify(&t, now * 1000);
            let _ = AccessTokenKey::peek(&t);
        }
    }
}

fn ca() -> &'static ClusterCa {
    static CA: OnceLock<ClusterCa> = OnceLock::new();
    CA.get_or_init(|| ClusterCa::generate("fuzz", 1_800_000_000).expect("a CA"))
}

/// A certificate signing request as enrollment and renewal receive it: the
/// bytes as PEM text, and as the DER body of a PEM block; and the same bytes
/// as the old certificate (and proof) of a rejoin, which is never granted to
/// a certificate the CA did not issue.
pub fn csr(data: &[u8]) {
    use base64::Engine as _;
    let node = Identity::Node("n1".into());
    let now = 1_800_000_000;
    if let Ok(pem) = std::str::from_utf8(data) {
        let _ = ca().sign_csr(pem, &node, 3600, now);
    }
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    if let Ok(issued) = ca().sign_csr(&pem, &node, 3600, now) {
        // Whatever was signed is a certificate for exactly this node.
        let info = cloudless_pki::inspect_certificate(&issued.cert_pem)
            .expect("an issued certificate parses");
        assert_eq!(info.identity, node, "signed for another identity");
    }
    let _ = cloudless_pki::inspect_certificate_der(data);
    let cert_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    let text = String::from_utf8_lossy(data);
    for cert in [cert_pem.as_str(), &text] {
        let proof = cloudless_pki::RejoinProof {
            cert_pem: cert,
            csr_pem: &text,
            signed_at: now,
            signature: data,
        };
        let granted = cloudless_pki::verify_rejoin_proof(ca().cert_pem(), &proof, now, u64::MAX);
        assert!(
            granted.is_err(),
            "a rejoin granted to a certificate the CA did not issue"
        );
    }
}

/// Raft traffic and storage: a log entry as the log store reads it, the
/// `RaftPayload` of each Raft RPC as `raft_service.rs` decodes it (postcard),
/// a proposal, and a snapshot file as a follower installs it.
pub fn raft_entry(data: &[u8]) {
    // Compared as bytes: a float field may hold NaN, which is not equal to
    // itself but encodes to the same bits.
    if let Ok(e) = postcard::from_bytes::<openraft::Entry<TypeConfig>>(data) {
        let bytes = postcard::to_allocvec(&e).expect("a decoded entry encodes");
        let back: openraft::Entry<TypeConfig> =
            postcard::from_bytes(&bytes).expect("an encoded entry decodes");
        let again = postcard::to_allocvec(&back).expect("it encodes again");
        assert_eq!(again, bytes, "entry round trip");
    }
    if let Ok(p) = postcard::from_bytes::<Proposal>(data) {
        let bytes = postcard::to_allocvec(&p).expect("a decoded proposal encodes");
        let back: Proposal = postcard::from_bytes(&bytes).expect("an encoded proposal decodes");
        let again = postcard::to_allocvec(&back).expect("it encodes again");
        assert_eq!(again, bytes, "proposal round trip");
    }
    let _ = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(data);
    let _ = postcard::from_bytes::<VoteRequest<NodeId>>(data);
    let _ = postcard::from_bytes::<InstallSnapshotRequest<TypeConfig>>(data);
    let _ = cloudless_state::snapshot_file::check_snapshot_bytes(data);
}
