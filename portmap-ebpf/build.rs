use which::which;

/// Builds with `bpf-linker`; tells cargo to rerun when it changes (as aya-template does), and
/// fails early with a message naming the fix when it is missing.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => panic!("bpf-linker not found ({err}): run `cargo xtask setup`"),
    }
}
