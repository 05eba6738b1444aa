//! Logging with `tracing`: human-readable lines or JSON (`LOG_FORMAT`), filtered by
//! `LOG_LEVEL` (a level or a full `tracing` filter such as `info,webwaka_server_stub=debug`).
//! Logs go to stderr; stdout carries only the start-up banner and command output.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber (once per process; later calls do nothing).
pub fn init(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // Already installed (tests start many servers): keep the first.
    let _ = result;
}
