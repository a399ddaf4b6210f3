//! Key files: a node's identity in its data directory, and keyring files.
//!
//! The identity file holds one line, `chorus-ed25519-secret-v1 <64 hex digits>`
//! ([`Identity::to_text`]). [`load_or_create_identity`] creates it on first start with mode
//! 0600 (created that way, never widened afterwards) and reads it on every later start; a file
//! that group or others may read is refused, as ssh refuses such a private key. A keyring
//! file lists one public key per line ([`Keyring::parse`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::auth::{Identity, KeyError, Keyring, KeyringError};

/// The identity file's name in a node's data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The identity file may be read by group or others.
    #[error("{path}: mode {mode:o} lets group or others read the secret key; chmod 600 it")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The identity file does not hold an identity.
    #[error("{path}: {source}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The keyring file does not parse.
    #[error("{path}: {source}")]
    Keyring {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KeyringError,
    },
    /// The operating system's random source failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A new identity from the operating system's random source.
pub fn generate_identity() -> Result<Identity, KeyFileError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyFileError::Random(e.to_string()))?;
    Ok(Identity::from_secret(secret))
}

/// Reads the identity at `path`, or creates one there (mode 0600, parent directories
/// included) if there is no file. Returns it and whether it was created.
pub fn load_or_create_identity(path: &Path) -> Result<(Identity, bool), KeyFileError> {
    match std::fs::metadata(path) {
        Ok(_) => load_identity(path).map(|id| (id, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let identity = generate_identity()?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = match options.open(path) {
                Ok(f) => f,
                // Another process created it meanwhile: use that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return load_identity(path).map(|id| (id, false));
                }
                Err(e) => return Err(io(path)(e)),
            };
            file.write_all(identity.to_text().as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(path))?;
            tracing::info!(
                path = %path.display(),
                id = %identity.node_id(),
                public_key = %identity.public_key(),
                "created a node identity"
            );
            Ok((identity, true))
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// Reads the identity at `path`, refusing a file group or others may read.
pub fn load_identity(path: &Path) -> Result<Identity, KeyFileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(io(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Identity::from_text(&text).map_err(|source| KeyFileError::Identity {
        path: path.to_owned(),
        source,
    })
}

/// Reads the keyring file at `path`.
pub fn read_keyring(path: &Path) -> Result<Keyring, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Keyring::parse(&text).map_err(|source| KeyFileError::Keyring {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_created_once_with_mode_0600_and_read_back() {
        let dir = std::env::temp_dir().join(format!("chorus-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("data").join(IDENTITY_FILE);
        let (first, created) = load_or_create_identity(&path).expect("created");
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, created) = load_or_create_identity(&path).expect("read");
        assert!(!created);
        assert_eq!(again.public_key(), first.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(matches!(
                load_identity(&path),
                Err(KeyFileError::Permissions { .. })
            ));
        }
        let ring = dir.join("keyring");
        std::fs::write(&ring, format!("# test\n{}\n", first.public_key())).expect("write");
        assert!(
            read_keyring(&ring)
                .expect("parses")
                .contains(&first.public_key())
        );
        std::fs::write(&ring, "nope\n").expect("write");
        assert!(matches!(
            read_keyring(&ring),
            Err(KeyFileError::Keyring { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
