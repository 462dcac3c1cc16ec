//! Helpers the network benchmarks share.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Sends `mib` MiB over `s` to a sink that answers with the byte count (8
/// bytes, big endian) once the write side is shut; the throughput in
/// Gbit/s. Fails if the sink counted otherwise.
pub async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, mib: usize) -> anyhow::Result<f64> {
    let chunk = vec![7u8; 1 << 20];
    let started = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        u64::from_be_bytes(n) == (mib as u64) << 20,
        "the sink counted {} bytes",
        u64::from_be_bytes(n)
    );
    Ok(mib as f64 * 8.0 / 1024.0 / secs)
}
