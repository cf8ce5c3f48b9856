//! Compiles `src/bpf/turn_router.bpf.c` (XDP fast path) and `src/bpf/relay_steer.bpf.c` (relay
//! steering, `BPF_PROG_TYPE_SK_LOOKUP`) with `clang -target bpf -O2` into OUT_DIR. Without a
//! working clang (or the libbpf headers) the workspace still builds: the `kyuu_ebpf` cfg stays
//! unset and the fast path reports itself unavailable at run time.

#[path = "bpf_clang.rs"]
mod bpf_clang;
use bpf_clang::{compile_bpf, BpfBuildError};

const SOURCES: [(&str, &str); 2] = [
    ("src/bpf/turn_router.bpf.c", "turn_router.o"),
    ("src/bpf/relay_steer.bpf.c", "relay_steer.o"),
];

fn main() {
    for (src, _) in SOURCES {
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-changed=bpf_clang.rs");
    println!("cargo:rerun-if-env-changed=KYUU_EBPF_CLANG");
    println!("cargo:rustc-check-cfg=cfg(kyuu_ebpf)");
    match build() {
        Ok(()) => println!("cargo:rustc-cfg=kyuu_ebpf"),
        Err(why) => {
            println!("cargo:warning=kyuu-ebpf: kernel fast path unavailable: {why}");
            println!("cargo:rustc-env=KYUU_EBPF_UNAVAILABLE={why}");
        }
    }
}

fn build() -> Result<(), String> {
    for (src, obj) in SOURCES {
        compile_bpf(src, obj).map_err(|e| match e {
            BpfBuildError::Setup(why) => why,
            BpfBuildError::Clang(first) => format!("clang failed on {src}: {first}"),
        })?;
    }
    Ok(())
}
