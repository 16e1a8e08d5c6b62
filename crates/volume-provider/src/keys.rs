// SPDX-License-Identifier: Apache-2.0
//! Encryption passphrases at rest: wrapped with the provider's key-encryption key (KEK).
//!
//! A volume's passphrase (`spec.encryption.secret_data["encryptionKey"]`) is needed every time
//! the storage daemon opens the volume's layers (at every start, after every daemon restart),
//! so it must be kept; it is kept only wrapped with AES-256-GCM under a 32-byte KEK that lives
//! in a file of mode 0600 next to the data, never in the clear. Whoever holds the data
//! directory without the KEK file holds ciphertext only; whoever loses the KEK file loses every
//! encrypted volume (back it up apart from the data).
//!
//! Plaintext passphrases live in [`Passphrase`], which has no `Display`, a redacted `Debug`
//! and is zeroed when dropped.

use std::{
    fs::{self, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use aes_gcm::{
    Aes256Gcm, Key, Nonce,
    aead::{Aead, KeyInit, Payload},
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Length of the KEK file.
pub const KEK_LEN: usize = 32;
/// Version byte of the wrapped format: `1 ‖ nonce (12) ‖ ciphertext ‖ tag (16)`.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Binds a wrapped blob to its purpose: it cannot be replayed as some other AES-GCM message.
const AAD: &[u8] = b"iri volume-provider passphrase v1";

/// A plaintext passphrase: zeroed on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// Takes `bytes` (not empty: the caller validated that).
    pub fn new(bytes: Vec<u8>) -> Passphrase {
        Passphrase(Zeroizing::new(bytes))
    }

    /// The raw bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// A passphrase wrapped with the KEK: safe to store and to log the length of, nothing more.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WrappedKey(#[serde(with = "base64_bytes")] Vec<u8>);

impl WrappedKey {
    /// The stored form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes a stored form (checked when unwrapped).
    pub fn from_bytes(bytes: Vec<u8>) -> WrappedKey {
        WrappedKey(bytes)
    }
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedKey({} bytes)", self.0.len())
    }
}

/// Why a KEK cannot be used or a key cannot be unwrapped.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The KEK file cannot be read, created, or is unsafe.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A wrapped key is damaged or was wrapped with another KEK.
    #[error("cannot unwrap an encryption key: {0}")]
    Unwrap(&'static str),
}

/// The key-encryption key.
#[derive(Clone)]
pub struct Kek {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// Reads the KEK from `path`, or creates it (32 random bytes, mode 0600) if the file does
    /// not exist. An existing file must hold exactly 32 bytes and be private to its owner:
    /// a key others can read protects nothing, and is refused rather than used.
    ///
    /// `encrypted_data_exists` is asked before a new KEK is made: a missing key file next to
    /// data wrapped with the old one (a wrong path, a restore without the key) must stop the
    /// provider, not silently orphan every encrypted volume.
    pub fn load_or_create(
        path: &Path,
        encrypted_data_exists: impl FnOnce() -> bool,
    ) -> Result<Kek, KeyError> {
        let fail = |reason: String| KeyError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        match fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(fail(format!(
                        "mode {:03o} lets others read it: make it 0600 (chmod 600)",
                        mode & 0o777
                    )));
                }
                let mut bytes = Zeroizing::new(Vec::with_capacity(KEK_LEN + 1));
                fs::File::open(path)
                    .and_then(|f| f.take(KEK_LEN as u64 + 1).read_to_end(&mut bytes))
                    .map_err(|e| fail(e.to_string()))?;
                if bytes.len() != KEK_LEN {
                    return Err(fail(format!(
                        "holds {} bytes; a key file holds exactly {KEK_LEN}",
                        bytes.len()
                    )));
                }
                Ok(Kek::from_bytes(&bytes))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if encrypted_data_exists() {
                    return Err(fail(
                        "is missing, but encrypted volumes exist: restore the key file (without it they cannot be opened)"
                            .into(),
                    ));
                }
                let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
                getrandom::fill(bytes.as_mut_slice()).map_err(|e| fail(format!("random source: {e}")))?;
                write_new_private(path, bytes.as_slice()).map_err(|e| fail(format!("creating: {e}")))?;
                tracing::info!(path = %path.display(), "created a new key-encryption key");
                Ok(Kek::from_bytes(bytes.as_slice()))
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// A KEK from raw bytes (tests).
    pub fn from_bytes(bytes: &[u8]) -> Kek {
        assert_eq!(bytes.len(), KEK_LEN, "a KEK has {KEK_LEN} bytes");
        Kek {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes)),
        }
    }

    /// Wraps `passphrase` with a fresh random nonce.
    pub fn wrap(&self, passphrase: &Passphrase) -> WrappedKey {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: passphrase.expose(),
                    aad: AAD,
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        WrappedKey(out)
    }

    /// Unwraps a key wrapped by [`Kek::wrap`] under this KEK.
    pub fn unwrap(&self, wrapped: &WrappedKey) -> Result<Passphrase, KeyError> {
        let bytes = wrapped.as_bytes();
        if bytes.len() < 1 + NONCE_LEN + TAG_LEN {
            return Err(KeyError::Unwrap("too short"));
        }
        if bytes[0] != FORMAT_V1 {
            return Err(KeyError::Unwrap("unknown format"));
        }
        let (nonce, sealed) = bytes[1..].split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: AAD,
                },
            )
            .map(Passphrase::new)
            .map_err(|_| KeyError::Unwrap("damaged, or wrapped with a different key-encryption key"))
    }
}

/// Creates `path` with `bytes`, mode 0600, durably; fails if it exists.
pub(crate) fn write_new_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

mod base64_bytes {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_unwraps_and_detects_tampering_and_other_keks() {
        let kek = Kek::from_bytes(&[7; KEK_LEN]);
        let secret = Passphrase::new(b"correct horse".to_vec());
        let wrapped = kek.wrap(&secret);
        assert!(
            !wrapped.as_bytes().windows(7).any(|w| w == b"correct"),
            "the plaintext must not show"
        );
        assert_ne!(kek.wrap(&secret), wrapped, "every wrap takes a fresh nonce");
        assert_eq!(kek.unwrap(&wrapped).unwrap(), secret);
        let mut damaged = wrapped.as_bytes().to_vec();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(kek.unwrap(&WrappedKey::from_bytes(damaged)).is_err());
        assert!(Kek::from_bytes(&[8; KEK_LEN]).unwrap(&wrapped).is_err());
        assert!(kek.unwrap(&WrappedKey::from_bytes(vec![1, 2])).is_err());
        assert_eq!(format!("{secret:?}"), "Passphrase(<redacted>)");
        let json = serde_json::to_string(&wrapped).unwrap();
        assert_eq!(serde_json::from_str::<WrappedKey>(&json).unwrap(), wrapped);
    }

    #[test]
    fn key_files_are_created_private_and_unsafe_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let first = Kek::load_or_create(&path, || false).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&path).unwrap().len(), KEK_LEN as u64);
        let wrapped = first.wrap(&Passphrase::new(b"x".to_vec()));
        let again = Kek::load_or_create(&path, || unreachable!("the file exists")).unwrap();
        assert!(again.unwrap(&wrapped).is_ok(), "the same file gives the same key");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Kek::load_or_create(&path, || false).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");

        let short = dir.path().join("short");
        write_new_private(&short, b"tiny").unwrap();
        let err = Kek::load_or_create(&short, || false).unwrap_err().to_string();
        assert!(err.contains("holds 4 bytes"), "{err}");
        let gone = dir.path().join("gone");
        let err = Kek::load_or_create(&gone, || true).unwrap_err().to_string();
        assert!(err.contains("restore the key file"), "{err}");
        assert!(!gone.exists(), "no new key next to data wrapped with the old one");
    }
}
