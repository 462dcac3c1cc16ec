//! Logs and exec for operators: a `Tunnel` stream to each coordinator, down
//! which requests come and up which log lines and command output go.

use std::collections::HashMap;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_runtime::ContainerRuntime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::workloads::{container_id, AgentRuntime};
use crate::{Coordinators, NodeIdentity};

/// A `Write` that hands each write to an async task (for `logs::follow`).
struct ChanWriter(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);

impl std::io::Write for ChanWriter {
    /// Takes at most 64 KiB per call (`write_all` loops), so each tunnel
    /// message stays far below the coordinator's limit on agent messages.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(64 * 1024);
        self.0
            .send(buf[..n].to_vec())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader gone"))?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `id` can name a container log file (no path tricks).
fn safe_replica_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Answers one logs request: the last lines, then (with follow) what is
/// appended until cancelled.
async fn serve_logs<R: ContainerRuntime>(
    rt: R,
    id: u64,
    req: pb::LogsRequest,
    up: tokio::sync::mpsc::Sender<pb::TunnelUp>,
    cancel: CancellationToken,
) {
    let replica_id = req.replica_id.clone();
    let chunk = move |data: Vec<u8>| pb::TunnelUp {
        request_id: id,
        chunk: Some(pb::LogChunk {
            replica_id: replica_id.clone(),
            // containerd's log file interleaves both streams.
            stream: pb::LogStream::Stdout.into(),
            legacy_stream: "stdout".into(),
            data,
        }),
        end: false,
        error: String::new(),
        exec_output: None,
    };
    let end = move |error: String| pb::TunnelUp {
        request_id: id,
        chunk: None,
        end: true,
        error,
        exec_output: None,
    };
    if !safe_replica_id(&req.replica_id) {
        let _ = up.send(end("replica_id: not a replica id".into())).await;
        return;
    }
    let path = rt.log_path(&container_id(&req.replica_id));
    /// Bytes of log per tunnel message.
    const LOG_CHUNK: usize = 64 * 1024;
    let rotation = cloudless_runtime::logs::Rotation::default();
    let lines = if req.tail_lines == 0 {
        usize::MAX
    } else {
        req.tail_lines as usize
    };
    match cloudless_runtime::logs::tail(&path, lines, rotation) {
        Ok(tail) => {
            // Chunks of about 64 KiB: each tunnel message stays far below
            // the coordinator's 1 MiB limit on agent messages, however long
            // the lines.
            let mut data = Vec::new();
            for line in tail {
                for piece in line.as_bytes().chunks(LOG_CHUNK) {
                    data.extend_from_slice(piece);
                    if data.len() >= LOG_CHUNK
                        && up.send(chunk(std::mem::take(&mut data))).await.is_err()
                    {
                        return;
                    }
                }
                data.push(b'\n');
            }
            if !data.is_empty() && up.send(chunk(data)).await.is_err() {
                return;
            }
        }
        Err(e) => {
            let _ = up.send(end(format!("no logs on this node: {e}"))).await;
            return;
        }
    }
    if req.follow {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = {
            let up = up.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    if up.send(chunk(data)).await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut sink = ChanWriter(tx);
        let r = cloudless_runtime::logs::follow(
            &path,
            &mut sink,
            Duration::from_millis(200),
            cancel.cancelled(),
        )
        .await;
        drop(sink);
        let _ = forward.await;
        let _ = up
            .send(end(r.err().map(|e| e.to_string()).unwrap_or_default()))
            .await;
    } else {
        let _ = up.send(end(String::new())).await;
    }
}

/// Longest exec the agent runs, and the default.
const MAX_EXEC: Duration = Duration::from_secs(3600);
const DEFAULT_EXEC: Duration = Duration::from_secs(60);

/// Runs one command in a replica's container and answers with its output,
/// in chunks as it comes, then its exit code.
async fn serve_exec<R: AgentRuntime>(
    rt: R,
    id: u64,
    req: pb::ExecRequest,
    up: tokio::sync::mpsc::Sender<pb::TunnelUp>,
    cancel: CancellationToken,
) {
    let answer = |output: Option<pb::ExecOutput>, error: String| pb::TunnelUp {
        request_id: id,
        chunk: None,
        end: true,
        error,
        exec_output: output,
    };
    if !safe_replica_id(&req.replica_id) {
        let _ = up
            .send(answer(None, "replica_id: not a replica id".into()))
            .await;
        return;
    }
    if req.command.is_empty() {
        let _ = up
            .send(answer(None, "command: must not be empty".into()))
            .await;
        return;
    }
    let timeout = match req.timeout_seconds {
        0 => DEFAULT_EXEC,
        s => Duration::from_secs(u64::from(s)).min(MAX_EXEC),
    };
    tracing::info!(replica = %req.replica_id, program = %req.command[0], "exec");
    let container = container_id(&req.replica_id);
    // Output goes up in chunks as it comes, held only in memory.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let run = rt.exec_streaming(&container, &req.command, timeout, out_tx);
    tokio::pin!(run);
    let chunk = |stdout: Vec<u8>| pb::TunnelUp {
        request_id: id,
        chunk: None,
        end: false,
        error: String::new(),
        exec_output: Some(pb::ExecOutput {
            stdout,
            stderr: Vec::new(),
            exit_code: None,
        }),
    };
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            Some(out) = out_rx.recv() => {
                if up.send(chunk(out)).await.is_err() {
                    return;
                }
            }
            () = cancel.cancelled() => return,
        }
    };
    while let Ok(out) = out_rx.try_recv() {
        if up.send(chunk(out)).await.is_err() {
            return;
        }
    }
    let msg = match result {
        Ok(code) => answer(
            Some(pb::ExecOutput {
                stdout: Vec::new(),
                stderr: Vec::new(),
                exit_code: Some(i32::try_from(code).unwrap_or(i32::MAX)),
            }),
            String::new(),
        ),
        Err(e) => answer(None, e.to_string()),
    };
    let _ = up.send(msg).await;
}

/// Keeps a `Tunnel` stream open to one coordinator and answers what comes
/// down it, until `cancel`.
pub async fn tunnel<R: AgentRuntime>(
    address: String,
    mut identity: watch::Receiver<NodeIdentity>,
    rt: R,
    cancel: CancellationToken,
) {
    let mut coordinators =
        Coordinators::new(vec![address.clone()], identity.borrow_and_update().clone());
    loop {
        if identity.has_changed().unwrap_or(false) {
            coordinators.set_identity(identity.borrow_and_update().clone());
        }
        let opened = tokio::select! {
            r = coordinators.call("tunnel", |mut c| async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<pb::TunnelUp>(64);
                let resp = c.tunnel(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
                Ok(resp.map(|down| (tx, down)))
            }) => r,
            () = cancel.cancelled() => return,
        };
        let (up, mut down) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(coordinator = %address, error = %e, "no tunnel; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    () = cancel.cancelled() => return,
                }
            }
        };
        let mut requests: HashMap<u64, CancellationToken> = HashMap::new();
        loop {
            let msg = tokio::select! {
                m = down.message() => m,
                () = cancel.cancelled() => return,
            };
            match msg {
                Ok(Some(d)) if d.cancel => {
                    if let Some(c) = requests.remove(&d.request_id) {
                        c.cancel();
                    }
                }
                Ok(Some(d)) => {
                    let stop = cancel.child_token();
                    requests.retain(|_, c| !c.is_cancelled());
                    requests.insert(d.request_id, stop.clone());
                    if let Some(logs) = d.logs {
                        tokio::spawn(serve_logs(rt.clone(), d.request_id, logs, up.clone(), stop));
                    } else if let Some(exec) = d.exec {
                        tokio::spawn(serve_exec(rt.clone(), d.request_id, exec, up.clone(), stop));
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        for (_, c) in requests.drain() {
            c.cancel();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::fake_runtime::FakeRuntime;

    /// What went up for one request: the data, and the error it ended with.
    async fn answer(
        mut up: tokio::sync::mpsc::Receiver<pb::TunnelUp>,
        id: u64,
    ) -> (Vec<u8>, String, Option<i32>) {
        let (mut data, mut exit) = (Vec::new(), None);
        while let Some(m) = up.recv().await {
            assert_eq!(m.request_id, id);
            if let Some(c) = m.chunk {
                data.extend(c.data);
            }
            if let Some(o) = m.exec_output {
                data.extend(o.stdout);
                exit = exit.or(o.exit_code);
            }
            if m.end {
                return (data, m.error, exit);
            }
        }
        panic!("request {id} never ended");
    }

    #[tokio::test]
    async fn a_logs_request_answers_the_last_lines_and_a_path_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = FakeRuntime::new(dir.path());
        for line in ["one", "two", "three"] {
            rt.log("default.web-1", line);
        }
        let request = |replica_id: &str| pb::LogsRequest {
            replica_id: replica_id.into(),
            tail_lines: 2,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        serve_logs(
            rt.clone(),
            7,
            request("default.web-1"),
            tx,
            CancellationToken::new(),
        )
        .await;
        let (data, error, _) = answer(rx, 7).await;
        assert_eq!(
            (data.as_slice(), error.as_str()),
            (&b"two\nthree\n"[..], "")
        );

        let (tx, rx) = tokio::sync::mpsc::channel(16);
        serve_logs(
            rt,
            8,
            request("../default.web-1"),
            tx,
            CancellationToken::new(),
        )
        .await;
        let (data, error, _) = answer(rx, 8).await;
        assert!(data.is_empty());
        assert_eq!(error, "replica_id: not a replica id");
    }

    #[tokio::test]
    async fn an_exec_request_answers_the_output_then_the_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = FakeRuntime::new(dir.path());
        rt.left_running("default.web-1");
        let request = |command: &[&str]| pb::ExecRequest {
            replica_id: "default.web-1".into(),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        serve_exec(
            rt.clone(),
            3,
            request(&["echo", "hi"]),
            tx,
            CancellationToken::new(),
        )
        .await;
        let (data, error, exit) = answer(rx, 3).await;
        assert_eq!(
            (data.as_slice(), error.as_str(), exit),
            (&b"echo hi\n"[..], "", Some(0))
        );

        let (tx, rx) = tokio::sync::mpsc::channel(16);
        serve_exec(rt, 4, request(&[]), tx, CancellationToken::new()).await;
        let (_, error, exit) = answer(rx, 4).await;
        assert_eq!((error.as_str(), exit), ("command: must not be empty", None));
    }
}
