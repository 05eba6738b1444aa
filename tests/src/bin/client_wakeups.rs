//! The client wake-up probe, alone in its process (only the client's code is linked):
//! `client_wakeups connected|suspended|background URL TOKEN` opens one client, prints `ready` once
//! it is in that state, then idles until killed. Run by the `wakeups` benchmark group
//! (`tests/src/bench/wakeups.rs`), which counts its threads' context switches.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, url, token] = args.as_slice() else {
        eprintln!("usage: client_wakeups connected|suspended|background URL TOKEN");
        std::process::exit(2);
    };
    if let Err(e) = webwaka_e2e::bench::wakeups::child(mode, url, token) {
        eprintln!("client_wakeups: {e}");
        std::process::exit(1);
    }
}
