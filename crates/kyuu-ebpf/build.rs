//! Compiles `src/bpf/turn_router.bpf.c` (XDP fast path) and `src/bpf/relay_steer.bpf.c` (relay
//! steering, `BPF_PROG_TYPE_SK_LOOKUP`) with `clang -target bpf -O2` into OUT_DIR. Without a
//! working clang (or the libbpf headers) the workspace still builds: the `kyuu_ebpf` cfg stays
//! unset and the fast path reports itself unavailable at run time.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [(&str, &str); 2] = [
    ("src/bpf/turn_router.bpf.c", "turn_router.o"),
    ("src/bpf/relay_steer.bpf.c", "relay_steer.o"),
];

fn main() {
    for (src, _) in SOURCES {
        println!("cargo:rerun-if-changed={src}");
    }
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
        compile(src, obj)?;
    }
    Ok(())
}

fn compile(src: &str, obj: &str) -> Result<(), String> {
    let out = std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?;
    let obj = PathBuf::from(out).join(obj);
    let clang = std::env::var("KYUU_EBPF_CLANG").unwrap_or_else(|_| "clang".into());
    // <asm/types.h> lives under the multiarch include directory on Debian.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let output = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&obj)
        .output()
        .map_err(|e| format!("built without clang ({clang}: {e})"))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let first = err.lines().next().unwrap_or("").to_string();
        return Err(format!("clang failed on {src}: {first}"));
    }
    Ok(())
}
