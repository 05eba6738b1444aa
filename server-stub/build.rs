//! Rebuilds the server when a PostgreSQL migration is added or changed: refinery's
//! `embed_migrations!` reads `migrations/postgres` at compile time, which Cargo does not
//! track by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
