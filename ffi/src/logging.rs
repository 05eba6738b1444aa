//! The SDK's `tracing` output, handed to the app: a foreign [`Logger`] and a level.
//!
//! ```text
//!   tracing event ──▶ ForeignLayer (level, target filter, redaction)
//!                        ──bounded queue──▶ logger thread ──▶ app's Logger.log()
//! ```
//!
//! - Nothing is installed until the app calls [`set_logger`]; then one global
//!   `tracing` subscriber is installed for the process (if the host already installed
//!   one, e.g. a Rust app, `set_logger` says so and changes nothing).
//! - The app's logger is only ever called from the SDK's logger thread, never while a
//!   lock is held and never on the thread that logged: a slow logger cannot stall the
//!   client; records that do not fit in the queue are dropped and counted (the next
//!   record that fits is preceded by a warning with the count).
//! - Only the SDK's own targets (`webwaka_*`) are forwarded unless the app asks for
//!   its dependencies' too (HTTP, WebSocket: verbose at debug and trace).
//! - Fields whose name suggests a secret or content (`token`, `payload`, `body`,
//!   `authorization`, `secret`, `password`) are written as `<redacted>`; the SDK does
//!   not log tokens or payloads in the first place.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::error::{CallbackError, RealtimeError};

/// Records queued for the logger, at most; more are dropped and counted.
const LOG_QUEUE: usize = 1024;

/// How much the SDK logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, uniffi::Enum)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Failures the SDK could not handle.
    Error,
    /// Failures it handled (a refused frame, a lost connection).
    Warn,
    /// Connection state changes, start and shutdown.
    Info,
    /// Retries and protocol details.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => LogLevel::Error,
            2 => LogLevel::Warn,
            3 => LogLevel::Info,
            4 => LogLevel::Debug,
            5 => LogLevel::Trace,
            _ => LogLevel::Off,
        }
    }

    fn of(level: &tracing::Level) -> Self {
        match *level {
            tracing::Level::ERROR => LogLevel::Error,
            tracing::Level::WARN => LogLevel::Warn,
            tracing::Level::INFO => LogLevel::Info,
            tracing::Level::DEBUG => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct LogRecord {
    /// Its level.
    pub level: LogLevel,
    /// Where it comes from, e.g. `webwaka_realtime::client::supervisor`.
    pub target: String,
    /// The message, then its fields as `name=value`.
    pub message: String,
    /// When (ms since the epoch).
    pub timestamp_ms: i64,
}

/// Receives the SDK's log records. Implemented by the app (e.g. with `android.util.Log`
/// or `os_log`); called on the SDK's logger thread, one record at a time.
#[uniffi::export(foreign)]
pub trait Logger: Send + Sync {
    /// One record.
    fn log(&self, record: LogRecord) -> Result<(), CallbackError>;
}

/// The level now (a `LogLevel` as u8; `Off` until set).
static LEVEL: AtomicU8 = AtomicU8::new(0);
/// Forward dependencies' records too.
static DEPENDENCIES: AtomicBool = AtomicBool::new(false);
/// Records dropped because the queue was full, not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The queue to the current logger's thread (none: no logger).
static SINK: Mutex<Option<std::sync::mpsc::SyncSender<LogRecord>>> = Mutex::new(None);
/// Whether the global subscriber is ours (set once).
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Sends the SDK's log records at `level` and above to `logger` (none: stop logging).
/// `include_dependencies` also forwards the HTTP and WebSocket libraries' records.
/// Replaces any earlier logger.
#[uniffi::export]
pub fn set_logger(
    logger: Option<Arc<dyn Logger>>,
    level: LogLevel,
    include_dependencies: bool,
) -> Result<(), RealtimeError> {
    install()?;
    DEPENDENCIES.store(include_dependencies, Ordering::Release);
    let sink = match logger {
        None => None,
        Some(logger) => Some(start_logger_thread(logger)?),
    };
    let level = if sink.is_some() { level } else { LogLevel::Off };
    // Swap under the lock, drop the old queue after it: its thread drains and ends.
    let old = match SINK.lock() {
        Ok(mut guard) => std::mem::replace(&mut *guard, sink),
        Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), sink),
    };
    drop(old);
    LEVEL.store(level as u8, Ordering::Release);
    Ok(())
}

/// Changes the level of the current logger.
#[uniffi::export]
pub fn set_log_level(level: LogLevel) {
    LEVEL.store(level as u8, Ordering::Release);
}

/// Installs the global subscriber with our layer, once per process.
fn install() -> Result<(), RealtimeError> {
    let installed = INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(ForeignLayer);
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|_| "the host process installed its own tracing subscriber".to_owned())
    });
    installed
        .clone()
        .map_err(|reason| RealtimeError::InvalidState { reason })
}

fn start_logger_thread(
    logger: Arc<dyn Logger>,
) -> Result<std::sync::mpsc::SyncSender<LogRecord>, RealtimeError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<LogRecord>(LOG_QUEUE);
    std::thread::Builder::new()
        .name("webwaka-logger".into())
        .spawn(move || {
            // Ends when the sender is replaced or dropped. A failing logger is ignored:
            // logging about it would only feed it again.
            while let Ok(record) = rx.recv() {
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.log(record)));
            }
        })
        .map_err(|e| RealtimeError::internal(format!("cannot start the logger thread: {e}")))?;
    Ok(tx)
}

/// True when records of `metadata` are wanted now.
fn wanted(metadata: &Metadata<'_>) -> bool {
    let level = LogLevel::from_u8(LEVEL.load(Ordering::Acquire));
    if level == LogLevel::Off || LogLevel::of(metadata.level()) > level {
        return false;
    }
    metadata.target().starts_with("webwaka") || DEPENDENCIES.load(Ordering::Acquire)
}

/// Queues a record for the logger thread, or counts it as dropped.
fn enqueue(record: LogRecord) {
    let sender = match SINK.lock() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let Some(sender) = sender else { return };
    let dropped = DROPPED.swap(0, Ordering::AcqRel);
    if dropped > 0 {
        let notice = LogRecord {
            level: LogLevel::Warn,
            target: "webwaka_realtime_ffi::logging".into(),
            message: format!("{dropped} log records were dropped (the logger was too slow)"),
            timestamp_ms: record.timestamp_ms,
        };
        if sender.try_send(notice).is_err() {
            DROPPED.fetch_add(dropped + 1, Ordering::AcqRel);
            return;
        }
    }
    if sender.try_send(record).is_err() {
        DROPPED.fetch_add(1, Ordering::AcqRel);
    }
}

/// The layer that turns `tracing` events into [`LogRecord`]s.
struct ForeignLayer;

impl<S: tracing::Subscriber> Layer<S> for ForeignLayer {
    fn register_callsite(&self, _metadata: &'static Metadata<'static>) -> Interest {
        // The level can change at any time: ask `enabled` every time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        wanted(metadata)
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        if !wanted(metadata) {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        enqueue(LogRecord {
            level: LogLevel::of(metadata.level()),
            target: metadata.target().to_owned(),
            message: text.finish(),
            timestamp_ms: now_ms(),
        });
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Field names whose values are never forwarded.
fn redacted(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "token",
        "payload",
        "body",
        "authorization",
        "secret",
        "password",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// Collects an event's message and fields.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Text {
    fn finish(self) -> String {
        if self.fields.is_empty() {
            self.message
        } else if self.message.is_empty() {
            self.fields.trim_start().to_owned()
        } else {
            format!("{}{}", self.message, self.fields)
        }
    }
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if redacted(field.name()) {
            let _ = write!(self.fields, " {}=<redacted>", field.name());
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else if redacted(field.name()) {
            let _ = write!(self.fields, " {}=<redacted>", field.name());
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_content_are_redacted_by_field_name() {
        for name in ["token", "access_token", "payload", "body", "Authorization"] {
            assert!(redacted(name), "{name}");
        }
        for name in ["error", "reason", "from", "client_id"] {
            assert!(!redacted(name), "{name}");
        }
    }

    #[test]
    fn levels_order_from_off_to_trace() {
        assert!(LogLevel::Off < LogLevel::Error && LogLevel::Debug < LogLevel::Trace);
        for l in [
            LogLevel::Off,
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ] {
            assert_eq!(LogLevel::from_u8(l as u8), l);
        }
    }
}
