//! The WebSocket transport (PROTOCOL.md §3): connect with the token, the installation's
//! `clientId` and the cursor, then two tasks per connection: a reader that decodes
//! server frames and reports them (tagged with the connection's generation, so that
//! reports of an abandoned connection are ignored) and a writer fed by a channel.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::machine::{CloseKind, Failure};
use crate::protocol::envelope::{AUTH_EXPIRED_CLOSE_REASON, close_code};
use crate::protocol::{ErrorBody, ErrorCode, ServerEvent};

/// Why opening the WebSocket failed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ConnectError {
    /// For the state machine.
    Failed(Failure, String),
    /// The server refused the cursor (`410 CURSOR_EXPIRED`).
    CursorExpired,
}

/// What a connection reports, in order on one channel.
#[derive(Debug)]
pub(crate) enum WsEvent {
    /// The connection is open: its handle. Always the first report of a connection, so
    /// that no frame of it can be seen before it.
    Opened(WsHandle),
    /// A decoded frame and the `ref` of its envelope.
    Frame(Box<ServerEvent>, Option<String>),
    /// A frame that could not be decoded (logged, then ignored: the connection stays).
    Undecodable(String),
    /// Any frame arrived (WebSocket pings and pongs included): the socket is alive.
    Activity,
    /// The connection ended.
    Closed(CloseKind, String),
}

/// What the writer sends.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A text frame.
    Text(String),
    /// Close with 1000 and stop.
    Close,
}

/// The open connection, as the supervisor holds it.
#[derive(Debug)]
pub(crate) struct WsHandle {
    pub(crate) out: mpsc::UnboundedSender<Outgoing>,
}

impl WsHandle {
    /// Queues a text frame; false when the connection is gone.
    pub(crate) fn send(&self, text: String) -> bool {
        self.out.send(Outgoing::Text(text)).is_ok()
    }

    /// Closes the connection (normal closure).
    pub(crate) fn close(&self) {
        let _ = self.out.send(Outgoing::Close);
    }
}

/// Small buffers: a client holds one connection, but mobile memory matters.
fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Where and how to connect.
pub(crate) struct Params<'a> {
    /// `ws://` or `wss://` URL with its query.
    pub(crate) url: &'a str,
    /// The bearer token.
    pub(crate) token: &'a str,
    /// The largest frame accepted.
    pub(crate) max_frame: usize,
    /// Bound of the whole connect (TCP, TLS, upgrade).
    pub(crate) timeout: Duration,
    /// TLS for `wss://`.
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// Opens the WebSocket at `p.url` and starts its reader and writer, which report to
/// `report` as `(generation, event)`: first [`WsEvent::Opened`] with the handle, then
/// the frames.
pub(crate) async fn open(
    p: Params<'_>,
    generation: u64,
    report: mpsc::Sender<(u64, WsEvent)>,
) -> Result<(), ConnectError> {
    let mut request = p
        .url
        .into_client_request()
        .map_err(|e| ConnectError::Failed(Failure::Server, format!("bad WebSocket URL: {e}")))?;
    let bearer = format!("Bearer {}", p.token)
        .parse()
        .map_err(|_| ConnectError::Failed(Failure::Auth, "token is not a valid header".into()))?;
    request.headers_mut().insert("Authorization", bearer);
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(ws_config(p.max_frame)),
        true, // no Nagle: frames are small and latency matters
        Some(Connector::Rustls(p.tls)),
    );
    let timeout = p.timeout;
    let (stream, _response) = match tokio::time::timeout(timeout, connect).await {
        Err(_) => {
            return Err(ConnectError::Failed(
                Failure::Network,
                "WebSocket connect timed out".into(),
            ));
        }
        Ok(Err(e)) => return Err(classify(e)),
        Ok(Ok(ok)) => ok,
    };
    let (mut sink, mut source) = stream.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();

    // Writer: until the handle is dropped or asked to close.
    tokio::spawn(async move {
        while let Some(item) = out_rx.recv().await {
            match item {
                Outgoing::Text(text) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Outgoing::Close => break,
            }
        }
        let _ = sink.close().await;
    });

    // The handle goes first on the same channel as the frames.
    if report
        .send((generation, WsEvent::Opened(WsHandle { out })))
        .await
        .is_err()
    {
        return Ok(()); // the client is gone; dropping the handle closes the socket
    }

    // Reader: until the socket ends.
    tokio::spawn(async move {
        let (kind, reason) = loop {
            let Some(item) = source.next().await else {
                break (CloseKind::Lost, "connection ended".to_owned());
            };
            let msg = match item {
                Ok(m) => m,
                Err(e) => break (CloseKind::Lost, e.to_string()),
            };
            match msg {
                Message::Text(text) => {
                    let event = match ServerEvent::decode(text.as_str()) {
                        Ok((event, reference)) => WsEvent::Frame(Box::new(event), reference),
                        Err(e) => WsEvent::Undecodable(e.to_string()),
                    };
                    // A bounded channel: while the supervisor is behind (it records
                    // each durable event before the next), the reader waits, and so
                    // does the socket: a long replay waits in the network, not here.
                    if report.send((generation, event)).await.is_err() {
                        return;
                    }
                }
                Message::Close(frame) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((close_code::NORMAL, String::new()));
                    break (close_kind(code, &reason), format!("closed {code} {reason}"));
                }
                // Pings are answered by tungstenite; pongs and binary only prove life
                // (a text frame proves it too, as it is handled: one report a frame).
                _ => {
                    if report.send((generation, WsEvent::Activity)).await.is_err() {
                        return;
                    }
                }
            }
        };
        let _ = report
            .send((generation, WsEvent::Closed(kind, reason)))
            .await;
    });

    Ok(())
}

fn close_kind(code: u16, reason: &str) -> CloseKind {
    match code {
        close_code::GOING_AWAY | close_code::TRY_AGAIN_LATER => CloseKind::GoingAway,
        close_code::POLICY_VIOLATION if reason == AUTH_EXPIRED_CLOSE_REASON => {
            CloseKind::AuthExpired
        }
        _ => CloseKind::Lost,
    }
}

fn classify(e: tungstenite::Error) -> ConnectError {
    match e {
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(super::http::retry_after_header);
            let body: Option<ErrorBody> = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok());
            let code = body.as_ref().map(|b| b.code);
            if code == Some(ErrorCode::CursorExpired) || status == 410 {
                return ConnectError::CursorExpired;
            }
            let failure = match status {
                401 => Failure::Auth,
                503 => Failure::ServerFull { retry_after },
                _ => Failure::Server,
            };
            ConnectError::Failed(failure, format!("upgrade refused with {status}"))
        }
        tungstenite::Error::Io(e) => ConnectError::Failed(io_failure(&e), e.to_string()),
        other => ConnectError::Failed(Failure::Network, other.to_string()),
    }
}

/// A connection nothing took (refused, no route) is [`Failure::Unreachable`]: the machine
/// then skips the HTTP attempt to the same host and port. Not when the environment
/// names a proxy: HTTP (reqwest) goes through it while the WebSocket connects directly,
/// so a refused WebSocket says nothing about HTTP.
fn io_failure(e: &std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused | K::HostUnreachable | K::NetworkUnreachable
            if !http_may_use_a_proxy() =>
        {
            Failure::Unreachable
        }
        _ => Failure::Network,
    }
}

/// True when a proxy variable that reqwest reads is set.
fn http_may_use_a_proxy() -> bool {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A port nothing listens on refuses the connection: `Unreachable`, so no HTTP
    /// attempt follows. A port that takes the connection and then says nothing is only
    /// `Network` (a proxy that drops upgrades may still pass HTTP).
    #[tokio::test]
    async fn a_refused_connection_is_unreachable_a_dropped_one_is_not() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let err = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap_err();
        // (With a proxy in the environment HTTP may take another path: then Network.)
        let expected = if http_may_use_a_proxy() {
            Failure::Network
        } else {
            Failure::Unreachable
        };
        match classify(err) {
            ConnectError::Failed(failure, _) => assert_eq!(failure, expected),
            ConnectError::CursorExpired => panic!("not a cursor answer"),
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closer = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            drop(socket);
        });
        let err = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap_err();
        closer.await.unwrap();
        match classify(err) {
            ConnectError::Failed(failure, _) => assert_eq!(failure, Failure::Network),
            ConnectError::CursorExpired => panic!("not a cursor answer"),
        }
    }
}
