//! `webwaka-server-stub`: runs the local server (the default), mints development tokens
//! (`token`), or checks the audit chain (`verify-audit`). Settings come from flags or
//! the environment (see `.env.example` and `docs/server.md`).

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use webwaka_server_stub::auth::{Keys, SecretSource, resolve_secret};
use webwaka_server_stub::{Config, ConnectionLimits, Options, Server};

/// mimalloc, not glibc's malloc: the reconciliation engine and the request paths make
/// many small, short-lived allocations, and glibc spent a third of the engine's time
/// in its allocator (consolidating freed chunks on every larger request). Same run,
/// `bench reconcile`: 3.4 µs of CPU per operation against 9.0. See docs/server.md,
/// "Allocator". (A library does not choose the allocator: the SDK keeps the app's.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "webwaka-server-stub",
    version,
    about = "The local WebWaka Realtime server"
)]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Print a development token signed with the server's secret.
    Token {
        /// The tenant (`tenantId` claim).
        #[arg(long)]
        tenant: String,
        /// The user (`userId` and `sub` claims).
        #[arg(long)]
        user: String,
        /// Roles, comma-separated (e.g. `admin,service`).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Validity, in ms (default one day).
        #[arg(long = "ttl", default_value_t = 86_400_000)]
        ttl_ms: u64,
    },
    /// Check the audit log's hash chain in the data directory; exit 1 if broken.
    VerifyAudit,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config),
        Command::Token {
            tenant,
            user,
            roles,
            ttl_ms,
        } => token(&cli.config, &tenant, &user, &roles, ttl_ms),
        Command::VerifyAudit => verify_audit(&cli.config),
    }
}

fn token(config: &Config, tenant: &str, user: &str, roles: &[String], ttl_ms: u64) -> ExitCode {
    if tenant.trim().is_empty() || user.trim().is_empty() {
        eprintln!("error: --tenant and --user must not be empty");
        return ExitCode::from(2);
    }
    match resolve_secret(config) {
        Ok((secret, _)) => {
            let keys = Keys::new(secret.as_bytes(), 0);
            let ttl = i64::try_from(ttl_ms / 1000).unwrap_or(i64::MAX).max(1);
            println!("{}", keys.mint(tenant, user, roles, ttl));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn verify_audit(config: &Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(webwaka_server_stub::verify_audit(config)) {
        Ok(check) => {
            println!(
                "{}",
                serde_json::json!({"valid": check.valid, "entries": check.entries})
            );
            if let Some((sequence, problem)) = check.first_bad {
                eprintln!("the chain breaks at entry {sequence}: {problem}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> ExitCode {
    webwaka_server_stub::telemetry::init(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Before the server reads the limit to derive HTTP_MAX_CONNECTIONS from it.
    let raised = webwaka_server_stub::raise_descriptor_limit();
    runtime.block_on(async move {
        let server = match Server::bind(config.clone(), Options::default()).await {
            Ok(server) => server,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        };
        print_banner(&config, &server, raised);
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// What a newcomer needs: where it listens, where the data is, how to get a token; and
/// what an operator needs: the descriptor limit, the connection caps, the timeouts.
fn print_banner(config: &Config, server: &Server, raised: Option<std::io::Result<(u64, u64)>>) {
    // Writes that fail (a closed stdout) must not stop the server.
    let mut out = std::io::stdout().lock();
    let addr = server.local_addr();
    let data_dir =
        std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    let _ = writeln!(out, "WebWaka Realtime server {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        out,
        "  listening   http://{addr}  (WebSocket ws://{addr}{})",
        config.ws_path
    );
    if let Some(path) = config.socketio_path() {
        let options = if path == webwaka_server_stub::config::defaults::SOCKETIO_PATH {
            String::new()
        } else {
            format!(", {{ path: \"{path}\" }}")
        };
        let _ = writeln!(
            out,
            "  socket.io   http://{addr}{path}  (socket.io v4 clients: io(\"http://{addr}\"{options}))"
        );
    }
    match &config.database_url {
        None => {
            let _ = writeln!(out, "  data        {} (SQLite)", data_dir.display());
        }
        Some(url) => {
            let _ = writeln!(
                out,
                "  database    {} (PostgreSQL; instance {})",
                redact(url),
                server.instance()
            );
        }
    }
    let _ = writeln!(
        out,
        "  health      http://{addr}/health    metrics http://{addr}/metrics"
    );
    let _ = writeln!(
        out,
        "  connections {}",
        connections_line(&server.connection_limits(), raised)
    );
    let _ = writeln!(
        out,
        "  timeouts    request headers {} ms (HTTP_HEADER_TIMEOUT), idle keep-alive {} ms (HTTP_IDLE_TIMEOUT), a stalled body {} ms (HTTP_BODY_TIMEOUT)",
        config.http_header_timeout_ms, config.http_idle_timeout_ms, config.http_body_timeout_ms
    );
    match server.secret_source() {
        SecretSource::Configured => {
            let _ = writeln!(out, "  JWT secret  from JWT_SECRET");
        }
        SecretSource::DevFile | SecretSource::DevGenerated => {
            let path = config.dev_secret_path();
            let secret = std::fs::read_to_string(&path).unwrap_or_default();
            let how = if server.secret_source() == SecretSource::DevGenerated {
                "generated now"
            } else {
                "kept from an earlier run"
            };
            let _ = writeln!(
                out,
                "  JWT secret  dev mode, {how}: {} (in {})",
                secret.trim(),
                path.display()
            );
            let demo = server.keys().mint("demo", "alice", &[], 86_400);
            let _ = writeln!(out, "  demo token  (tenant demo, user alice, 24 h):");
            let _ = writeln!(out, "              {demo}");
            // The token rides in the fragment: never sent to the server, never logged.
            let admin = server
                .keys()
                .mint("demo", "dashboard", &["admin".to_owned()], 86_400);
            let _ = writeln!(
                out,
                "  dashboard   (tenant demo, role admin, 24 h; open it, it logs in):"
            );
            let _ = writeln!(out, "              http://{addr}/dashboard#token={admin}");
        }
    }
    if server.secret_source() == SecretSource::Configured {
        let _ = writeln!(
            out,
            "  dashboard   http://{addr}/dashboard  (log in with an admin token)"
        );
    }
    let _ = writeln!(
        out,
        "  more tokens cargo run --release -p webwaka-server-stub -- token --tenant T --user U --roles admin,service"
    );
    if config.chaos {
        let _ = writeln!(
            out,
            "  chaos       ON (development only): http://{addr}/api/admin/chaos, role admin"
        );
    }
    let _ = writeln!(
        out,
        "  stop        Ctrl-C (closes WebSockets with 1001, flushes storage)"
    );
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// `descriptors 20000 · HTTP_MAX_CONNECTIONS 4984 (a quarter of the descriptors) ·
/// WS_MAX_CONNECTIONS 50000`,
/// with how the descriptor limit was raised and whether the caps exceed it.
fn connections_line(
    limits: &ConnectionLimits,
    raised: Option<std::io::Result<(u64, u64)>>,
) -> String {
    let descriptors = match (limits.descriptor_limit, raised) {
        (None, _) => "descriptors unlimited by the platform".to_owned(),
        (Some(limit), Some(Ok((before, _)))) if before < limit => {
            format!("descriptors {limit} (raised from {before})")
        }
        (Some(limit), Some(Err(error))) => format!("descriptors {limit} (not raised: {error})"),
        (Some(limit), _) => format!("descriptors {limit}"),
    };
    let how = if limits.http_max_derived {
        " (a quarter of the descriptors)"
    } else {
        ""
    };
    let mut line = format!(
        "{descriptors} · HTTP_MAX_CONNECTIONS {}{how} · WS_MAX_CONNECTIONS {}",
        limits.http_max_connections, limits.ws_max_connections
    );
    if limits.exceed_descriptors() {
        line.push_str(
            "\n              (the caps together exceed the descriptors: past them, new \
             connections wait until others close)",
        );
    }
    line
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
