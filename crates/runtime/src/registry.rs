//! Pulling images from OCI distribution registries: references, the
//! anonymous/basic/bearer token dance, manifest (and index) resolution for
//! this node's platform, and blob downloads checked against their digests.
//!
//! HTTPS always, except for registries the configuration lists as insecure,
//! which are spoken to over plain HTTP.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use containerd_client::types::Descriptor;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;

use crate::image::{descriptor, sha256_digest, Resolved};
use crate::RuntimeError;

/// Docker Hub's registry host, for references without one.
pub const DOCKER_HUB: &str = "registry-1.docker.io";
/// Largest manifest, index or configuration read.
const MAX_DOCUMENT: usize = 4 << 20;

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A parsed image reference: `[host[:port]/]repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    /// Registry host (and port).
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    /// Tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Content digest, when pinned.
    pub digest: Option<String>,
}

impl ImageName {
    /// Parses a reference the way Docker does: a first component with a `.`
    /// or `:` or equal to `localhost` is a registry host; Docker Hub
    /// otherwise, with `library/` for single-component names.
    pub fn parse(reference: &str) -> Result<Self, RuntimeError> {
        let bad = |problem: &str| RuntimeError::BadImage {
            source_name: reference.to_owned(),
            problem: problem.to_owned(),
        };
        let r = reference.trim();
        if r.is_empty() || r.len() > 512 || r.chars().any(char::is_whitespace) {
            return Err(bad("not an image reference"));
        }
        let (rest, digest) = match r.split_once('@') {
            Some((rest, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("the digest must be sha256: and 64 hex digits"));
                }
                (rest, Some(d.to_ascii_lowercase()))
            }
            None => (r, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), rest.to_owned()),
        };
        // A tag is after the last ':' of the last path component.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (path[..at].to_owned(), Some(path[at + 1..].to_owned()))
            }
            None => (path, None),
        };
        if let Some((host, port)) = registry.split_once(':') {
            if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("a registry host's port must be a number"));
            }
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad(
                "repository components are lowercase letters, digits, '.', '_' and '-'",
            ));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad("a tag is up to 128 letters, digits, '.', '_' and '-'"));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The reference the manifest is fetched by (the digest wins).
    fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// How to authenticate to one registry.
#[derive(Clone)]
pub enum Credentials {
    /// User name and password: sent as HTTP basic auth, or to the token
    /// service when the registry asks for a bearer token.
    Basic {
        /// User name.
        username: String,
        /// Password or personal access token.
        password: String,
    },
    /// A ready bearer token.
    Bearer(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Registry settings of a node.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Hosts (`host:port`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Credentials per host.
    pub credentials: HashMap<String, Credentials>,
    /// Extra CA certificates (PEM) trusted for registry TLS.
    pub ca_pem: Vec<Vec<u8>>,
}

/// Bytes of an image pull done so far, of the total the manifest announces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// Bytes downloaded or found in the local store.
    pub done: u64,
    /// Sum of the sizes of the blobs the image needs.
    pub total: u64,
    /// Of `done`, the bytes found in the local store (not downloaded).
    pub found: u64,
}

/// The manifest for this platform, with the documents already fetched.
#[derive(Debug)]
pub struct RemoteImage {
    /// Layers, configuration and process settings.
    pub resolved: Resolved,
    /// The manifest as fetched (checked against its digest).
    pub manifest: Vec<u8>,
    /// The configuration as fetched (checked against its digest).
    pub config: Vec<u8>,
}

/// A client for OCI distribution registries.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    /// Bearer tokens by (registry, scope).
    tokens: Mutex<HashMap<(String, String), String>>,
}

fn registry_err(name: &ImageName, problem: impl Into<String>) -> RuntimeError {
    RuntimeError::Registry {
        registry: name.registry.clone(),
        reference: name.to_string(),
        problem: problem.into(),
    }
}

/// Parses `Bearer realm="…",service="…",scope="…"` (or `Basic realm=…`).
fn parse_challenge(value: &str) -> (String, HashMap<String, String>) {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, val.to_owned());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_ascii_lowercase(), params)
}

impl RegistryClient {
    /// A client with `config`'s trust roots (plus the public web roots).
    pub fn new(config: RegistryConfig) -> Result<Self, RuntimeError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("cloudless-agent/", env!("CARGO_PKG_VERSION")));
        for pem in &config.ca_pem {
            let cert = reqwest::Certificate::from_pem(pem).map_err(|e| RuntimeError::BadImage {
                source_name: "registry configuration".into(),
                problem: format!("a registry CA certificate does not parse: {e}"),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| RuntimeError::Internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            config,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    fn base(&self, name: &ImageName) -> String {
        let scheme = if self.config.insecure.iter().any(|h| h == &name.registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}", name.registry, name.repository)
    }

    fn cached_token(&self, name: &ImageName) -> Option<String> {
        let scope = format!("repository:{}:pull", name.repository);
        self.tokens
            .lock()
            .ok()?
            .get(&(name.registry.clone(), scope))
            .cloned()
    }

    fn auth_header(&self, name: &ImageName) -> Option<HeaderValue> {
        if let Some(t) = self.cached_token(name) {
            return HeaderValue::from_str(&format!("Bearer {t}")).ok();
        }
        match self.config.credentials.get(&name.registry)? {
            Credentials::Bearer(t) => HeaderValue::from_str(&format!("Bearer {t}")).ok(),
            Credentials::Basic { .. } => None,
        }
    }

    /// GET `url` with authentication, answering one 401 challenge.
    async fn get(
        &self,
        name: &ImageName,
        url: &str,
        accept: &[&str],
    ) -> Result<reqwest::Response, RuntimeError> {
        let mut headers = HeaderMap::new();
        if !accept.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&accept.join(", ")) {
                headers.insert(ACCEPT, v);
            }
        }
        let send = |auth: Option<HeaderValue>| {
            let mut req = self.http.get(url).headers(headers.clone());
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            req.send()
        };
        let first = send(self.auth_header(name))
            .await
            .map_err(|e| registry_err(name, format!("GET {url}: {}", error_chain(&e))))?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        let challenge = first
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let (scheme, params) = parse_challenge(&challenge);
        let auth =
            match scheme.as_str() {
                "basic" => match self.config.credentials.get(&name.registry) {
                    Some(Credentials::Basic { username, password }) => {
                        let raw = format!("{username}:{password}");
                        let enc = base64::engine::general_purpose::STANDARD.encode(raw);
                        HeaderValue::from_str(&format!("Basic {enc}")).ok()
                    }
                    _ => return Err(registry_err(
                        name,
                        "the registry asks for credentials (basic auth) and none are configured",
                    )),
                },
                "bearer" => {
                    let token = self.fetch_token(name, &params).await?;
                    HeaderValue::from_str(&format!("Bearer {token}")).ok()
                }
                _ => {
                    return Err(registry_err(
                        name,
                        format!(
                        "unauthorized, with an authentication scheme we do not speak: {scheme:?}"
                    ),
                    ))
                }
            };
        let second = send(auth)
            .await
            .map_err(|e| registry_err(name, format!("GET {url}: {}", error_chain(&e))))?;
        if second.status() == StatusCode::UNAUTHORIZED || second.status() == StatusCode::FORBIDDEN {
            return Err(registry_err(
                name,
                format!("the registry refused our credentials ({})", second.status()),
            ));
        }
        Ok(second)
    }

    /// Asks the registry's token service for a pull token.
    async fn fetch_token(
        &self,
        name: &ImageName,
        params: &HashMap<String, String>,
    ) -> Result<String, RuntimeError> {
        let realm = params
            .get("realm")
            .ok_or_else(|| registry_err(name, "bearer challenge without a realm"))?;
        let realm_url = reqwest::Url::parse(realm)
            .map_err(|e| registry_err(name, format!("token realm {realm:?}: {e}")))?;
        // A token over plain HTTP only from a registry we already speak
        // plain HTTP to (marked insecure).
        if realm_url.scheme() != "https" && !self.config.insecure.contains(&name.registry) {
            return Err(registry_err(
                name,
                format!("token realm {realm} is not HTTPS and the registry is not marked insecure"),
            ));
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", name.repository));
        let mut query: Vec<(&str, &str)> = vec![("scope", scope.as_str())];
        if let Some(s) = params.get("service") {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm_url).query(&query);
        if let Some(Credentials::Basic { username, password }) =
            self.config.credentials.get(&name.registry)
        {
            req = req.basic_auth(username, Some(password));
        }
        let resp = req.send().await.map_err(|e| {
            registry_err(name, format!("token service {realm}: {}", error_chain(&e)))
        })?;
        if !resp.status().is_success() {
            return Err(registry_err(
                name,
                format!("the token service {realm} refused: {}", resp.status()),
            ));
        }
        let body = read_limited(name, resp, MAX_DOCUMENT).await?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| registry_err(name, format!("token service answer: {e}")))?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| registry_err(name, "the token service answered without a token"))?;
        if let Ok(mut cache) = self.tokens.lock() {
            cache.insert((name.registry.clone(), scope), token.clone());
        }
        Ok(token)
    }

    /// Fetches a manifest or index by tag or digest; checks it against the
    /// digest when one is known. Returns (media type, digest, bytes).
    async fn fetch_manifest(
        &self,
        name: &ImageName,
        reference: &str,
    ) -> Result<(String, String, Vec<u8>), RuntimeError> {
        let url = format!("{}/manifests/{reference}", self.base(name));
        let accept: Vec<&str> = INDEX_TYPES.iter().chain(&MANIFEST_TYPES).copied().collect();
        let resp = self.get(name, &url, &accept).await?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RuntimeError::ImageNotFound {
                reference: name.to_string(),
            });
        }
        if !status.is_success() {
            return Err(registry_err(
                name,
                format!("GET manifest {reference}: {status}"),
            ));
        }
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .unwrap_or_default();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_limited(name, resp, MAX_DOCUMENT).await?;
        let actual = sha256_digest(&body);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_owned())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(registry_err(
                    name,
                    format!("manifest {reference} is corrupt: expected {expected}, its content hashes to {actual}"),
                ));
            }
        }
        // Some registries answer without a content type: read it from the body.
        let media_type = if media_type.is_empty() || media_type == "application/json" {
            #[derive(serde::Deserialize)]
            struct Probe {
                #[serde(rename = "mediaType")]
                media_type: Option<String>,
                manifests: Option<serde_json::Value>,
            }
            let p: Probe = serde_json::from_slice(&body)
                .map_err(|e| registry_err(name, format!("manifest is not JSON: {e}")))?;
            p.media_type.unwrap_or_else(|| {
                if p.manifests.is_some() {
                    INDEX_TYPES[0].to_owned()
                } else {
                    MANIFEST_TYPES[0].to_owned()
                }
            })
        } else {
            media_type
        };
        Ok((media_type, actual, body))
    }

    /// Resolves `name` to the manifest for `platform`, fetching the manifest
    /// and configuration (both digest-checked).
    pub async fn resolve(
        &self,
        name: &ImageName,
        platform: (&str, &str),
    ) -> Result<RemoteImage, RuntimeError> {
        let (mut media_type, mut digest, mut body) =
            self.fetch_manifest(name, name.manifest_reference()).await?;
        if INDEX_TYPES.contains(&media_type.as_str()) {
            let index: ImageIndex = serde_json::from_slice(&body)
                .map_err(|e| registry_err(name, format!("image index: {e}")))?;
            let chosen = index
                .manifests()
                .iter()
                .find(|d| {
                    d.platform().as_ref().is_some_and(|p| {
                        p.os().to_string() == platform.0
                            && p.architecture().to_string() == platform.1
                    })
                })
                .ok_or_else(|| {
                    let offered: Vec<String> = index
                        .manifests()
                        .iter()
                        .filter_map(|d| d.platform().as_ref())
                        .map(|p| format!("{}/{}", p.os(), p.architecture()))
                        .collect();
                    registry_err(
                        name,
                        format!(
                            "no manifest for {}/{} in the index (it offers {})",
                            platform.0,
                            platform.1,
                            offered.join(", ")
                        ),
                    )
                })?;
            let d = chosen.digest().to_string();
            (media_type, digest, body) = self.fetch_manifest(name, &d).await?;
            if d != digest {
                return Err(registry_err(
                    name,
                    format!("manifest {d} came back as {digest}"),
                ));
            }
        }
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(registry_err(
                name,
                format!("unsupported manifest type {media_type:?}"),
            ));
        }
        let manifest: ImageManifest = serde_json::from_slice(&body)
            .map_err(|e| registry_err(name, format!("image manifest: {e}")))?;
        let config_desc = descriptor(
            manifest.config().media_type().as_ref(),
            manifest.config().digest().as_ref(),
            manifest.config().size(),
        );
        let config_bytes = self.fetch_small_blob(name, &config_desc).await?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| registry_err(name, format!("image configuration: {e}")))?;
        let (layers, diff_ids, process) = crate::image::image_parts(&manifest, &config)
            .map_err(|p| registry_err(name, format!("image configuration: {p}")))?;
        let size = u64::try_from(body.len()).unwrap_or(u64::MAX);
        Ok(RemoteImage {
            resolved: Resolved {
                manifest: descriptor(&media_type, &digest, size),
                config: config_desc,
                layers,
                diff_ids,
                process,
            },
            manifest: body,
            config: config_bytes,
        })
    }

    async fn fetch_small_blob(
        &self,
        name: &ImageName,
        desc: &Descriptor,
    ) -> Result<Vec<u8>, RuntimeError> {
        let resp = self.blob(name, desc).await?;
        let body = read_limited(name, resp, MAX_DOCUMENT).await?;
        let actual = sha256_digest(&body);
        if actual != desc.digest {
            return Err(registry_err(
                name,
                format!(
                    "blob {} is corrupt: its content hashes to {actual}",
                    desc.digest
                ),
            ));
        }
        Ok(body)
    }

    /// Starts downloading the blob `desc`; the caller reads the body and
    /// checks its digest.
    pub async fn blob(
        &self,
        name: &ImageName,
        desc: &Descriptor,
    ) -> Result<reqwest::Response, RuntimeError> {
        let url = format!("{}/blobs/{}", self.base(name), desc.digest);
        let resp = self.get(name, &url, &[]).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(registry_err(
                name,
                format!("GET blob {}: {status}", desc.digest),
            ));
        }
        Ok(resp)
    }
}

impl RegistryClient {
    /// Pushes this platform's image from an OCI archive to `reference`
    /// (blobs the registry has are skipped); returns the manifest digest.
    /// Anonymous pushes only: for a node's own or a development registry.
    pub async fn push_archive(
        &self,
        archive: &crate::image::OciArchive,
        reference: &str,
    ) -> Result<String, RuntimeError> {
        let name = ImageName::parse(reference)?;
        let resolved = archive.resolve(crate::image::host_platform())?;
        let base = self.base(&name);
        for desc in resolved.layers.iter().chain([&resolved.config]) {
            let head = self
                .http
                .head(format!("{base}/blobs/{}", desc.digest))
                .send()
                .await
                .map_err(|e| registry_err(&name, error_chain(&e)))?;
            if head.status().is_success() {
                continue;
            }
            let start = expect(
                &name,
                self.http.post(format!("{base}/blobs/uploads/")),
                StatusCode::ACCEPTED,
                "starting an upload",
            )
            .await?;
            let location = start
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| registry_err(&name, "upload without a Location"))?;
            let mut url = start
                .url()
                .join(location)
                .map_err(|e| registry_err(&name, format!("upload location: {e}")))?;
            url.query_pairs_mut().append_pair("digest", &desc.digest);
            let upload = self
                .http
                .put(url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(archive.blob(&desc.digest)?.to_vec());
            expect(
                &name,
                upload,
                StatusCode::CREATED,
                &format!("uploading {}", desc.digest),
            )
            .await?;
        }
        let manifest = archive.blob(&resolved.manifest.digest)?;
        let put = self
            .http
            .put(format!("{base}/manifests/{}", name.manifest_reference()))
            .header(reqwest::header::CONTENT_TYPE, &resolved.manifest.media_type)
            .body(manifest.to_vec());
        expect(&name, put, StatusCode::CREATED, "putting the manifest").await?;
        Ok(resolved.manifest.digest)
    }
}

/// Sends `req` and requires status `want`.
async fn expect(
    name: &ImageName,
    req: reqwest::RequestBuilder,
    want: StatusCode,
    what: &str,
) -> Result<reqwest::Response, RuntimeError> {
    let resp = req
        .send()
        .await
        .map_err(|e| registry_err(name, format!("{what}: {}", error_chain(&e))))?;
    if resp.status() != want {
        return Err(registry_err(name, format!("{what}: {}", resp.status())));
    }
    Ok(resp)
}

/// Reads a whole body of at most `limit` bytes.
async fn read_limited(
    name: &ImageName,
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, RuntimeError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| registry_err(name, format!("reading an answer: {}", error_chain(&e))))?
    {
        if out.len() + chunk.len() > limit {
            return Err(registry_err(
                name,
                format!("a document is larger than {limit} bytes"),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An error with its causes (reqwest's own message hides them).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_docker() {
        let n = ImageName::parse("busybox").expect("parses");
        assert_eq!(
            (n.registry.as_str(), n.repository.as_str(), n.tag.as_deref()),
            (DOCKER_HUB, "library/busybox", Some("latest"))
        );
        let n = ImageName::parse("127.0.0.1:5000/tools/busybox:1.36").expect("parses");
        assert_eq!(
            (n.registry.as_str(), n.repository.as_str(), n.tag.as_deref()),
            ("127.0.0.1:5000", "tools/busybox", Some("1.36"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let n = ImageName::parse(&format!("localhost/app@{d}")).expect("parses");
        assert_eq!(
            (n.tag.as_deref(), n.digest.as_deref()),
            (None, Some(d.as_str()))
        );
        assert_eq!(n.manifest_reference(), d);
        assert_eq!(
            ImageName::parse("ghcr.io/org/app:v1")
                .expect("parses")
                .to_string(),
            "ghcr.io/org/app:v1"
        );
        for bad in ["", "Busybox", "a b", "app@sha256:12", "app:bad/tag", "app:"] {
            assert!(ImageName::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
        // Junk never panics.
        for junk in ["", "Bearer", "Bearer realm", "Bearer realm=\"x", "=,=,\""] {
            let _ = parse_challenge(junk);
        }
    }

    #[test]
    fn credentials_never_print_secrets() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::Bearer("tok3n".into())).contains("tok3n"));
    }
}
