//! The server that gets killed: `webwaka-server-stub` with the test settings, on a given
//! port and data directory, until SIGKILL (or SIGINT/SIGTERM). Used by
//! `tests/tests/server_crash.rs`.
//!
//! `server_child DATA_DIR PORT`

use std::path::PathBuf;

use webwaka_server_stub::{Options, Server};

fn main() {
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
        let server = match Server::bind(config, Options::default()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("server_child: {e}");
                return 1;
            }
        };
        println!("listening");
        server
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
        0
    });
    std::process::exit(code);
}
