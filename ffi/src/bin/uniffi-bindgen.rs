//! The bindings generator (`uniffi-bindgen`), pinned to the uniffi version of this crate.
//!
//! Run it inside the workspace (library mode reads `cargo metadata`): see
//! `scripts/gen-bindings.sh`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
