//! Checkpoint integrity: a manifest of every file's size and SHA-256, written into a
//! checkpoint before it is renamed into place and verified before it is read, so a
//! truncated or bit-flipped file is refused with its name instead of loading silently;
//! and a scan that refuses non-finite weights, naming the tensor.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::safetensors_file::NamedTensors;

/// The manifest file of a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Whether weights holding NaN or infinite values may be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinite {
    /// Refuse them, naming the first tensor that holds one (the default).
    #[default]
    Refuse,
    /// Load them anyway (`--allow-nonfinite`: inspecting a diverged run).
    Allow,
}

/// The size and digest of every file of a checkpoint, by file name.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, FileDigest>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileDigest {
    bytes: u64,
    sha256: String,
}

/// Writes the manifest of every file in `dir` (a checkpoint being written).
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        match name {
            Some(name) if path.is_file() && name != MANIFEST_FILE => {
                files.insert(name, digest(&path)?);
            }
            _ => {}
        }
    }
    let path = dir.join(MANIFEST_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&Manifest { files })?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Checks every file the manifest of checkpoint `dir` lists against its size and
/// digest. A checkpoint written before manifests existed has none and passes.
pub fn verify_checkpoint(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(());
    }
    let damaged = |what: String| anyhow::anyhow!("checkpoint {} is damaged: {what}", dir.display());
    let text =
        std::fs::read_to_string(&path).map_err(|e| damaged(format!("{MANIFEST_FILE}: {e}")))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| damaged(format!("{MANIFEST_FILE} is not a valid manifest ({e})")))?;
    for (name, expected) in &manifest.files {
        let file = dir.join(name);
        if !file.is_file() {
            return Err(damaged(format!("{name} is missing")));
        }
        let found = digest(&file)?;
        if found.bytes != expected.bytes {
            return Err(damaged(format!(
                "{name} has {} bytes, the manifest says {} (truncated or partly written)",
                found.bytes, expected.bytes
            )));
        }
        if found.sha256 != expected.sha256 {
            return Err(damaged(format!(
                "{name} does not match its SHA-256 in {MANIFEST_FILE} (corrupted on disk)"
            )));
        }
    }
    Ok(())
}

/// The size and SHA-256 of the file at `path`, read in chunks.
fn digest(path: &Path) -> Result<FileDigest> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileDigest { bytes, sha256 })
}

/// Refuses `tensors` if one holds a NaN or infinite value (unless `policy` allows it),
/// naming the first such tensor, the position and the value; `source` says where the
/// weights came from.
pub fn check_finite(tensors: &NamedTensors, policy: NonFinite, source: &Path) -> Result<()> {
    if policy == NonFinite::Allow {
        return Ok(());
    }
    for (name, tensor) in tensors {
        if let Some(index) = tensor.data.iter().position(|v| !v.is_finite()) {
            bail!(
                "tensor `{name}` of {} holds {} at flat index {index} (of {}): the weights are \
                 corrupt or the run diverged (eval, generate, serve, export and import load \
                 them anyway with --allow-nonfinite)",
                source.display(),
                tensor.data[index],
                tensor.data.len()
            );
        }
    }
    Ok(())
}
