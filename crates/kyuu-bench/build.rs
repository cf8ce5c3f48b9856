//! Compiles `src/bpf/bench_peer.bpf.c` (the fast path benchmark's XDP echo peer and counting
//! receiver) with `clang -target bpf -O2` into OUT_DIR, as kyuu-ebpf does for the fast path.
//! Without a working clang the benchmarks still build; `kyuu-fastpath-bench` then says why it
//! cannot run.

use std::path::PathBuf;
use std::process::Command;

const SRC: &str = "src/bpf/bench_peer.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-env-changed=KYUU_EBPF_CLANG");
    println!("cargo:rustc-check-cfg=cfg(kyuu_bench_bpf)");
    match build() {
        Ok(()) => println!("cargo:rustc-cfg=kyuu_bench_bpf"),
        Err(why) => {
            println!("cargo:warning=kyuu-bench: XDP bench ends unavailable: {why}");
            println!("cargo:rustc-env=KYUU_BENCH_BPF_UNAVAILABLE={why}");
        }
    }
}

fn build() -> Result<(), String> {
    let out = std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?;
    let obj = PathBuf::from(out).join("bench_peer.o");
    let clang = std::env::var("KYUU_EBPF_CLANG").unwrap_or_else(|_| "clang".into());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let output = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", SRC, "-o"])
        .arg(&obj)
        .output()
        .map_err(|e| format!("built without clang ({clang}: {e})"))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let first = err.lines().next().unwrap_or("").to_string();
        return Err(format!("clang failed: {first}"));
    }
    Ok(())
}
