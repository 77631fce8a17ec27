//! The text corpus: one file per work, split into training and validation by work name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A named text.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    /// File stem, e.g. `hamlet`.
    pub name: String,
    /// Full text.
    pub text: String,
}

/// Training and validation works.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Works to train on.
    pub train: Vec<Work>,
    /// Held-out works.
    pub validation: Vec<Work>,
}

/// Reads every `*.txt` in `dir` (sorted by name); works named in `validation` are held out.
/// Fails if the directory is missing, a validation work is absent, or either side is empty.
pub fn load_corpus(dir: &Path, validation: &[String]) -> Result<Corpus> {
    if !dir.is_dir() {
        bail!("dataset directory `{}` does not exist", dir.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    let mut corpus = Corpus {
        train: Vec::new(),
        validation: Vec::new(),
    };
    for path in files {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let work = Work { name, text };
        if validation.contains(&work.name) {
            corpus.validation.push(work);
        } else {
            corpus.train.push(work);
        }
    }
    for name in validation {
        if !corpus.validation.iter().any(|w| &w.name == name) {
            bail!(
                "validation work `{name}` not found in `{}` (expected {name}.txt)",
                dir.display()
            );
        }
    }
    if corpus.train.is_empty() {
        bail!("no training works (*.txt) in `{}`", dir.display());
    }
    if corpus.validation.is_empty() {
        bail!("no validation works: name at least one in data.validation_works");
    }
    Ok(corpus)
}
