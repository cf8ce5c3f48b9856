//! Compiles `src/bpf/bench_peer.bpf.c` (the fast path benchmark's XDP echo peer and counting
//! receiver) with `clang -target bpf -O2` into OUT_DIR, by the same code as kyuu-ebpf's fast path
//! (`crates/kyuu-ebpf/bpf_clang.rs`). Without a working clang the benchmarks still build;
//! `kyuu-fastpath-bench` then says why it cannot run.

#[path = "../kyuu-ebpf/bpf_clang.rs"]
mod bpf_clang;
use bpf_clang::{compile_bpf, BpfBuildError};

const SRC: &str = "src/bpf/bench_peer.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed=../kyuu-ebpf/bpf_clang.rs");
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
    compile_bpf(SRC, "bench_peer.o").map_err(|e| match e {
        BpfBuildError::Setup(why) => why,
        BpfBuildError::Clang(first) => format!("clang failed: {first}"),
    })
}
