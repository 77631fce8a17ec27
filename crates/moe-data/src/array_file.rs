//! The files of a prepared dataset that hold numbers: token shards and document offsets.
//!
//! A 32-byte header (magic `MOEARRAY`, format version, bytes per value, value count),
//! then the values, little-endian. Readers memory-map the file and check the header and
//! the file's size before reading a value, so a truncated or foreign file is refused with
//! its name instead of being read as tokens.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

/// First bytes of every array file.
pub const MAGIC: [u8; 8] = *b"MOEARRAY";
/// The layout version this code reads and writes.
pub const VERSION: u32 = 1;
const HEADER_BYTES: usize = 32;

/// How values are stored: tokens as `u16` while the vocabulary fits, else `u32`;
/// document offsets as `u64`; loss masks as `u8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// One byte per value.
    U8,
    /// Two bytes per value.
    U16,
    /// Four bytes per value.
    U32,
    /// Eight bytes per value.
    U64,
}

impl Dtype {
    /// The narrowest token type for a vocabulary of `vocab_size` ids.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }

    /// Bytes per value.
    pub fn width(self) -> usize {
        match self {
            Self::U8 => 1,
            Self::U16 => 2,
            Self::U32 => 4,
            Self::U64 => 8,
        }
    }

    fn from_width(width: u32) -> Option<Self> {
        match width {
            1 => Some(Self::U8),
            2 => Some(Self::U16),
            4 => Some(Self::U32),
            8 => Some(Self::U64),
            _ => None,
        }
    }
}

/// Writes an array file value by value; the count in the header is set by
/// [`ArrayWriter::finish`].
pub struct ArrayWriter {
    file: BufWriter<File>,
    path: PathBuf,
    dtype: Dtype,
    count: u64,
}

impl ArrayWriter {
    /// Creates `path` (replacing any file there) for values of `dtype`.
    pub fn create(path: &Path, dtype: Dtype) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = Self {
            file: BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            dtype,
            count: 0,
        };
        writer.write_header()?;
        Ok(writer)
    }

    fn write_header(&mut self) -> Result<()> {
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(self.dtype.width() as u32).to_le_bytes());
        header[16..24].copy_from_slice(&self.count.to_le_bytes());
        self.file
            .write_all(&header)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Appends values; each must fit the file's type.
    pub fn extend(&mut self, values: impl IntoIterator<Item = u64>) -> Result<()> {
        let width = self.dtype.width();
        for value in values {
            ensure!(
                width == 8 || value >> (8 * width) == 0,
                "{value} does not fit the {width}-byte values of {}",
                self.path.display()
            );
            self.file
                .write_all(&value.to_le_bytes()[..width])
                .with_context(|| format!("writing {}", self.path.display()))?;
            self.count += 1;
        }
        Ok(())
    }

    /// Values written so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Writes the count into the header, flushes and syncs; returns the count.
    pub fn finish(mut self) -> Result<u64> {
        self.file.seek(SeekFrom::Start(0))?;
        self.write_header()?;
        let file = self
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", self.path.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(self.count)
    }
}

/// A memory-mapped array file whose header and size were checked.
#[derive(Debug)]
pub struct ArrayFile {
    map: Mmap,
    dtype: Dtype,
    count: u64,
}

impl ArrayFile {
    /// Opens `path`, which must hold values of `dtype`.
    pub fn open(path: &Path, dtype: Dtype) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: a prepared set's files are written once, under a temporary name, and
        // never changed after the rename that publishes them; the map is only read.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        let name = path.display();
        ensure!(
            map.len() >= HEADER_BYTES && map[..8] == MAGIC,
            "{name} is not a token file of `moe data prepare` (no MOEARRAY header)"
        );
        let word = |at: usize| u32::from_le_bytes([map[at], map[at + 1], map[at + 2], map[at + 3]]);
        let version = word(8);
        ensure!(
            version == VERSION,
            "{name} has format version {version}; this moe reads version {VERSION}: prepare the data again"
        );
        let Some(found) = Dtype::from_width(word(12)) else {
            bail!("{name}: corrupted header (value width {})", word(12));
        };
        ensure!(
            found == dtype,
            "{name} holds {found:?} values where {dtype:?} was expected"
        );
        let mut count = [0u8; 8];
        count.copy_from_slice(&map[16..24]);
        let count = u64::from_le_bytes(count);
        let expected =
            (HEADER_BYTES as u64).saturating_add(count.saturating_mul(dtype.width() as u64));
        ensure!(
            map.len() as u64 == expected,
            "{name} is truncated or corrupted: its header promises {count} values ({expected} bytes) but the file has {} bytes",
            map.len()
        );
        Ok(Self { map, dtype, count })
    }

    /// Tells the kernel reads will be scattered (training windows): each read then maps
    /// only its own pages instead of reading around them, so the pages a run maps stay
    /// proportional to what it reads, not to the corpus.
    pub fn advise_random_reads(&self) {
        #[cfg(unix)]
        // Only a hint: a kernel that ignores it reads around, which is merely slower.
        let _ = self.map.advise(memmap2::Advice::Random);
    }

    /// Drops this process's mapping of the pages of values `start..start + len`; they
    /// stay in the page cache, and a later read maps them again. Training reads a window
    /// once per epoch, so its pages need not stay in the run's resident memory.
    #[cfg(unix)]
    pub fn unmap_pages(&self, start: u64, len: usize) {
        let width = self.dtype.width();
        let from = HEADER_BYTES + start as usize * width;
        // SAFETY: the map is a read-only mapping of a file that is never written after
        // it is published (see `open`). DONTNEED only drops page-table entries: any read,
        // now or later, faults the same bytes back in from the file.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, len * width)
        };
    }

    /// Does nothing where pages cannot be unmapped by hand.
    #[cfg(not(unix))]
    pub fn unmap_pages(&self, _start: u64, _len: usize) {}

    /// Number of values.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Value `index` (below [`ArrayFile::len`]).
    pub fn get(&self, index: u64) -> u64 {
        let width = self.dtype.width();
        let at = HEADER_BYTES + index as usize * width;
        let mut bytes = [0u8; 8];
        bytes[..width].copy_from_slice(&self.map[at..at + width]);
        u64::from_le_bytes(bytes)
    }

    /// Appends values `start..start + len` (within the file) to `out` as `u32`.
    pub fn read_into(&self, start: u64, len: usize, out: &mut Vec<u32>) {
        let width = self.dtype.width();
        let from = HEADER_BYTES + start as usize * width;
        let bytes = &self.map[from..from + len * width];
        match self.dtype {
            Dtype::U8 => out.extend(bytes.iter().map(|&b| u32::from(b))),
            Dtype::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
            ),
            Dtype::U32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Dtype::U64 => out.extend((start..start + len as u64).map(|i| self.get(i) as u32)),
        }
    }
}
