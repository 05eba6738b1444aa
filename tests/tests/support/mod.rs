//! Helpers shared by the tests that run `store_crash_child` processes: a guard that
//! kills its child when dropped (a failing test leaves no process behind), a reader
//! that keeps the child's complete stdout lines, and what the child's lines mean.

#![allow(dead_code, unreachable_pub)] // each test file uses part of this

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The child binary, built by cargo for this package's tests.
pub const CHILD: &str = env!("CARGO_BIN_EXE_store_crash_child");

/// A running child: killed and reaped on drop, whatever happened.
pub struct ChildGuard {
    child: Child,
    stdout: Option<JoinHandle<Vec<String>>>,
    stderr: Option<JoinHandle<String>>,
}

impl ChildGuard {
    /// Starts `store_crash_child` with `args`, reading its stdout and stderr.
    pub fn spawn(args: &[&str]) -> ChildGuard {
        let mut child = Command::new(CHILD)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        ChildGuard {
            child,
            stdout: Some(thread::spawn(move || complete_lines(stdout))),
            stderr: Some(thread::spawn(move || {
                let mut text = String::new();
                let _ = BufReader::new(stderr).read_to_string(&mut text);
                text
            })),
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to exit, at most `limit`; kills it after that.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        None
    }

    /// The complete lines the child printed, and its stderr (once it has exited).
    pub fn output(&mut self) -> (Vec<String>, String) {
        let lines = self
            .stdout
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (lines, err)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads until EOF, keeping only lines that end with a newline: a line cut by a kill
/// is not a promise.
fn complete_lines(stream: impl Read) -> Vec<String> {
    let mut reader = BufReader::new(stream);
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) if buf.ends_with(b"\n") => {
                lines.push(String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned());
            }
            Ok(_) => break, // torn last line
        }
    }
    lines
}

/// What a child's lines promise.
#[derive(Debug, Default)]
pub struct Promises {
    /// Enqueued: id → (thread, seq), and each thread's ids in the order printed.
    pub enqueued: HashMap<String, (String, i64)>,
    pub by_thread: HashMap<String, Vec<String>>,
    /// Marked in flight / accepted.
    pub in_flight: Vec<String>,
    pub accepted: Vec<String>,
    pub ready: bool,
    pub done: bool,
}

impl Promises {
    /// Adds what `lines` say.
    pub fn read(&mut self, lines: &[String]) {
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts[..] {
                ["READY"] => self.ready = true,
                ["DONE"] => self.done = true,
                ["E", thread, seq, id] => {
                    let seq: i64 = seq.parse().unwrap();
                    let old = self
                        .enqueued
                        .insert(id.to_owned(), (thread.to_owned(), seq));
                    assert!(old.is_none(), "id {id} printed twice");
                    self.by_thread
                        .entry(thread.to_owned())
                        .or_default()
                        .push(id.to_owned());
                }
                ["F", id] => self.in_flight.push(id.to_owned()),
                ["A", id] => self.accepted.push(id.to_owned()),
                _ => panic!("unexpected line from the child: {line:?}"),
            }
        }
    }
}

/// A store path in a fresh temporary directory (on the real disk: /tmp here is not
/// tmpfs, and it would not matter for a process crash anyway).
pub fn temp_store() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    (dir, path)
}

/// The seed: `WEBWAKA_CRASH_SEED` when set, else from the clock; printed either way.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("WEBWAKA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{test}: seed {seed} (replay with WEBWAKA_CRASH_SEED={seed})");
    seed
}

/// The store file's path as the child wants it.
pub fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}
