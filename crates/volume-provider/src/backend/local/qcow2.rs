// SPDX-License-Identifier: Apache-2.0
//! The two things backend `local` needs from qcow2 files outside the storage daemon: creating
//! one (with `qemu-img`), and reading a header (size, backing file, encryption).
//!
//! Headers are read directly instead of through `qemu-img info`: it is one small read, it needs
//! no process, and it works on files the daemon holds locked (the daemon updates the header in
//! place through the same page cache, e.g. the size after `block_resize`).

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    path::Path,
    process::Stdio,
};

use tokio::io::AsyncWriteExt;

use crate::keys::Passphrase;

/// qcow2 magic: `QFI\xfb`.
const MAGIC: u32 = 0x5146_49fb;
/// The spec limits backing file names to 1023 bytes.
const MAX_BACKING_NAME: u32 = 1023;

/// What backend `local` reads from a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    /// Virtual size in bytes.
    pub size: u64,
    /// The backing file name as written, if any.
    pub backing: Option<String>,
    /// Whether the layer's data is LUKS-encrypted (`crypt_method` 2).
    pub encrypted: bool,
}

/// `crypt_method` values of the qcow2 header.
const CRYPT_NONE: u32 = 0;
const CRYPT_LUKS: u32 = 2;

/// Reads the header of the qcow2 file at `path`.
pub(super) fn read_header(path: &Path) -> io::Result<Header> {
    let invalid =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let mut file = File::open(path)?;
    // Version 2 and 3 share the first 36 bytes: magic, version, backing offset and length,
    // cluster bits, size, crypt method.
    let mut head = [0u8; 36];
    file.read_exact(&mut head)
        .map_err(|_| invalid("truncated qcow2 header"))?;
    let u32_at = |o: usize| u32::from_be_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    let u64_at = |o: usize| (u64::from(u32_at(o)) << 32) | u64::from(u32_at(o + 4));
    if u32_at(0) != MAGIC {
        return Err(invalid("not a qcow2 file"));
    }
    if !matches!(u32_at(4), 2 | 3) {
        return Err(invalid("unsupported qcow2 version"));
    }
    let backing_offset = u64_at(8);
    let backing_len = u32_at(16);
    let size = u64_at(24);
    let encrypted = match u32_at(32) {
        CRYPT_NONE => false,
        CRYPT_LUKS => true,
        // Legacy AES-CBC (1) is insecure and QEMU refuses to open it for writing anyway.
        _ => return Err(invalid("unsupported qcow2 encryption method")),
    };
    let backing = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        if backing_len > MAX_BACKING_NAME {
            return Err(invalid("backing file name too long"));
        }
        let mut name = vec![0u8; backing_len as usize];
        file.seek(SeekFrom::Start(backing_offset))?;
        file.read_exact(&mut name)
            .map_err(|_| invalid("truncated backing file name"))?;
        Some(String::from_utf8(name).map_err(|_| invalid("backing file name is not UTF-8"))?)
    };
    Ok(Header {
        size,
        backing,
        encrypted,
    })
}

/// Options of a LUKS-encrypted qcow2 layer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Encryption<'a> {
    /// The passphrase.
    pub passphrase: &'a Passphrase,
    /// PBKDF2 time to spend when the key slot is made (and so, roughly, at every open).
    pub iter_time_ms: u64,
}

/// Creates a sparse qcow2 file of `size` bytes at `path`, over `backing` (a backing file name as
/// it is to be written into the header, relative to `path`'s directory) if given.
///
/// The backing file is not opened (`-u`): the daemon may hold it, and its size does not matter
/// because `size` is given. Creation takes constant time: only metadata is written (plus, when
/// encrypted, the LUKS key slot, whose cost `iter_time_ms` sets).
///
/// The passphrase reaches `qemu-img` through its stdin, never its command line (which every
/// user of the host can read in `/proc`) nor a file.
pub(super) async fn create(
    qemu_img: &Path,
    path: &Path,
    size: u64,
    backing: Option<&str>,
    encryption: Option<Encryption<'_>>,
) -> Result<(), String> {
    let mut command = tokio::process::Command::new(qemu_img);
    command.args(["create", "-q", "-f", "qcow2", "-o", "preallocation=off"]);
    if let Some(backing) = backing {
        command.args(["-u", "-b", backing, "-F", "qcow2"]);
    }
    if let Some(encryption) = &encryption {
        command.args([
            "--object",
            "secret,id=key,file=/dev/stdin,format=raw",
            "-o",
            &format!(
                "encrypt.format=luks,encrypt.key-secret=key,encrypt.iter-time={}",
                encryption.iter_time_ms.max(1)
            ),
        ]);
    }
    command
        .arg(path)
        .arg(size.to_string())
        .stdin(if encryption.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("running {}: {e}", qemu_img.display()))?;
    if let (Some(encryption), Some(mut stdin)) = (encryption, child.stdin.take()) {
        // Dropping stdin closes it: qemu-img reads the secret up to end of file.
        stdin
            .write_all(encryption.passphrase.expose())
            .await
            .map_err(|e| format!("passing the passphrase to {}: {e}", qemu_img.display()))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("running {}: {e}", qemu_img.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} create failed ({}): {}",
            qemu_img.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_what_qemu_img_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        create(Path::new("qemu-img"), &base, 3 << 20, None, None)
            .await
            .unwrap();
        assert_eq!(
            read_header(&base).unwrap(),
            Header {
                size: 3 << 20,
                backing: None,
                encrypted: false,
            }
        );
        let top = dir.path().join("top.qcow2");
        let passphrase = Passphrase::new(b"sesame".to_vec());
        let encryption = Encryption {
            passphrase: &passphrase,
            iter_time_ms: 10,
        };
        create(
            Path::new("qemu-img"),
            &top,
            5 << 20,
            Some("../layers/x.qcow2"),
            Some(encryption),
        )
        .await
        .unwrap();
        assert_eq!(
            read_header(&top).unwrap(),
            Header {
                size: 5 << 20,
                backing: Some("../layers/x.qcow2".into()),
                encrypted: true,
            }
        );
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"this is not a qcow2 image at all, no").unwrap();
        assert_eq!(read_header(&junk).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let err = create(
            Path::new("qemu-img"),
            &dir.path().join("no/such/dir.qcow2"),
            1 << 20,
            None,
            None,
        )
        .await;
        assert!(err.is_err());
    }
}
