//! `webwaka-server-stub`: starts the local server (not built yet).

fn main() {
    eprintln!("webwaka-server-stub: the server is not built yet (see the open issues)");
    std::process::exit(2);
}
