//! An in-memory container runtime for the agent's unit tests: containers
//! start at once and run until the test makes them exit (or the agent stops
//! them); exec probes pass once the test says the container is ready, and
//! other execs echo their command; images pull only when the test has made
//! them present; logs are files the test writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cloudless_runtime::registry::RegistryClient;
use cloudless_runtime::{
    ContainerConfig, ContainerRuntime, Exit, ImageProcess, ImageRef, NodePolicy, RuntimeError,
    Started, TaskState,
};
use tokio::sync::watch;

use super::runtime::AgentRuntime;

/// Exit status of a container stopped with SIGTERM.
const SIGTERM_EXIT: u32 = 143;

/// One container and its task.
#[derive(Debug)]
struct Container {
    /// What it was started with.
    config: ContainerConfig,
    /// Its task.
    task: TaskState,
    /// `Some(code)` once the task has exited.
    exited: watch::Sender<Option<u32>>,
}

#[derive(Debug, Default)]
struct State {
    /// References a pull finds.
    images: HashSet<String>,
    containers: BTreeMap<String, Container>,
    /// Containers whose exec probes pass.
    ready: HashSet<String>,
    /// Starts of each container id.
    starts: HashMap<String, u32>,
    /// Stops (SIGTERM) of each container id.
    stops: HashMap<String, u32>,
    last_pid: u32,
}

/// An in-memory [`AgentRuntime`]; clones share their containers.
#[derive(Debug, Clone)]
pub(crate) struct FakeRuntime {
    state: Arc<Mutex<State>>,
    log_dir: PathBuf,
}

impl FakeRuntime {
    /// A runtime with no images and no containers, writing logs in `log_dir`.
    pub(crate) fn new(log_dir: &Path) -> Self {
        Self {
            state: Arc::default(),
            log_dir: log_dir.to_owned(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `reference` pullable.
    pub(crate) fn add_image(&self, reference: &str) {
        self.state().images.insert(reference.to_owned());
    }

    /// Makes container `id`'s process exit with `code`.
    pub(crate) fn exit(&self, id: &str, code: u32) {
        let mut s = self.state();
        let c = s
            .containers
            .get_mut(id)
            .unwrap_or_else(|| panic!("no container {id} to exit"));
        assert!(
            matches!(c.task, TaskState::Running(_)),
            "container {id} is not running: {:?}",
            c.task
        );
        c.task = TaskState::Stopped(code);
        c.exited.send_replace(Some(code));
    }

    /// Makes exec probes in container `id` pass (`true`) or fail.
    pub(crate) fn set_ready(&self, id: &str, ready: bool) {
        let mut s = self.state();
        if ready {
            s.ready.insert(id.to_owned());
        } else {
            s.ready.remove(id);
        }
    }

    /// A container left running by an earlier agent (not counted as a
    /// start).
    pub(crate) fn left_running(&self, id: &str) {
        let mut s = self.state();
        s.last_pid += 1;
        let pid = s.last_pid;
        s.containers.insert(
            id.to_owned(),
            Container {
                config: ContainerConfig {
                    id: id.to_owned(),
                    ..ContainerConfig::default()
                },
                task: TaskState::Running(pid),
                exited: watch::channel(None).0,
            },
        );
    }

    /// The host pid of container `id`'s process while it runs.
    pub(crate) fn running(&self, id: &str) -> Option<u32> {
        match self.state().containers.get(id).map(|c| c.task) {
            Some(TaskState::Running(pid)) => Some(pid),
            _ => None,
        }
    }

    /// What container `id` was last started with, while it exists.
    pub(crate) fn config(&self, id: &str) -> Option<ContainerConfig> {
        self.state().containers.get(id).map(|c| c.config.clone())
    }

    /// How often container `id` was started.
    pub(crate) fn starts(&self, id: &str) -> u32 {
        self.state().starts.get(id).copied().unwrap_or(0)
    }

    /// How often container `id` was stopped.
    pub(crate) fn stops(&self, id: &str) -> u32 {
        self.state().stops.get(id).copied().unwrap_or(0)
    }

    /// Ids of the containers that exist (running or exited).
    pub(crate) fn containers(&self) -> Vec<String> {
        self.state().containers.keys().cloned().collect()
    }

    /// Appends `line` to container `id`'s log.
    pub(crate) fn log(&self, id: &str, line: &str) {
        use std::io::Write as _;
        let path = self.log_path(id);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        writeln!(f, "{line}").unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    fn image(reference: &str) -> ImageRef {
        ImageRef {
            name: reference.to_owned(),
            chain_id: format!("sha256:fake-{reference}"),
            process: ImageProcess::default(),
        }
    }

    fn exec_answer(&self, id: &str) -> Result<(u32, String), RuntimeError> {
        let s = self.state();
        match s.containers.get(id).map(|c| c.task) {
            Some(TaskState::Running(_)) if s.ready.contains(id) => Ok((0, "ready\n".into())),
            Some(TaskState::Running(_)) => Ok((1, "not ready\n".into())),
            _ => Err(no_task(id)),
        }
    }
}

fn no_task(id: &str) -> RuntimeError {
    RuntimeError::Containerd {
        what: format!("container {id}"),
        code: tonic::Code::NotFound,
        message: "no running task".into(),
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn import(&self, _archive: &Path, name: &str) -> Result<ImageRef, RuntimeError> {
        self.add_image(name);
        Ok(Self::image(name))
    }

    async fn start(
        &self,
        c: &ContainerConfig,
        _image: &ImageRef,
        _node: &NodePolicy,
    ) -> Result<Started, RuntimeError> {
        let mut s = self.state();
        if s.containers.contains_key(&c.id) {
            return Err(RuntimeError::Containerd {
                what: format!("creating container {}", c.id),
                code: tonic::Code::AlreadyExists,
                message: "container already exists".into(),
            });
        }
        s.last_pid += 1;
        let pid = s.last_pid;
        s.containers.insert(
            c.id.clone(),
            Container {
                config: c.clone(),
                task: TaskState::Running(pid),
                exited: watch::channel(None).0,
            },
        );
        *s.starts.entry(c.id.clone()).or_default() += 1;
        Ok(Started {
            id: c.id.clone(),
            pid,
            log_path: self.log_dir.join(format!("{}.log", c.id)),
            notices: Vec::new(),
        })
    }

    async fn wait(&self, id: &str) -> Result<Exit, RuntimeError> {
        let mut exited = self
            .state()
            .containers
            .get(id)
            .map(|c| c.exited.subscribe())
            .ok_or_else(|| no_task(id))?;
        let code = exited
            .wait_for(Option::is_some)
            .await
            .map_err(|_| no_task(id))?
            .unwrap_or(255);
        Ok(Exit { code })
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<Exit, RuntimeError> {
        let mut s = self.state();
        let c = s.containers.get_mut(id).ok_or_else(|| no_task(id))?;
        let code = match c.task {
            TaskState::Running(_) => SIGTERM_EXIT,
            TaskState::Stopped(code) => return Ok(Exit { code }),
            TaskState::Absent => return Err(no_task(id)),
        };
        c.task = TaskState::Stopped(code);
        c.exited.send_replace(Some(code));
        *s.stops.entry(id.to_owned()).or_default() += 1;
        Ok(Exit { code })
    }

    async fn remove(&self, id: &str) {
        self.state().containers.remove(id);
    }

    async fn task_state(&self, id: &str) -> Result<TaskState, RuntimeError> {
        Ok(self
            .state()
            .containers
            .get(id)
            .map_or(TaskState::Absent, |c| c.task))
    }

    async fn oom_killed(&self, _id: &str, _exit_code: u32) -> bool {
        false
    }

    async fn exec(
        &self,
        id: &str,
        _argv: &[String],
        _timeout: Duration,
    ) -> Result<(u32, String), RuntimeError> {
        self.exec_answer(id)
    }

    async fn managed(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.containers())
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{id}.log"))
    }

    fn reattach_output(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
}

impl AgentRuntime for FakeRuntime {
    async fn pull(
        &self,
        _registry: &RegistryClient,
        reference: &str,
        progress: &(dyn Fn(cloudless_runtime::registry::PullProgress) + Send + Sync),
    ) -> Result<ImageRef, RuntimeError> {
        if self.state().images.contains(reference) {
            // A one-megabyte image, in two halves.
            for done in [1 << 19, 1 << 20] {
                progress(cloudless_runtime::registry::PullProgress {
                    done,
                    total: 1 << 20,
                    found: 0,
                });
            }
            Ok(Self::image(reference))
        } else {
            Err(RuntimeError::ImageNotFound {
                reference: reference.to_owned(),
            })
        }
    }

    async fn exec_streaming(
        &self,
        id: &str,
        argv: &[String],
        _timeout: Duration,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u32, RuntimeError> {
        if self.running(id).is_none() {
            return Err(no_task(id));
        }
        let _ = out.send(format!("{}\n", argv.join(" ")).into_bytes()).await;
        Ok(0)
    }
}
