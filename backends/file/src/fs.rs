//! The file operations the log performs, behind one small layer so tests can inject faults.
//!
//! Every write, fsync, creation, rename and removal the backend performs goes through [`Fs`].
//! In production `Fs` has no hooks and each method is the plain `std::fs` call. Tests install
//! [`Hooks`] that see each operation before it runs and can fail it (disk full, `EIO` from an
//! fsync), cut a write short, hold it (a slow fsync) or count it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

/// One file operation, as hooks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // Fields are read by test hooks only.
pub(crate) enum Op<'a> {
    /// Appending `len` bytes to `path`.
    Write { path: &'a Path, len: usize },
    /// `fdatasync` of a file.
    SyncData(&'a Path),
    /// `fsync` of a file.
    SyncAll(&'a Path),
    /// `fsync` of a directory.
    SyncDir(&'a Path),
    /// Creating a new file.
    Create(&'a Path),
    /// Renaming `from` to `to`.
    Rename { from: &'a Path, to: &'a Path },
    /// Removing a file.
    Remove(&'a Path),
    /// Truncating a file to `len` bytes.
    Truncate { path: &'a Path, len: u64 },
}

/// What a hook makes of an operation it fails.
#[derive(Debug)]
pub(crate) struct Fault {
    /// The error the operation returns.
    pub(crate) error: io::Error,
    /// For a [`Op::Write`]: how many bytes are really written before the error (a short
    /// write, as a full disk leaves it). Ignored for other operations.
    pub(crate) written: usize,
}

/// Sees every file operation before it runs (tests only install one).
pub(crate) trait Hooks: Send + Sync + 'static {
    /// Called before `op` runs, on the thread that runs it; an `Err` fails the operation.
    fn before(&self, op: &Op<'_>) -> Result<(), Fault>;
}

/// The file layer: plain `std::fs` calls, each announced to the hooks first.
#[derive(Clone, Default)]
pub(crate) struct Fs {
    hooks: Option<Arc<dyn Hooks>>,
}

impl fmt::Debug for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fs")
            .field("hooked", &self.hooks.is_some())
            .finish()
    }
}

impl Fs {
    /// A layer that tells `hooks` about every operation.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn with_hooks(hooks: Arc<dyn Hooks>) -> Self {
        Fs { hooks: Some(hooks) }
    }

    fn before(&self, op: Op<'_>) -> Result<(), Fault> {
        match &self.hooks {
            Some(hooks) => hooks.before(&op),
            None => Ok(()),
        }
    }

    fn check(&self, op: Op<'_>) -> io::Result<()> {
        self.before(op).map_err(|fault| fault.error)
    }

    /// Writes all of `buf` to `file` (opened for appending).
    pub(crate) fn write_all(&self, mut file: &File, path: &Path, buf: &[u8]) -> io::Result<()> {
        if let Err(fault) = self.before(Op::Write {
            path,
            len: buf.len(),
        }) {
            let written = fault.written.min(buf.len());
            file.write_all(&buf[..written])?;
            return Err(fault.error);
        }
        file.write_all(buf)
    }

    /// `fdatasync`.
    pub(crate) fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        self.check(Op::SyncData(path))?;
        file.sync_data()
    }

    /// `fsync`.
    pub(crate) fn sync_all(&self, file: &File, path: &Path) -> io::Result<()> {
        self.check(Op::SyncAll(path))?;
        file.sync_all()
    }

    /// Fsyncs a directory, making creations, renames and removals in it durable.
    pub(crate) fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.check(Op::SyncDir(dir))?;
        File::open(dir)?.sync_all()
    }

    /// Creates `path`, which must not exist, for appending.
    pub(crate) fn create_new(&self, path: &Path) -> io::Result<File> {
        self.check(Op::Create(path))?;
        OpenOptions::new().create_new(true).append(true).open(path)
    }

    /// Renames `from` to `to`.
    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(Op::Rename { from, to })?;
        fs::rename(from, to)
    }

    /// Removes a file.
    pub(crate) fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Remove(path))?;
        fs::remove_file(path)
    }

    /// Truncates `path` to `len` bytes and fsyncs it.
    pub(crate) fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.check(Op::Truncate { path, len })?;
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(len)?;
        self.sync_all(&file, path)
    }
}
