//! A server run as a child process: killed when dropped unless detached.

use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::{wait_for_port, Result, ServerError};

/// A server run as a child process on a loopback port: killed when dropped unless detached.
#[derive(Debug)]
pub(crate) struct ChildServer {
    /// What it is, for messages.
    pub(crate) what: &'static str,
    pub(crate) port: u16,
    pub(crate) child: Option<Child>,
    detached: bool,
}

impl ChildServer {
    pub(crate) fn new(what: &'static str, port: u16) -> Self {
        Self {
            what,
            port,
            child: None,
            detached: false,
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process with SIGKILL and waits until it exited and its port closed.
    pub(crate) fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        wait_for_port(self.port, false, Duration::from_secs(30), self.what)
    }

    /// Sends SIGTERM (a clean shutdown) and waits until the process exited and its port closed;
    /// SIGKILL after 30 s.
    pub(crate) fn terminate(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(30) {
                    child.kill()?;
                    child.wait()?;
                    return Err(ServerError(format!(
                        "{} did not stop within 30s of SIGTERM; killed it",
                        self.what
                    )));
                }
                sleep(Duration::from_millis(20));
            }
        }
        wait_for_port(self.port, false, Duration::from_secs(30), self.what)
    }

    /// Kills the process if this value started it and it was not killed yet.
    pub(crate) fn kill_if_running(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill9()?;
        }
        Ok(())
    }

    /// Leaves the process running when this value is dropped; returns its port and pid.
    pub(crate) fn detach(&mut self) -> (u16, Option<u32>) {
        self.detached = true;
        (self.port, self.pid())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
