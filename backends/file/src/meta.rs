//! The metadata namespace on disk: one small file per name, replaced atomically.
//!
//! ```text
//! <dir>/meta/<name>.meta  = magic "CHORUSMT" (8 bytes), meta format version u32 LE,
//!                           value_len u32 LE, CRC32C u32 LE, value (value_len bytes)
//! ```
//!
//! The CRC covers the name, the first 16 bytes and the value, so a file renamed to another
//! name does not validate there. A value is replaced by writing `<name>.tmp`, syncing it,
//! renaming it over `<name>.meta` and syncing the directory, whatever the log's fsync policy:
//! a crash leaves either the old file or the new one, never a torn or empty one, and a
//! leftover `.tmp` is removed when the store opens. Metadata lives outside the segments, so
//! the log format (and every store directory written before metadata existed) is unchanged,
//! and compaction never touches it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chorus_core::storage::{MAX_META_LEN, StorageError, check_meta_name};

use crate::fs::Fs;

/// The directory, inside the store's, that holds the metadata files.
pub(crate) const META_DIR: &str = "meta";
/// Extension of a metadata file.
const META_EXT: &str = ".meta";
/// Extension of a metadata file being written.
const TMP_EXT: &str = ".tmp";
/// The first bytes of every metadata file.
const MAGIC: [u8; 8] = *b"CHORUSMT";
/// The metadata file format this build writes and the only one it reads.
pub(crate) const META_VERSION: u32 = 1;
/// Bytes before the value.
const HEADER: usize = 20;

/// The metadata directory of the store in `dir`.
pub(crate) fn meta_dir(dir: &Path) -> PathBuf {
    dir.join(META_DIR)
}

/// The file that holds the value of `name`.
pub(crate) fn meta_path(dir: &Path, name: &str) -> PathBuf {
    meta_dir(dir).join(format!("{name}{META_EXT}"))
}

fn checksum(name: &str, header: &[u8], value: &[u8]) -> u32 {
    let crc = crc32c::crc32c(name.as_bytes());
    let crc = crc32c::crc32c_append(crc, header);
    crc32c::crc32c_append(crc, value)
}

/// The bytes of the metadata file of `name` holding `value` (at most [`MAX_META_LEN`]).
pub(crate) fn encode(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&META_VERSION.to_le_bytes());
    // Values are at most MAX_META_LEN bytes, which fits in u32.
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    let crc = checksum(name, &out[..16], value);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// Why a metadata file does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadMeta {
    /// Another metadata format version.
    Version(u32),
    /// Damaged or not a metadata file.
    Damage(&'static str),
}

/// The value in the metadata file `data` of `name`.
pub(crate) fn decode(name: &str, data: &[u8]) -> Result<Bytes, BadMeta> {
    let field = |at: usize| -> Result<u32, BadMeta> {
        let raw = data
            .get(at..at + 4)
            .ok_or(BadMeta::Damage("shorter than its header"))?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    };
    if data.len() < HEADER || data[..8] != MAGIC {
        return Err(BadMeta::Damage("not a metadata file"));
    }
    let version = field(8)?;
    if version != META_VERSION {
        return Err(BadMeta::Version(version));
    }
    let len = field(12)? as usize;
    if len > MAX_META_LEN || data.len() != HEADER + len {
        return Err(BadMeta::Damage("wrong length"));
    }
    let value = &data[HEADER..];
    if field(16)? != checksum(name, &data[..16], value) {
        return Err(BadMeta::Damage("checksum mismatch"));
    }
    Ok(Bytes::copy_from_slice(value))
}

/// Reads every metadata value of the store in `dir` (none if it has no metadata directory,
/// as in stores written before metadata existed), removing leftover temporary files.
///
/// A damaged file is [`StorageError::Corruption`] naming it; a file of another format version
/// is [`StorageError::Config`]; files that are not metadata files are ignored.
pub(crate) fn load_all(fs: &Fs, dir: &Path) -> Result<HashMap<String, Bytes>, StorageError> {
    let meta_dir = meta_dir(dir);
    let mut values = HashMap::new();
    let entries = match std::fs::read_dir(&meta_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(values),
        Err(err) => return Err(err.into()),
    };
    let mut removed = false;
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let path = entry.path();
        if file_name.ends_with(TMP_EXT) {
            // A replacement that did not finish: the old value is still in place.
            fs.remove_file(&path)?;
            removed = true;
            continue;
        }
        let Some(name) = file_name.strip_suffix(META_EXT) else {
            continue;
        };
        if check_meta_name(name).is_err() {
            continue;
        }
        let len = entry.metadata()?.len();
        let value = if len > (HEADER + MAX_META_LEN) as u64 {
            Err(BadMeta::Damage("wrong length"))
        } else {
            decode(name, &std::fs::read(&path)?)
        };
        let value = value.map_err(|err| match err {
            BadMeta::Version(version) => StorageError::Config(format!(
                "metadata file {} is in format version {version}; this build reads only \
                 version {META_VERSION} (written by a newer Chorus?)",
                path.display()
            )),
            BadMeta::Damage(why) => {
                StorageError::Corruption(format!("metadata file {}: {why}", path.display()))
            }
        })?;
        values.insert(name.to_owned(), value);
    }
    if removed {
        fs.sync_dir(&meta_dir)?;
    }
    Ok(values)
}

/// Replaces the value of `name` in the store in `dir` atomically and durably: writes
/// `<name>.tmp`, syncs it, renames it over `<name>.meta`, syncs the directory. Creates the
/// metadata directory (durably) the first time.
///
/// Returns whether the rename happened: after a failure past it, the new value is in place
/// (readable, and durable or not).
pub(crate) fn store(fs: &Fs, dir: &Path, name: &str, value: &[u8]) -> (bool, io::Result<()>) {
    let meta_dir = meta_dir(dir);
    let tmp = meta_dir.join(format!("{name}{TMP_EXT}"));
    let target = meta_path(dir, name);
    let mut renamed = false;
    let result = (|| -> io::Result<()> {
        match std::fs::create_dir(&meta_dir) {
            Ok(()) => fs.sync_dir(dir)?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
        match fs.remove_file(&tmp) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let file = fs.create_new(&tmp)?;
        fs.write_all(&file, &tmp, &encode(name, value))?;
        fs.sync_all(&file, &tmp)?;
        drop(file);
        fs.rename(&tmp, &target)?;
        renamed = true;
        fs.sync_dir(&meta_dir)
    })();
    if result.is_err() && !renamed {
        // Nothing refers to the temporary file: remove it (a leftover is removed on open).
        let _ = fs.remove_file(&tmp);
    }
    (renamed, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_only_under_their_own_name() {
        for value in [&b""[..], b"v", &[7u8; MAX_META_LEN]] {
            let data = encode("hlc.floor", value);
            assert_eq!(decode("hlc.floor", &data).as_deref(), Ok(value));
            assert_eq!(
                decode("generation", &data),
                Err(BadMeta::Damage("checksum mismatch"))
            );
        }
    }

    #[test]
    fn damage_and_other_versions_are_refused() {
        let data = encode("n", b"value");
        for cut in 0..data.len() {
            assert!(decode("n", &data[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..data.len() {
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            assert!(decode("n", &bad).is_err(), "bit flipped at {at}");
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(decode("n", &longer).is_err());
        let mut newer = data;
        newer[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(decode("n", &newer), Err(BadMeta::Version(2)));
    }
}
