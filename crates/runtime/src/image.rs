//! OCI image layouts in tar archives (for offline devices and tests): read,
//! every blob checked against its digest, the manifest for this platform
//! chosen from an index.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;

use containerd_client::types::Descriptor;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

use crate::model::ImageProcess;
use crate::RuntimeError;

/// Largest archive entry read into memory.
const MAX_ENTRY: u64 = 2 << 30;
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// `linux/<arch>` of this host, in OCI spelling.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    };
    ("linux", arch)
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Chain ids of a layer stack: `chain(1) = diff(1)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// An image layout read from a tar archive.
#[derive(Debug)]
pub struct OciArchive {
    files: HashMap<String, Vec<u8>>,
}

/// The manifest chosen for this platform and what it points at.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The manifest's descriptor.
    pub manifest: Descriptor,
    /// The image configuration's descriptor.
    pub config: Descriptor,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// Uncompressed layer digests from the configuration.
    pub diff_ids: Vec<String>,
    /// Process settings from the configuration.
    pub process: ImageProcess,
}

fn bad(path: &Path, problem: impl Into<String>) -> RuntimeError {
    RuntimeError::BadImage {
        source_name: path.display().to_string(),
        problem: problem.into(),
    }
}

pub(crate) fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_owned(),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

impl OciArchive {
    /// Reads `path` and checks every blob against the digest it is stored under.
    pub fn open(path: &Path) -> Result<Self, RuntimeError> {
        let file = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
        let mut archive = tar::Archive::new(file);
        let mut files = HashMap::new();
        let entries = archive
            .entries()
            .map_err(|e| bad(path, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(path, format!("damaged tar entry: {e}")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| bad(path, format!("bad entry name: {e}")))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            let size = entry.size();
            if size > MAX_ENTRY {
                return Err(bad(path, format!("{name} is {size} bytes")));
            }
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            entry
                .read_to_end(&mut data)
                .map_err(|e| bad(path, format!("reading {name}: {e}")))?;
            files.insert(name, data);
        }
        for (name, data) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                let actual = sha256_digest(data);
                if actual != format!("sha256:{hex}") {
                    return Err(bad(
                        path,
                        format!("blob sha256:{hex} is corrupt: its content hashes to {actual}"),
                    ));
                }
            }
        }
        if !files.contains_key("index.json") {
            return Err(bad(path, "no index.json: not an OCI image layout"));
        }
        Ok(Self { files })
    }

    /// The blob with `digest`.
    pub fn blob(&self, digest: &str) -> Result<&[u8], RuntimeError> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.files
            .get(&format!("blobs/sha256/{hex}"))
            .map(Vec::as_slice)
            .ok_or_else(|| RuntimeError::BadImage {
                source_name: "archive".into(),
                problem: format!("blob {digest} is referenced but missing"),
            })
    }

    /// Picks the manifest for `platform` (following one level of index).
    pub fn resolve(&self, platform: (&str, &str)) -> Result<Resolved, RuntimeError> {
        let parse_err = |what: &str, e: &dyn std::fmt::Display| RuntimeError::BadImage {
            source_name: "archive".into(),
            problem: format!("{what}: {e}"),
        };
        let index: ImageIndex = serde_json::from_slice(&self.files["index.json"])
            .map_err(|e| parse_err("index.json", &e))?;
        let mut candidates: Vec<oci_spec::image::Descriptor> = index.manifests().clone();
        // An index inside the layout: descend once.
        if let [only] = candidates.as_slice() {
            if INDEX_TYPES.contains(&only.media_type().to_string().as_str()) {
                let nested: ImageIndex = serde_json::from_slice(self.blob(only.digest().as_ref())?)
                    .map_err(|e| parse_err("nested index", &e))?;
                candidates = nested.manifests().clone();
            }
        }
        let chosen = candidates
            .iter()
            .find(|d| {
                d.platform().as_ref().is_none_or(|p| {
                    p.os().to_string() == platform.0 && p.architecture().to_string() == platform.1
                })
            })
            .ok_or_else(|| RuntimeError::BadImage {
                source_name: "archive".into(),
                problem: format!("no manifest for {}/{}", platform.0, platform.1),
            })?;
        let manifest_digest = chosen.digest().to_string();
        let manifest: ImageManifest = serde_json::from_slice(self.blob(&manifest_digest)?)
            .map_err(|e| parse_err("manifest", &e))?;
        let config_digest = manifest.config().digest().to_string();
        let config: ImageConfiguration = serde_json::from_slice(self.blob(&config_digest)?)
            .map_err(|e| parse_err("image configuration", &e))?;
        let (layers, diff_ids, process) =
            image_parts(&manifest, &config).map_err(|p| parse_err("image configuration", &p))?;
        Ok(Resolved {
            manifest: descriptor(
                chosen.media_type().as_ref(),
                &manifest_digest,
                chosen.size(),
            ),
            config: descriptor(
                manifest.config().media_type().as_ref(),
                &config_digest,
                manifest.config().size(),
            ),
            layers,
            diff_ids,
            process,
        })
    }
}

/// What a manifest and its configuration say about running the image: the
/// layers, their uncompressed digests (one per layer, checked) and the
/// process settings.
pub(crate) fn image_parts(
    manifest: &ImageManifest,
    config: &ImageConfiguration,
) -> Result<(Vec<Descriptor>, Vec<String>, ImageProcess), String> {
    let diff_ids: Vec<String> = config.rootfs().diff_ids().clone();
    if diff_ids.len() != manifest.layers().len() {
        return Err(format!(
            "{} diff ids for {} layers",
            diff_ids.len(),
            manifest.layers().len()
        ));
    }
    let process = config
        .config()
        .as_ref()
        .map(|c| ImageProcess {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().unwrap_or_default(),
            user: c.user().clone().unwrap_or_default(),
        })
        .unwrap_or_default();
    let layers = manifest
        .layers()
        .iter()
        .map(|l| descriptor(l.media_type().as_ref(), l.digest().as_ref(), l.size()))
        .collect();
    Ok((layers, diff_ids, process))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let d = vec!["sha256:aa".to_owned(), "sha256:bb".to_owned()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:aa");
        assert_eq!(c[1], sha256_digest(b"sha256:aa sha256:bb"));
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
