//! Child processes of the benchmark: the Redis servers and the Chorus nodes 2 and 3 of the TCP
//! cluster (this binary re-executed as `cluster-load node ...`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A free loopback port (bound, then released: another process could take it in between).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Child processes killed (by PID, through their `Child` handle) when this is dropped, also
/// when the benchmark panics.
#[derive(Debug, Default)]
pub(crate) struct Children(Vec<Child>);

impl Children {
    pub(crate) fn push(&mut self, child: Child) {
        self.0.push(child);
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// This binary, started again with `args`; its stdout lines arrive on the returned channel.
/// Its stdin stays open as long as the returned `ChildStdin` lives: the child exits when it
/// closes, so a benchmark that dies without running its destructors leaves no node behind.
pub(crate) fn spawn_self(
    args: &[String],
) -> Result<(Child, ChildStdin, mpsc::Receiver<String>), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn node process: {e}"))?;
    let stdin = child.stdin.take().ok_or("no child stdin")?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((child, stdin, rx))
}

/// Waits (without blocking the runtime) for a line starting with `prefix`.
pub(crate) async fn wait_for_line(
    rx: mpsc::Receiver<String>,
    prefix: &'static str,
    timeout: Duration,
) -> Result<(String, mpsc::Receiver<String>), String> {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok((line, rx)),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no {prefix:?} line from the node within {timeout:?}"
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "the node process exited before printing {prefix:?}"
                    ));
                }
            }
        }
    })
    .await
    .map_err(|e| format!("wait task: {e}"))?
}
