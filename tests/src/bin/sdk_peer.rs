//! A Rust SDK client driven by another process, one JSON line at a time: the peer of
//! the socket.io test suite (`tests/socketio/`), which checks that messages cross
//! between socket.io clients and the SDK in both directions.
//!
//! `sdk_peer SERVER_URL TOKEN STORE_FILE`
//!
//! Commands on standard input, one JSON object per line:
//! - `{"join": "ROOM"}`: join a room;
//! - `{"send": {"user": "U"} | {"room": "R"}, "type": "T", "payload": {…}}`: send a
//!   message (Class C);
//! - `{"quit": true}`: shut the client down and exit.
//!
//! What the client reports, on standard output, one JSON object per line:
//! `{"state": "Realtime"}`, `{"room": "R", "joined": true}`, `{"message": {…}}` (the
//! WebSocketMessage received), `{"outbox": {"id", "state", "serverRef"}}`,
//! `{"error": "…"}`.

use std::io::{BufRead, Write};
use std::sync::Arc;

use serde_json::{Value, json};
use webwaka_realtime::client::{
    Client, ClientConfig, Next, OutgoingMessage, StaticToken, Target, Update,
};

/// Writes one line of output (and flushes it: the reader waits for it).
fn say(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(server), Some(token), Some(store)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: sdk_peer SERVER_URL TOKEN STORE_FILE");
        std::process::exit(2);
    };
    webwaka_realtime::client::tls::install_default_provider();
    let config = ClientConfig::new(server, store);
    let client = match Client::open(config, Arc::new(StaticToken(token.clone()))).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("sdk_peer: cannot open the client: {error}");
            std::process::exit(1);
        }
    };
    let mut updates = client.subscribe();
    say(&json!({"state": format!("{:?}", client.connection_state())}));
    tokio::spawn(async move {
        loop {
            match updates.next().await {
                Next::Update(update) => match *update {
                    Update::State(s) => say(&json!({"state": format!("{:?}", s.to)})),
                    Update::Message(m) => say(&json!({"message": m})),
                    Update::Room {
                        room_id,
                        joined,
                        error,
                    } => say(&json!({"room": room_id, "joined": joined, "error": error})),
                    Update::Outbox(o) => say(&json!({"outbox": {
                        "id": o.id,
                        "state": format!("{:?}", o.state),
                        "serverRef": o.server_ref,
                    }})),
                    _ => {}
                },
                Next::Missed(n) => say(&json!({"error": format!("missed {n} updates")})),
                Next::Closed => return,
            }
        }
    });
    // Standard input on a thread of its own (blocking reads), line by line.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let command: Value = match serde_json::from_str(&line) {
            Ok(command) => command,
            Err(error) => {
                say(&json!({"error": format!("not JSON: {error}")}));
                continue;
            }
        };
        if command.get("quit").is_some() {
            break;
        }
        if let Some(room) = command.get("join").and_then(Value::as_str) {
            if let Err(error) = client.join_room(room).await {
                say(&json!({"error": error.to_string()}));
            }
            continue;
        }
        if let Some(send) = command.get("send") {
            let target = match (
                send.get("user").and_then(Value::as_str),
                send.get("room").and_then(Value::as_str),
            ) {
                (Some(user), _) => Target::User(user.to_owned()),
                (None, Some(room)) => Target::Room(room.to_owned()),
                (None, None) => {
                    say(&json!({"error": "send needs a user or a room"}));
                    continue;
                }
            };
            let kind = command
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("chat.text");
            let payload = command.get("payload").cloned().unwrap_or(Value::Null);
            match client
                .send_message(OutgoingMessage::new(target, kind, payload))
                .await
            {
                Ok(item) => say(&json!({"queued": item.id})),
                Err(error) => say(&json!({"error": error.to_string()})),
            }
            continue;
        }
        say(&json!({"error": format!("unknown command {line}")}));
    }
    client.shutdown().await;
}
