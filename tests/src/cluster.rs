//! Several server instances on one PostgreSQL database, behind a load balancer, for the
//! multi-instance tests and benchmarks.
//!
//! - [`Instances`]: in-process instances (each a `RunningServer` with its own port and
//!   data directory) that share a fresh database and one JWT secret.
//! - [`Children`]: the same as child processes (`server_child`), so that a test can
//!   SIGKILL one.
//! - [`PgCluster`]: a private PostgreSQL cluster (`scripts/pg-cluster.sh`), for the tests
//!   that stop and restart the database itself; stopped when dropped.
//!
//! The shared cluster of a test run is named by `WEBWAKA_TEST_PG_URL`
//! (`scripts/test-all.sh` starts it); a multi-instance test without it fails, saying so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::TcpListener;
use webwaka_server_stub::{Config, Keys, Options, RunningServer, Server};

use crate::harness::{ChildGuard, test_config};
use crate::proxy::{Balance, Proxy};

/// The secret every instance of a test cluster shares.
pub const SECRET: &str = "cluster-test-secret-0123456789abcdef";

/// A fresh database on the run's shared cluster.
pub async fn fresh_database() -> String {
    let admin = webwaka_server_stub::testing::admin_url();
    webwaka_server_stub::testing::fresh_database(&admin)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Keys that mint tokens every instance accepts.
pub fn keys() -> Keys {
    Keys::new(SECRET.as_bytes(), 30)
}

/// A token for `user` of `tenant` with `roles`, valid for a day.
pub fn token(tenant: &str, user: &str, roles: &[&str]) -> String {
    let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
    keys().mint(tenant, user, &roles, 86_400)
}

/// In-process instances sharing one database.
pub struct Instances {
    /// The database they share.
    pub database_url: String,
    /// The instances.
    pub servers: Vec<RunningServer>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Instances {
    /// Starts `n` instances on a fresh database, with [`test_config`] changed by
    /// `configure`.
    pub async fn start(n: usize, configure: impl Fn(&mut Config)) -> Self {
        Self::start_on(fresh_database().await, n, configure).await
    }

    /// Starts `n` instances on the database at `database_url`.
    pub async fn start_on(database_url: String, n: usize, configure: impl Fn(&mut Config)) -> Self {
        webwaka_realtime::client::tls::install_default_provider();
        let mut servers = Vec::with_capacity(n);
        let mut dirs = Vec::with_capacity(n);
        for _ in 0..n {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut config = test_config(dir.path());
            config.jwt_secret = Some(SECRET.to_owned());
            config.database_url = Some(database_url.clone());
            configure(&mut config);
            let listener = TcpListener::bind(("127.0.0.1", 0))
                .await
                .expect("bind a loopback port");
            let server = Server::with_listener(config, Options::default(), listener)
                .await
                .expect("an instance starts")
                .spawn();
            servers.push(server);
            dirs.push(dir);
        }
        Self {
            database_url,
            servers,
            _dirs: dirs,
        }
    }

    /// `http://addr` of instance `i`.
    pub fn url(&self, i: usize) -> String {
        self.servers[i].http_url()
    }

    /// Every instance's address.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(RunningServer::local_addr).collect()
    }

    /// A load balancer in front of every instance.
    pub async fn balancer(&self, balance: Balance) -> Proxy {
        Proxy::balance(self.addrs(), balance)
            .await
            .expect("a load balancer starts")
    }

    /// Stops every instance gracefully.
    pub async fn stop(self) {
        for server in self.servers {
            server.shutdown().await;
        }
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Instances as child processes (`server_child`) sharing one database: a test can
/// SIGKILL and restart each.
pub struct Children {
    /// The database they share.
    pub database_url: String,
    /// Each instance's port.
    pub ports: Vec<u16>,
    children: Vec<ChildGuard>,
    dirs: Vec<tempfile::TempDir>,
    binary: PathBuf,
    env: Vec<(String, String)>,
}

impl Children {
    /// Starts `n` instances of `binary` (the test's `CARGO_BIN_EXE_server_child`).
    pub fn start(binary: &Path, database_url: &str, n: usize) -> Self {
        Self::start_with(binary, database_url, n, &[])
    }

    /// [`Children::start`] with more environment for each child (`CHAOS`, …).
    pub fn start_with(binary: &Path, database_url: &str, n: usize, env: &[(&str, &str)]) -> Self {
        let mut this = Self {
            database_url: database_url.to_owned(),
            ports: Vec::new(),
            children: Vec::new(),
            dirs: Vec::new(),
            binary: binary.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        for _ in 0..n {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let child = spawn_child(&this.binary, dir.path(), port, database_url, &this.env);
            this.children.push(child);
            this.ports.push(port);
            this.dirs.push(dir);
        }
        this
    }

    /// Every instance's address.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect()
    }

    /// `http://127.0.0.1:port` of instance `i`.
    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// Kills instance `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops instance `i` gracefully (SIGTERM), waiting at most 15 s.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while std::time::Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True when instance `i` is running (not killed or stopped).
    pub fn is_up(&self, i: usize) -> bool {
        self.children[i].0.is_some()
    }

    /// Starts instance `i` again (same port, same data directory).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let child = spawn_child(
            &self.binary,
            self.dirs[i].path(),
            self.ports[i],
            &self.database_url,
            &self.env,
        );
        self.children[i] = child;
    }
}

/// Where instance `port`'s log goes: appended to `WEBWAKA_SERVER_LOG_DIR/server-PORT.log`
/// when that is set (with `RUST_LOG`, to debug a failed multi-instance run), else nowhere.
fn server_log(port: u16) -> Stdio {
    let Some(dir) = std::env::var_os("WEBWAKA_SERVER_LOG_DIR") else {
        return Stdio::null();
    };
    let path = Path::new(&dir).join(format!("server-{port}.log"));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(file) => Stdio::from(file),
        Err(_) => Stdio::null(),
    }
}

/// Starts one `server_child` and waits (at most 20 s) until it listens.
fn spawn_child(
    binary: &Path,
    dir: &Path,
    port: u16,
    database_url: &str,
    env: &[(String, String)],
) -> ChildGuard {
    let mut child = Command::new(binary)
        .args([dir.to_str().unwrap_or_default(), &port.to_string()])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("DATABASE_URL", database_url)
        .env("JWT_SECRET", SECRET)
        .stdout(Stdio::piped())
        .stderr(server_log(port))
        .spawn()
        .expect("server_child starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let _ = rx.recv_timeout(Duration::from_secs(20));
    ChildGuard(Some(child))
}

/// A private PostgreSQL cluster (for tests that stop and restart the database).
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// The admin URL.
    pub url: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-cluster.sh")
}

impl PgCluster {
    /// Starts one (initdb in a temporary directory; installs PostgreSQL when missing).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("webwaka-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let out = Command::new(script())
            .args(["start", dir.path().to_str().unwrap_or_default()])
            .output()
            .expect("scripts/pg-cluster.sh runs");
        assert!(
            out.status.success(),
            "a private PostgreSQL cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Self { dir, url }
    }

    /// Stops it: `fast` (a clean stop) or `immediate` (as a crash).
    pub fn stop(&self, mode: &str) {
        let status = Command::new(script())
            .args(["stop", self.dir.path().to_str().unwrap_or_default(), mode])
            .status()
            .expect("scripts/pg-cluster.sh runs");
        assert!(status.success(), "stopping PostgreSQL failed");
    }

    /// The postmaster's process id (its first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        pid.lines().next()?.trim().parse().ok()
    }

    /// Starts it again after [`PgCluster::stop`].
    pub fn restart(&self) {
        let status = Command::new(script())
            .args(["restart", self.dir.path().to_str().unwrap_or_default()])
            .status()
            .expect("scripts/pg-cluster.sh runs");
        assert!(status.success(), "restarting PostgreSQL failed");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args([
                "stop",
                self.dir.path().to_str().unwrap_or_default(),
                "immediate",
            ])
            .status();
    }
}
