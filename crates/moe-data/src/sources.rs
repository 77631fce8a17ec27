//! Where `moe data prepare` reads documents: `.txt` files (one document each),
//! directories (searched recursively), JSON lines (`.jsonl`, `.jsonl.gz`) and parquet
//! files with a text field. Documents arrive as pieces of at most about a megabyte, so a
//! large text file never has to fit in memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::read::MultiGzDecoder;
use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::chat::{ChatTemplate, json_kind, parse_conversation};

/// Target size of a piece of a long text file, in bytes.
pub const PIECE_BYTES: usize = 1 << 20;

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Plain text: the whole file is one document.
    Text,
    /// One JSON object per line, the document in its text field.
    Jsonl,
    /// Gzipped JSON lines.
    JsonlGz,
    /// A parquet file whose text column holds one document per row.
    Parquet,
}

impl SourceKind {
    /// The kind a file name asks for, if it is one we read.
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        [
            (".jsonl.gz", Self::JsonlGz),
            (".jsonl", Self::Jsonl),
            (".parquet", Self::Parquet),
            (".txt", Self::Text),
        ]
        .into_iter()
        .find_map(|(ext, kind)| name.ends_with(ext).then_some(kind))
    }
}

/// One file to read, and which `--input` it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceFile {
    /// The file.
    pub path: PathBuf,
    /// How to read it.
    pub kind: SourceKind,
    /// Index of the input (file or directory) it was found under.
    pub input: usize,
}

/// The files behind `inputs`, in order: a directory contributes its readable files
/// (recursively, sorted by path); a file must have a known extension.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for (input, path) in inputs.iter().enumerate() {
        if path.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found)?;
            found.sort();
            let before = files.len();
            files.extend(found.into_iter().filter_map(|path| {
                SourceKind::of(&path).map(|kind| SourceFile { path, kind, input })
            }));
            if files.len() == before {
                bail!(
                    "directory `{}` holds no .txt, .jsonl, .jsonl.gz or .parquet files",
                    path.display()
                );
            }
        } else if path.is_file() {
            let Some(kind) = SourceKind::of(path) else {
                bail!(
                    "`{}`: unsupported input (expected a .txt, .jsonl, .jsonl.gz or .parquet file, a directory, or - for standard input)",
                    path.display()
                );
            };
            files.push(SourceFile {
                path: path.clone(),
                kind,
                input,
            });
        } else {
            bail!("input `{}` does not exist", path.display());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_dir() {
            walk(&path, found)?;
        } else {
            found.push(path);
        }
    }
    Ok(())
}

/// A piece of one document's text.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Index of the document among all non-empty documents read so far.
    pub doc: u64,
    /// The text (invalid UTF-8 replaced by U+FFFD).
    pub text: String,
    /// Whether this piece starts its document.
    pub first: bool,
    /// Whether this piece ends its document.
    pub last: bool,
    /// A conversation's trained byte ranges of `text` (its answers); `None` for prose,
    /// which is trained on whole.
    pub trained: Option<Vec<Range<usize>>>,
}

/// What each JSON line or parquet row holds.
#[derive(Debug, Clone, Copy)]
pub enum Records<'a> {
    /// Text, in the field (or column) of this name.
    Text(&'a str),
    /// A conversation in OpenAI's `messages` form, rendered with this template (JSON
    /// lines only).
    Chat(&'a ChatTemplate),
}

/// What reading one file found.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FileCounts {
    /// Non-empty documents.
    pub documents: u64,
    /// Empty documents (and null parquet values), skipped.
    pub empty: u64,
    /// Invalid UTF-8 sequences replaced by U+FFFD.
    pub invalid_utf8: u64,
}

/// Reads `file`'s documents as pieces, numbering them from `first_doc`. `records` says
/// what a JSON line or parquet row holds.
pub fn read_pieces(
    file: &SourceFile,
    records: Records<'_>,
    first_doc: u64,
    each: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<FileCounts> {
    let mut counts = FileCounts::default();
    let mut whole_document = |document: Document<'_>, counts: &mut FileCounts| {
        if document.text.is_empty() {
            counts.empty += 1;
            return Ok(());
        }
        let text = lossy(document.text, &mut counts.invalid_utf8);
        let doc = first_doc + counts.documents;
        counts.documents += 1;
        each(Piece {
            doc,
            text,
            first: true,
            last: true,
            trained: document.trained,
        })
    };
    let path = &file.path;
    let text_field = match (records, file.kind) {
        (Records::Text(field), _) => field,
        (Records::Chat(_), SourceKind::Jsonl | SourceKind::JsonlGz) => "",
        (Records::Chat(_), _) => bail!(
            "`{}`: chat data is read from JSON lines (.jsonl, .jsonl.gz) holding `messages`",
            path.display()
        ),
    };
    match file.kind {
        SourceKind::Text => {
            let reader = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            read_text(reader, path, first_doc, &mut counts, each)?;
        }
        SourceKind::Jsonl | SourceKind::JsonlGz => {
            let reader = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let reader: Box<dyn Read> = match file.kind {
                SourceKind::JsonlGz => Box::new(MultiGzDecoder::new(reader)),
                _ => Box::new(reader),
            };
            read_jsonl(reader, path, records, &mut whole_document, &mut counts)?;
        }
        SourceKind::Parquet => read_parquet(
            path,
            text_field,
            &mut |text: Option<&[u8]>, counts| match text {
                Some(text) => whole_document(Document::prose(text), counts),
                None => {
                    counts.empty += 1;
                    Ok(())
                }
            },
            &mut counts,
        )?,
    }
    Ok(counts)
}

/// `bytes` as text, each invalid UTF-8 sequence replaced by U+FFFD and counted.
fn lossy(bytes: &[u8], invalid: &mut u64) -> String {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.to_owned();
    }
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            text.push('\u{FFFD}');
            *invalid += 1;
        }
    }
    text
}

/// A whole text file as one document, in pieces cut after a newline that a
/// non-whitespace byte follows (where byte-level pre-tokenizers split anyway).
fn read_text(
    mut reader: impl Read,
    path: &Path,
    doc: u64,
    counts: &mut FileCounts,
    each: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let mut buf = Vec::new();
    let (mut eof, mut first, mut offset) = (false, true, 0);
    loop {
        while !eof && buf.len() < 2 * PIECE_BYTES {
            let want = (2 * PIECE_BYTES - buf.len()) as u64;
            let read = reader
                .by_ref()
                .take(want)
                .read_to_end(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            eof = read == 0;
        }
        if buf.is_empty() {
            break;
        }
        let cut = if eof && buf.len() <= 2 * PIECE_BYTES {
            buf.len()
        } else {
            cut_point(&buf)
        };
        let rest = buf.split_off(cut);
        let last = eof && rest.is_empty();
        if let Some(reason) = binary_content(&buf, offset) {
            bail!(
                "{} is not a text file ({reason}); remove it from the data, or convert it to \
                 UTF-8 text",
                path.display()
            );
        }
        offset += buf.len();
        let text = lossy(&buf, &mut counts.invalid_utf8);
        buf = rest;
        each(Piece {
            doc,
            text,
            first,
            last,
            trained: None,
        })?;
        first = false;
    }
    if first {
        counts.empty += 1;
    } else {
        counts.documents += 1;
    }
    Ok(())
}

/// Why the bytes of a text file's piece starting at byte `offset` are binary data rather
/// than text, if they are: a NUL byte, which text in UTF-8 (or Latin-1) never holds and
/// binary formats nearly always do (git's test for binary files too). Invalid UTF-8
/// alone is not refused: such text is read with replacement characters, counted.
fn binary_content(piece: &[u8], offset: usize) -> Option<String> {
    let nul = piece.iter().position(|&b| b == 0)?;
    Some(format!("a NUL byte at offset {}", offset + nul))
}

/// Where to end a piece of `buf` (longer than [`PIECE_BYTES`]): after the first newline
/// past [`PIECE_BYTES`] that a non-whitespace byte follows, else after the last newline,
/// else at the first UTF-8 character boundary past [`PIECE_BYTES`].
fn cut_point(buf: &[u8]) -> usize {
    let clean =
        (PIECE_BYTES..buf.len()).find(|&i| buf[i - 1] == b'\n' && !buf[i].is_ascii_whitespace());
    let newline = || buf.iter().rposition(|&b| b == b'\n').map(|i| i + 1);
    let boundary = || {
        (PIECE_BYTES..buf.len())
            .find(|&i| buf[i] & 0xC0 != 0x80)
            .unwrap_or(buf.len())
    };
    clean
        .or_else(newline)
        .filter(|&i| i > 0)
        .unwrap_or_else(boundary)
}

/// One JSON line's or parquet row's document.
struct Document<'a> {
    text: &'a [u8],
    trained: Option<Vec<Range<usize>>>,
}

impl<'a> Document<'a> {
    fn prose(text: &'a [u8]) -> Self {
        Self {
            text,
            trained: None,
        }
    }
}

fn read_jsonl(
    reader: impl Read,
    path: &Path,
    records: Records<'_>,
    document: &mut dyn FnMut(Document<'_>, &mut FileCounts) -> Result<()>,
    counts: &mut FileCounts,
) -> Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut line = Vec::new();
    let name = path.display();
    for number in 1.. {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("{name}: reading line {number}"))?;
        if read == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // JSON's structure is ASCII: every replaced sequence lies inside a string.
        let text = lossy(&line, &mut counts.invalid_utf8);
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("{name}:{number}: not a JSON object"))?;
        let field = match records {
            Records::Text(field) => field,
            Records::Chat(template) => {
                let conversation = parse_conversation(&serde_json::Value::Object(object))
                    .and_then(|messages| template.render_for_training(&messages))
                    .with_context(|| format!("{name}:{number}"))?;
                let (text, trained) = conversation;
                let trained = Some(trained);
                document(
                    Document {
                        text: text.as_bytes(),
                        trained,
                    },
                    counts,
                )?;
                continue;
            }
        };
        match object.get(field) {
            Some(serde_json::Value::String(value)) => {
                document(Document::prose(value.as_bytes()), counts)?
            }
            Some(other) => bail!(
                "{name}:{number}: field `{field}` is {}, not a string",
                json_kind(other)
            ),
            None => {
                let fields: Vec<&str> = object.keys().map(String::as_str).collect();
                bail!(
                    "{name}:{number}: no field `{field}` (fields: {}); choose one with --text-field",
                    fields.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// What receives each row's text (`None` for a null) with the file's counts.
type RowSink<'a> = dyn FnMut(Option<&[u8]>, &mut FileCounts) -> Result<()> + 'a;

fn read_parquet(
    path: &Path,
    column: &str,
    row: &mut RowSink<'_>,
    counts: &mut FileCounts,
) -> Result<()> {
    let name = path.display();
    let file = File::open(path).with_context(|| format!("opening {name}"))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{name}: not a readable parquet file"))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let Some(index) = (0..schema.num_columns()).find(|&i| {
        let parts = schema.column(i).path().parts().to_vec();
        parts.len() == 1 && parts[0] == column
    }) else {
        let columns: Vec<String> = (0..schema.num_columns())
            .map(|i| schema.column(i).path().string())
            .collect();
        bail!(
            "{name}: no column `{column}` (columns: {}); choose one with --text-field",
            columns.join(", ")
        );
    };
    let descr = schema.column(index);
    let is_string = descr.physical_type() == PhysicalType::BYTE_ARRAY
        && (matches!(descr.logical_type_ref(), Some(LogicalType::String))
            || descr.converted_type() == ConvertedType::UTF8);
    if !is_string || descr.max_rep_level() > 0 {
        bail!(
            "{name}: column `{column}` is {:?}{}, not a string column",
            descr.physical_type(),
            match descr.logical_type_ref() {
                Some(logical) => format!(" ({logical:?})"),
                None if descr.max_rep_level() > 0 => " (repeated)".into(),
                None => String::new(),
            }
        );
    }
    let max_def = descr.max_def_level();
    let mut first_row = 0u64;
    for group in 0..reader.num_row_groups() {
        let group_reader = reader
            .get_row_group(group)
            .with_context(|| format!("{name}: reading row group {group}"))?;
        let ColumnReader::ByteArrayColumnReader(mut column_reader) = group_reader
            .get_column_reader(index)
            .with_context(|| format!("{name}: reading column `{column}`"))?
        else {
            bail!("{name}: column `{column}` is not a byte-array column");
        };
        let (mut values, mut levels) = (Vec::<ByteArray>::new(), Vec::<i16>::new());
        loop {
            values.clear();
            levels.clear();
            let (records, _, _) = column_reader
                .read_records(
                    1024,
                    (max_def > 0).then_some(&mut levels),
                    None,
                    &mut values,
                )
                .with_context(|| format!("{name}: reading rows from {first_row}"))?;
            if records == 0 {
                break;
            }
            let mut values = values.iter();
            for r in 0..records {
                let present = max_def == 0 || levels.get(r) == Some(&max_def);
                let text = if present { values.next() } else { None };
                row(text.map(ByteArray::data), counts)
                    .with_context(|| format!("{name}: row {}", first_row + r as u64))?;
            }
            first_row += records as u64;
        }
    }
    Ok(())
}
