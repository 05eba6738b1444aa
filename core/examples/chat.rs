//! A terminal chat against the local server that keeps working, with its connection
//! state on screen, when the server is stopped and started again.
//!
//! ```sh
//! cargo run --release -p webwaka-server-stub &
//! TOKEN=$(cargo run -q -p webwaka-server-stub -- token --tenant demo --user alice)
//! cargo run -p webwaka-realtime --example chat -- --token "$TOKEN" --room general
//! ```
//!
//! Type a line to send it to the room; `/dm USER TEXT` for a direct message; `/quit`.
//! Stop the server: lines you type are queued (state `Offline`); start it again: they
//! are delivered, in order, once.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use webwaka_realtime::client::{
    Client, ClientConfig, Next, OutgoingMessage, StaticToken, Target, Update,
};
use webwaka_realtime::store::ItemState;

struct Args {
    server: String,
    token: String,
    room: String,
    store: PathBuf,
}

fn args() -> Result<Args, String> {
    let mut server = "http://127.0.0.1:3000".to_owned();
    let mut token = std::env::var("WEBWAKA_TOKEN").unwrap_or_default();
    let mut room = "general".to_owned();
    let mut store = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => server = value()?,
            "--token" => token = value()?,
            "--room" => room = value()?,
            "--store" => store = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                return Err(
                    "usage: chat --token JWT [--server URL] [--room ROOM] [--store FILE]".into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if token.is_empty() {
        return Err(
            "a token is needed: --token JWT (or WEBWAKA_TOKEN); mint one with \
                    `cargo run -p webwaka-server-stub -- token --tenant demo --user alice`"
                .into(),
        );
    }
    let user = webwaka_realtime::client::Claims::read(&token)
        .map(|c| c.user_id)
        .map_err(|e| format!("bad token: {e}"))?;
    let store = store.unwrap_or_else(|| PathBuf::from(format!("chat-{user}.db")));
    Ok(Args {
        server,
        token,
        room,
        store,
    })
}

#[tokio::main]
async fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let config = ClientConfig::new(&args.server, &args.store);
    let client = match Client::open(config, Arc::new(StaticToken(args.token.clone()))).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot open the client: {e}");
            std::process::exit(1);
        }
    };
    // Subscribed before anything else, so that no change of state is missed: the
    // header shows the state now, and every change after it gets a line.
    let mut updates = client.subscribe();
    println!(
        "store {} · server {} · room {} · state {:?}",
        args.store.display(),
        args.server,
        args.room,
        client.connection_state()
    );
    if let Err(e) = client.join_room(&args.room).await {
        eprintln!("join failed: {e}");
    }

    // Print what the client reports.
    tokio::spawn(async move {
        loop {
            match updates.next().await {
                Next::Update(u) => match *u {
                    Update::State(s) => match s.next_retry_in {
                        Some(wait) => println!(
                            "[state {:?} (was {:?}: {:?}), next try in {:.1}s]",
                            s.to,
                            s.from,
                            s.reason,
                            wait.as_secs_f32()
                        ),
                        None => println!("[state {:?} (was {:?}: {:?})]", s.to, s.from, s.reason),
                    },
                    Update::Message(m) => {
                        let text = m.payload["text"].as_str().unwrap_or_default().to_owned();
                        let place = m
                            .room_id
                            .map_or_else(|| "dm".to_owned(), |r| format!("#{r}"));
                        println!("{place} <{}> {text}", m.sender_id);
                    }
                    Update::Presence(p) => println!("* {} is {:?}", p.user_id, p.status),
                    Update::Outbox(o) if o.state == ItemState::Dead => {
                        println!("! not delivered: {}", o.error.unwrap_or_default());
                    }
                    Update::Room {
                        room_id,
                        joined: false,
                        error: Some(e),
                    } => {
                        println!("! cannot join #{room_id}: {e}");
                    }
                    Update::Discontinuity { reason } => println!("! {reason}"),
                    _ => {}
                },
                Next::Missed(n) => println!("(missed {n} updates)"),
                Next::Closed => return,
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" {
            break;
        }
        let message = if let Some(rest) = line.strip_prefix("/dm ") {
            let Some((user, text)) = rest.split_once(' ') else {
                println!("usage: /dm USER TEXT");
                continue;
            };
            OutgoingMessage::new(
                Target::User(user.into()),
                "chat.text",
                json!({ "text": text }),
            )
        } else {
            OutgoingMessage::new(
                Target::Room(args.room.clone()),
                "chat.text",
                json!({ "text": line }),
            )
        };
        match client.send_message(message).await {
            Ok(_) => {}
            Err(e) => println!("! {e}"),
        }
    }
    client.shutdown().await;
}
