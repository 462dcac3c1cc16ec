//! Development images without a network: `cloudless-image busybox OUT.tar`
//! writes an OCI archive of the host's static busybox (Debian's
//! `busybox-static`); `cloudless-image push ARCHIVE REFERENCE [--insecure]`
//! pushes an OCI archive to a registry (anonymous). The demo uses both to
//! fill a local registry the agents pull from.

use std::path::Path;
use std::process::ExitCode;

use cloudless_runtime::image::OciArchive;
use cloudless_runtime::registry::{ImageName, RegistryClient, RegistryConfig};

const USAGE: &str = "usage: cloudless-image busybox OUT.tar\n       cloudless-image push ARCHIVE REFERENCE [--insecure]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["busybox", out] => cloudless_runtime::test_support::write_busybox_archive(
            Path::new(out),
            "busybox:latest",
            false,
        )
        .map(|()| format!("wrote {out}")),
        ["push", archive, reference, rest @ ..] if rest.iter().all(|a| *a == "--insecure") => {
            push(archive, reference, !rest.is_empty())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cloudless-image: {e}");
            ExitCode::FAILURE
        }
    }
}

fn push(
    archive: &str,
    reference: &str,
    insecure: bool,
) -> Result<String, cloudless_runtime::RuntimeError> {
    let name = ImageName::parse(reference)?;
    let oci = OciArchive::open(Path::new(archive))?;
    let client = RegistryClient::new(RegistryConfig {
        insecure: if insecure {
            vec![name.registry.clone()]
        } else {
            Vec::new()
        },
        ..RegistryConfig::default()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| cloudless_runtime::RuntimeError::Internal(e.to_string()))?;
    let digest = rt.block_on(client.push_archive(&oci, reference))?;
    Ok(format!("pushed {name} ({digest})"))
}
