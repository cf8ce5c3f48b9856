//! The `clang -target bpf` invocation shared by the build scripts of kyuu-ebpf (the fast path
//! and relay steering programs) and kyuu-bench (its XDP bench ends), which includes this file
//! with `#[path]`. Each build script names this file in `cargo:rerun-if-changed`.

use std::path::PathBuf;
use std::process::Command;

/// Why a BPF object was not built.
pub enum BpfBuildError {
    /// No OUT_DIR, or clang could not be run: the reason, ready to print.
    Setup(String),
    /// clang ran and refused the source: the first line of its diagnostics.
    Clang(String),
}

/// Compiles the BPF C source `src` (relative to the crate) with `clang -target bpf -O2` (or
/// `$KYUU_EBPF_CLANG`) into `$OUT_DIR/obj`.
pub fn compile_bpf(src: &str, obj: &str) -> Result<(), BpfBuildError> {
    let out = std::env::var_os("OUT_DIR")
        .ok_or_else(|| BpfBuildError::Setup("OUT_DIR not set".into()))?;
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
        .map_err(|e| BpfBuildError::Setup(format!("built without clang ({clang}: {e})")))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let first = err.lines().next().unwrap_or("").to_string();
        return Err(BpfBuildError::Clang(first));
    }
    Ok(())
}
