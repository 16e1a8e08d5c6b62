// SPDX-License-Identifier: Apache-2.0
//! Data-plane checks: the access a volume reports really serves its blocks.
//!
//! Only the `nbd` driver is understood (it is what our local provider exports); the checks use
//! `qemu-io`, QEMU's own NBD client, so they prove what a machine provider's QEMU will see.
//! Other drivers (upstream's `ceph`) are skipped with that reason rather than passed.

use tokio::process::Command;

use super::fixtures::{self, class_name, id, size, snapshot_id, spec_from_snapshot};
use crate::{
    ensure,
    harness::{Ctx, TestError, TestResult},
};

const KIB64: i64 = 64 * 1024;

/// The NBD URI of an available volume, or a skip when its driver is not `nbd`.
fn nbd_uri(volume: &iri_api::volume::v1alpha1::Volume) -> Result<String, TestError> {
    let access = volume
        .status
        .as_ref()
        .and_then(|s| s.access.as_ref())
        .ok_or_else(|| TestError::fail(format!("volume {} is available but has no access", id(volume))))?;
    if access.driver != "nbd" {
        return Err(TestError::skip(format!(
            "the data-plane checks know the nbd driver only, this volume uses {:?}",
            access.driver
        )));
    }
    access
        .attributes
        .get("uri")
        .cloned()
        .ok_or_else(|| TestError::fail("nbd access without a \"uri\" attribute".to_string()))
}

/// Runs one qemu-io command against `uri`; the export presents raw data.
async fn qemu_io(uri: &str, command: &str) -> Result<String, TestError> {
    let output = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .await
        .map_err(|e| TestError::skip(format!("qemu-io is needed for data-plane checks: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    // qemu-io exits 0 even when a pattern check fails; it says so on stdout.
    ensure!(
        output.status.success()
            && !stdout.contains("Pattern verification failed")
            && !stderr.contains("failed"),
        "qemu-io -c {command:?} {uri}: {}{}",
        stdout.trim(),
        stderr.trim()
    );
    Ok(stdout)
}

/// Writes a pattern at the start and at the end of the volume through its export and reads
/// both back; the export's length is the volume's reported size.
pub(crate) async fn export_reads_and_writes(ctx: &mut Ctx) -> TestResult {
    let volume = fixtures::create_available(ctx, &[]).await?;
    let uri = nbd_uri(&volume)?;
    let reported = fixtures::status_bytes(&volume);
    let length = qemu_io(&uri, "length").await?;
    ensure!(
        length.contains(&format!("{reported}")) || parse_length(&length) == Some(reported),
        "the export's length ({}) is not the reported storage_bytes {reported}",
        length.trim()
    );
    let tail = reported - KIB64;
    qemu_io(&uri, &format!("write -P 0x5a 0 {KIB64}")).await?;
    qemu_io(&uri, &format!("write -P 0xa5 {tail} {KIB64}")).await?;
    qemu_io(&uri, &format!("read -P 0x5a 0 {KIB64}")).await?;
    qemu_io(&uri, &format!("read -P 0xa5 {tail} {KIB64}")).await?;
    // A fresh volume reads zeroes where nothing was written.
    qemu_io(&uri, &format!("read -P 0 {KIB64} {KIB64}")).await?;
    Ok(())
}

/// Data written before a snapshot is what a volume restored from it reads, even after more
/// writes to the source and after the source is deleted.
pub(crate) async fn snapshot_keeps_point_in_time_data(ctx: &mut Ctx) -> TestResult {
    let volume = fixtures::create_available(ctx, &[]).await?;
    let uri = nbd_uri(&volume)?;
    qemu_io(&uri, &format!("write -P 0x11 0 {KIB64}")).await?;
    let snapshot = fixtures::create_ready_snapshot(ctx, id(&volume), &[]).await?;
    // Written after the snapshot: must not show in the restored volume.
    qemu_io(&uri, &format!("write -P 0x22 0 {KIB64}")).await?;
    qemu_io(&uri, &format!("read -P 0x22 0 {KIB64}")).await?;
    fixtures::delete_and_wait(ctx, id(&volume)).await?;

    let class = fixtures::class(ctx).await?;
    let spec = spec_from_snapshot(class_name(&class), size(ctx), snapshot_id(&snapshot));
    let request = fixtures::request(ctx.labels(&[]), spec);
    let restored = fixtures::create(ctx, request).await?;
    let restored = fixtures::wait_available(ctx, id(&restored)).await?;
    let restored_uri = nbd_uri(&restored)?;
    qemu_io(&restored_uri, &format!("read -P 0x11 0 {KIB64}")).await?;
    Ok(())
}

/// `length` prints e.g. "64 MiB"; qemu-io has no byte-exact form, so parse the unit.
fn parse_length(text: &str) -> Option<i64> {
    let mut parts = text.split_whitespace();
    let value: f64 = parts.next()?.parse().ok()?;
    let unit = match parts.next()? {
        "bytes" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((value * unit).round() as i64)
}

#[cfg(test)]
mod unit {
    #[test]
    fn parses_qemu_io_lengths() {
        assert_eq!(super::parse_length("64 MiB\n"), Some(64 << 20));
        assert_eq!(super::parse_length("1 GiB"), Some(1 << 30));
        assert_eq!(super::parse_length("512 bytes"), Some(512));
        assert_eq!(super::parse_length("garbage"), None);
    }
}
