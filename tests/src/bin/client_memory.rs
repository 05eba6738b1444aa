//! The client memory probe, alone in its process (only the client's code is linked):
//! prints `idle_kib=`, `idle_anon_kib=`, `queued_kib=` and `queued_anon_kib=`. Run by the
//! `client` benchmark group (`tests/src/bench/client.rs`).

fn main() {
    if let Err(e) = webwaka_e2e::bench::client::memory_child() {
        eprintln!("client_memory: {e}");
        std::process::exit(1);
    }
}
