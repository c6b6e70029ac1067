//! Images without a registry: `edged image build` packs a binary and the
//! shared libraries it links (as `ldd` reports them, with the dynamic
//! loader) into a `FROM scratch` image, built by the engine through bollard.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use bollard::query_parameters::BuildImageOptionsBuilder;
use futures_util::StreamExt;

use super::RuntimeError;

/// Where the binary lands in the image (its entrypoint).
pub const APP_PATH: &str = "/app";

/// Shared libraries (absolute paths) the binary needs, loader included.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| RuntimeError::Docker(format!("ldd: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(RuntimeError::Docker(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs.into_iter().collect())
}

/// A ustar header for one regular file.
fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8], mode: u32) -> Result<(), RuntimeError> {
    if name.len() > 100 {
        return Err(RuntimeError::Docker(format!(
            "path too long for the image tar: {name}"
        )));
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let oct = |h: &mut [u8], at: usize, len: usize, v: u64| {
        let s = format!("{v:0w$o}", w = len - 1);
        h[at..at + len - 1].copy_from_slice(s.as_bytes());
    };
    oct(&mut h, 100, 8, u64::from(mode));
    oct(&mut h, 108, 8, 0);
    oct(&mut h, 116, 8, 0);
    oct(&mut h, 124, 12, data.len() as u64);
    oct(&mut h, 136, 12, 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.write_all(&h)
        .map_err(|e| RuntimeError::Docker(e.to_string()))?;
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    Ok(())
}

/// The build context: a Dockerfile and a `rootfs/` with the binary and its libraries.
pub fn build_context(binary: &Path) -> Result<Vec<u8>, RuntimeError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| RuntimeError::Docker(format!("{}: {e}", p.display())))
    };
    let mut tar = Vec::new();
    let dockerfile = format!(
        "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"{APP_PATH}\"]\nLABEL org.opencontainers.image.source=\"edgeshift\"\n"
    );
    tar_entry(&mut tar, "Dockerfile", dockerfile.as_bytes(), 0o644)?;
    tar_entry(
        &mut tar,
        &format!("rootfs{APP_PATH}"),
        &read(binary)?,
        0o755,
    )?;
    for lib in shared_libraries(binary)? {
        let real = std::fs::canonicalize(&lib)
            .map_err(|e| RuntimeError::Docker(format!("{}: {e}", lib.display())))?;
        tar_entry(
            &mut tar,
            &format!("rootfs{}", lib.display()),
            &read(&real)?,
            0o755,
        )?;
    }
    tar.extend_from_slice(&[0u8; 1024]);
    Ok(tar)
}

/// Builds image `tag` holding `binary` as its entrypoint.
pub async fn build(
    docker: &bollard::Docker,
    binary: &Path,
    tag: &str,
) -> Result<String, RuntimeError> {
    let tar = build_context(binary)?;
    let opts = BuildImageOptionsBuilder::default()
        .t(tag)
        .dockerfile("Dockerfile")
        .rm(true)
        .build();
    let mut stream = docker.build_image(opts, None, Some(bollard::body_full(tar.into())));
    let mut id = None;
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| RuntimeError::Docker(format!("build {tag}: {e}")))?;
        if let Some(aux) = info.aux {
            id = aux.id;
        }
    }
    Ok(id.unwrap_or_else(|| tag.to_string()))
}
