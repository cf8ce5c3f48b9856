//! Child processes: bounded runs and children killed on drop.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::{sys, LabError};

/// How often a bounded wait polls the child.
const WAIT_POLL: Duration = Duration::from_millis(5);

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd` to completion with `stdin` fed to it, killing it after
/// `timeout`. Fails if it exits non-zero.
pub(crate) fn run_checked(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let what = describe(&cmd);
    let out = run_timeout(&mut cmd, stdin, timeout)?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: what,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Run `cmd` with piped output, killing its process group after `timeout`.
pub(crate) fn run_timeout(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let what = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn().map_err(|e| LabError::Spawn {
        cmd: what.clone(),
        source: e,
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are small scripts; a failed write shows up as the command's error.
        let _ = pipe.write_all(data);
    }
    let readers = (
        child.stdout.take().map(reader),
        child.stderr.take().map(reader),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(WAIT_POLL),
            Ok(None) => {
                let _ = sys::kill_group(child.id());
                let _ = child.wait();
                return Err(LabError::Timeout { what });
            }
            Err(e) => return Err(LabError::io("waiting for child", e)),
        }
    };
    let collect = |r: Option<std::thread::JoinHandle<Vec<u8>>>| {
        r.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: collect(readers.0),
        stderr: collect(readers.1),
    })
}

fn reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // Ends when the child (and any grandchild holding the pipe) exits.
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

pub(crate) type SharedChild = Arc<Mutex<Option<Child>>>;

/// Kill (SIGKILL to its process group) and reap a child, if not done yet.
pub(crate) fn reap(shared: &Mutex<Option<Child>>) {
    let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(mut child) = guard.take() {
        if let Ok(None) = child.try_wait() {
            let _ = sys::kill_group(child.id());
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// A process running inside a lab namespace. Killed (with its whole process
/// group) when dropped, or when the [`Lab`](crate::Lab) is dropped, whichever
/// comes first.
#[derive(Debug)]
pub struct LabChild {
    inner: SharedChild,
    pid: u32,
}

impl LabChild {
    pub(crate) fn spawn(
        mut cmd: Command,
        registry: &Mutex<Vec<Weak<Mutex<Option<Child>>>>>,
    ) -> Result<Self, LabError> {
        let what = describe(&cmd);
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|e| LabError::Spawn {
            cmd: what,
            source: e,
        })?;
        let pid = child.id();
        let inner = Arc::new(Mutex::new(Some(child)));
        let mut reg = registry.lock().unwrap_or_else(PoisonError::into_inner);
        reg.retain(|w| w.strong_count() > 0);
        reg.push(Arc::downgrade(&inner));
        Ok(Self { inner, pid })
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Take the child's stdout pipe (if it was set to `Stdio::piped()`).
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.lock().as_mut().and_then(|c| c.stdout.take())
    }

    /// Take the child's stderr pipe (if it was set to `Stdio::piped()`).
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.lock().as_mut().and_then(|c| c.stderr.take())
    }

    /// The exit status if the child has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, LabError> {
        match self.lock().as_mut() {
            Some(c) => c.try_wait().map_err(|e| LabError::io("try_wait", e)),
            None => Err(LabError::TornDown),
        }
    }

    /// Wait up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(WAIT_POLL);
        }
    }

    /// Kill the child's process group now and reap it.
    pub fn kill(&self) {
        reap(&self.inner);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        reap(&self.inner);
    }
}
