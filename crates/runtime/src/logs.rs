//! Container logs: one file per container (`<id>.log`, written by the
//! containerd shim), rotated by copy-and-truncate into `<id>.log.1` ...
//! `<id>.log.<keep>`, read back with tail and follow.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::RuntimeError;

/// Rotation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the live file reaches this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 10 << 20,
            keep: 3,
        }
    }
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Rotates `path` if it has reached `r.max_bytes`: shifts `.1` .. to `.2` ..,
/// copies the live file to `.1` and truncates it in place (the shim keeps
/// writing to the same open file). Returns whether it rotated.
pub fn rotate_if_needed(path: &Path, r: Rotation) -> Result<bool, RuntimeError> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(RuntimeError::io(path, e)),
    };
    if len < r.max_bytes || r.keep == 0 {
        return Ok(false);
    }
    let _ = std::fs::remove_file(rotated(path, r.keep));
    for n in (1..r.keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            std::fs::rename(&from, rotated(path, n + 1)).map_err(|e| RuntimeError::io(&from, e))?;
        }
    }
    let first = rotated(path, 1);
    std::fs::copy(path, &first).map_err(|e| RuntimeError::io(&first, e))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| RuntimeError::io(path, e))?;
    f.set_len(0).map_err(|e| RuntimeError::io(path, e))?;
    Ok(true)
}

/// The last `lines` lines of the container's output, across rotated files
/// (oldest first).
pub fn tail(path: &Path, lines: usize, r: Rotation) -> Result<Vec<String>, RuntimeError> {
    let mut files: Vec<PathBuf> = (1..=r.keep).rev().map(|n| rotated(path, n)).collect();
    files.push(path.to_owned());
    let mut out: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for f in files {
        let text = match std::fs::read(&f) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RuntimeError::io(&f, e)),
        };
        for line in text.lines() {
            out.push_back(line.to_owned());
            if out.len() > lines {
                out.pop_front();
            }
        }
    }
    Ok(out.into())
}

/// Copies what is appended to the live file to `sink` until `stop` resolves,
/// checking every `poll`. A truncation (rotation) restarts from the top.
pub async fn follow<W: std::io::Write + Send>(
    path: &Path,
    sink: &mut W,
    poll: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RuntimeError> {
    let mut f = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut pos = f
        .seek(SeekFrom::End(0))
        .map_err(|e| RuntimeError::io(path, e))?;
    tokio::pin!(stop);
    loop {
        let len = f.metadata().map_err(|e| RuntimeError::io(path, e))?.len();
        if len < pos {
            pos = 0;
        }
        if len > pos {
            f.seek(SeekFrom::Start(pos))
                .map_err(|e| RuntimeError::io(path, e))?;
            let mut buf = Vec::new();
            (&mut f)
                .take(len - pos)
                .read_to_end(&mut buf)
                .map_err(|e| RuntimeError::io(path, e))?;
            pos += buf.len() as u64;
            sink.write_all(&buf)
                .and_then(|()| sink.flush())
                .map_err(|e| RuntimeError::io(path, e))?;
        }
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(poll) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn rotation_keeps_the_newest_files_and_tail_reads_across_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("c.log");
        let r = Rotation {
            max_bytes: 20,
            keep: 2,
        };
        let mut n = 0;
        for _ in 0..5 {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("open");
            for _ in 0..3 {
                writeln!(f, "line {n}").expect("write");
                n += 1;
            }
            assert!(rotate_if_needed(&log, r).expect("rotate"));
        }
        assert!(rotated(&log, 1).exists() && rotated(&log, 2).exists());
        assert!(!rotated(&log, 3).exists(), "more files kept than asked");
        assert_eq!(std::fs::metadata(&log).expect("live").len(), 0);
        // Only the two newest rotations remain: lines 9-14.
        let all = tail(&log, 100, r).expect("tail");
        assert_eq!(all.first().map(String::as_str), Some("line 9"));
        assert_eq!(all.last().map(String::as_str), Some("line 14"));
        assert_eq!(tail(&log, 2, r).expect("tail"), ["line 13", "line 14"]);
        assert!(!rotate_if_needed(&dir.path().join("none.log"), r).expect("missing"));
    }

    #[tokio::test]
    async fn follow_streams_appended_output_and_survives_truncation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("c.log");
        std::fs::write(&log, "old\n").expect("write");
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..3 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&log)
                        .expect("open");
                    writeln!(f, "new {i}").expect("write");
                    if i == 1 {
                        f.set_len(0).expect("truncate");
                    }
                }
            })
        };
        let mut out = Vec::new();
        follow(
            &log,
            &mut out,
            Duration::from_millis(10),
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .expect("follow");
        writer.await.expect("writer");
        let text = String::from_utf8(out).expect("utf8");
        assert!(!text.contains("old"), "{text}");
        assert!(text.contains("new 0") && text.contains("new 2"), "{text}");
    }
}
