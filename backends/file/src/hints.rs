//! The hint namespace on disk: one file per hint, written atomically.
//!
//! ```text
//! <dir>/hints/<id as 16 hex digits>.hint = magic "CHORUSHT" (8 bytes), hint format version
//!                                          u32 LE, blob_len u32 LE, CRC32C u32 LE, blob
//! ```
//!
//! The CRC covers the id, the first 16 bytes and the blob, so a file renamed to another id
//! does not validate there. A batch of hints is stored by writing each to `<id>.tmp`, syncing
//! it and renaming it into place, then syncing the directory once, whatever the log's fsync
//! policy: a crash leaves each hint either absent (or with its old blob) or complete, never
//! torn. A removal unlinks the files and syncs the directory. Leftover `.tmp` files are
//! removed when the hints are loaded. Hints live outside the segments, so the log format is
//! unchanged and compaction never touches them.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chorus_core::storage::{MAX_HINT_LEN, StorageError};

use crate::fs::Fs;

/// The directory, inside the store's, that holds the hint files.
pub(crate) const HINT_DIR: &str = "hints";
const HINT_EXT: &str = ".hint";
const TMP_EXT: &str = ".tmp";
const MAGIC: [u8; 8] = *b"CHORUSHT";
/// The hint file format this build writes and the only one it reads.
pub(crate) const HINT_VERSION: u32 = 1;
const HEADER: usize = 20;

fn hint_dir(dir: &Path) -> PathBuf {
    dir.join(HINT_DIR)
}

fn file_name(id: u64) -> String {
    format!("{id:016x}{HINT_EXT}")
}

fn checksum(id: u64, header: &[u8], blob: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&id.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, header);
    crc32c::crc32c_append(crc, blob)
}

/// The bytes of the hint file of `id` holding `blob` (at most [`MAX_HINT_LEN`]).
pub(crate) fn encode(id: u64, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + blob.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&HINT_VERSION.to_le_bytes());
    // Blobs are at most MAX_HINT_LEN bytes, which fits in u32.
    out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
    let crc = checksum(id, &out[..16], blob);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(blob);
    out
}

/// The blob in the hint file `data` of `id`, or why it does not decode.
pub(crate) fn decode(id: u64, data: &[u8]) -> Result<Bytes, &'static str> {
    let field = |at: usize| -> Result<u32, &'static str> {
        let raw = data.get(at..at + 4).ok_or("shorter than its header")?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    };
    if data.len() < HEADER || data[..8] != MAGIC {
        return Err("not a hint file");
    }
    if field(8)? != HINT_VERSION {
        return Err("another hint format version");
    }
    let len = field(12)? as usize;
    if len > MAX_HINT_LEN || data.len() != HEADER + len {
        return Err("wrong length");
    }
    let blob = &data[HEADER..];
    if field(16)? != checksum(id, &data[..16], blob) {
        return Err("checksum mismatch");
    }
    Ok(Bytes::copy_from_slice(blob))
}

/// Stores every `(id, blob)` under `dir` (see the module documentation).
pub(crate) fn store(fs: &Fs, dir: &Path, hints: &[(u64, Bytes)]) -> io::Result<()> {
    if hints.is_empty() {
        return Ok(());
    }
    let hint_dir = hint_dir(dir);
    match std::fs::create_dir(&hint_dir) {
        Ok(()) => fs.sync_dir(dir)?,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    for (id, blob) in hints {
        let tmp = hint_dir.join(format!("{id:016x}{TMP_EXT}"));
        let result = (|| {
            match fs.remove_file(&tmp) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
            let file = fs.create_new(&tmp)?;
            fs.write_all(&file, &tmp, &encode(*id, blob))?;
            fs.sync_all(&file, &tmp)?;
            drop(file);
            fs.rename(&tmp, &hint_dir.join(file_name(*id)))
        })();
        if let Err(err) = result {
            let _ = fs.remove_file(&tmp);
            return Err(err);
        }
    }
    fs.sync_dir(&hint_dir)
}

/// Removes the hints with `ids` under `dir` (absent ones are ignored).
pub(crate) fn remove(fs: &Fs, dir: &Path, ids: &[u64]) -> io::Result<()> {
    let hint_dir = hint_dir(dir);
    let mut removed = false;
    for id in ids {
        match fs.remove_file(&hint_dir.join(file_name(*id))) {
            Ok(()) => removed = true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    if removed {
        fs.sync_dir(&hint_dir)?;
    }
    Ok(())
}

/// Every hint under `dir`, in id order, removing leftover temporary files. A damaged hint file
/// is [`StorageError::Corruption`] naming it; files that are not hint files are ignored.
pub(crate) fn load(fs: &Fs, dir: &Path) -> Result<Vec<(u64, Bytes)>, StorageError> {
    let hint_dir = hint_dir(dir);
    let entries = match std::fs::read_dir(&hint_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let path = entry.path();
        if name.ends_with(TMP_EXT) {
            fs.remove_file(&path)?;
            continue;
        }
        let Some(id) = name
            .strip_suffix(HINT_EXT)
            .filter(|hex| hex.len() == 16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        let blob = if entry.metadata()?.len() > (HEADER + MAX_HINT_LEN) as u64 {
            Err("wrong length")
        } else {
            decode(id, &std::fs::read(&path)?)
        };
        let blob = blob.map_err(|why| {
            StorageError::Corruption(format!("hint file {}: {why}", path.display()))
        })?;
        out.push((id, blob));
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_only_under_their_own_id() {
        for blob in [&b""[..], b"hint", &[7u8; 10_000]] {
            let data = encode(5, blob);
            assert_eq!(decode(5, &data).as_deref(), Ok(blob));
            assert_eq!(decode(6, &data), Err("checksum mismatch"));
        }
    }

    #[test]
    fn damage_is_refused() {
        let data = encode(9, b"value");
        for cut in 0..data.len() {
            assert!(decode(9, &data[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..data.len() {
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            assert!(decode(9, &bad).is_err(), "bit flipped at {at}");
        }
    }

    #[test]
    fn store_load_remove_and_leftovers() {
        let dir = tempfile::tempdir().expect("dir");
        let fs = Fs::default();
        assert_eq!(load(&fs, dir.path()).expect("load"), vec![]);
        let hints = vec![(3, Bytes::from_static(b"c")), (1, Bytes::from_static(b"a"))];
        store(&fs, dir.path(), &hints).expect("store");
        std::fs::write(dir.path().join(HINT_DIR).join("0000000000000002.tmp"), b"x").expect("tmp");
        let loaded = load(&fs, dir.path()).expect("load");
        assert_eq!(
            loaded,
            vec![(1, Bytes::from_static(b"a")), (3, Bytes::from_static(b"c"))]
        );
        assert!(
            !dir.path()
                .join(HINT_DIR)
                .join("0000000000000002.tmp")
                .exists()
        );
        remove(&fs, dir.path(), &[1, 7]).expect("remove");
        assert_eq!(
            load(&fs, dir.path()).expect("load"),
            vec![(3, Bytes::from_static(b"c"))]
        );
        std::fs::write(dir.path().join(HINT_DIR).join(file_name(3)), b"garbage").expect("write");
        assert!(matches!(
            load(&fs, dir.path()),
            Err(StorageError::Corruption(_))
        ));
    }
}
