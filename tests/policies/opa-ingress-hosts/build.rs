// OPA Wasm modules import their linear memory (`env.memory`) from the host.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=--import-memory");
}
