//! The server that gets killed: `webwaka-server-stub` with the test settings, on a given
//! port and data directory, until SIGKILL (or SIGINT/SIGTERM). Used by
//! `tests/tests/server_crash.rs`.
//!
//! `server_child DATA_DIR PORT`; `DATABASE_URL` and `JWT_SECRET` from the environment
//! when set (several instances on one PostgreSQL database share both), and for the
//! chaos schedule `CHAOS=1`, `RECONCILIATION_COUNTER_TYPES`,
//! `TRANSACTION_CONFIRM_DELAY_MS`. With `RUST_LOG` set, the server's log goes to stderr
//! (the multi-instance tests keep it in `WEBWAKA_SERVER_LOG_DIR` when that is set).

use std::path::PathBuf;

use webwaka_server_stub::{Options, Server};

fn main() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(port)) = (args.get(1), args.get(2).and_then(|p| p.parse::<u16>().ok()))
    else {
        eprintln!("usage: server_child DATA_DIR PORT");
        std::process::exit(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        let mut config = webwaka_e2e::harness::test_config(&PathBuf::from(dir));
        config.port = port;
        config.database_url = std::env::var("DATABASE_URL").ok();
        config.jwt_secret = std::env::var("JWT_SECRET").ok();
        config.chaos = std::env::var("CHAOS").is_ok_and(|v| v == "1");
        if let Ok(types) = std::env::var("RECONCILIATION_COUNTER_TYPES") {
            config.reconciliation_counter_types = types;
        }
        if let Some(ms) = std::env::var("TRANSACTION_CONFIRM_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.transaction_confirm_delay_ms = ms;
        }
        let server = match Server::bind(config, Options::default()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("server_child: {e}");
                return 1;
            }
        };
        println!("listening");
        // SIGINT or SIGTERM: a graceful stop.
        server
            .run(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async {
                        match term.as_mut() {
                            Some(term) => { term.recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                }
            })
            .await;
        0
    });
    std::process::exit(code);
}
