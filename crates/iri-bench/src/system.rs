// SPDX-License-Identifier: Apache-2.0
//! What machine the numbers come from: cores, CPU model, memory, kernel, QEMU version, date,
//! and the filesystem a benchmark writes to.

use std::{
    path::Path,
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::units::fmt_size_approx;

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// CPUs this process may use.
    pub cores: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// MemTotal from /proc/meminfo, in bytes.
    pub memory_bytes: u64,
    /// Kernel release.
    pub kernel: String,
    /// First line of `qemu-img --version`.
    pub qemu: String,
    /// When the run started, UTC, RFC 3339.
    pub date: String,
    /// The 1, 5 and 15 minute load averages when the run started (other work on the machine
    /// skews absolute numbers; ratios within one run less so).
    pub load: String,
}

impl MachineInfo {
    /// Collects the information; what cannot be read is reported as `unknown`.
    pub fn collect(qemu_img: &Path) -> MachineInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        MachineInfo {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            memory_bytes: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |s| s.trim().to_string()),
            qemu: command_line(Command::new(qemu_img).arg("--version")),
            date: rfc3339(SystemTime::now()),
            load: std::fs::read_to_string("/proc/loadavg").map_or_else(
                |_| "unknown".into(),
                |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            ),
        }
    }

    /// One line per item, as Markdown list items.
    pub fn render(&self) -> String {
        format!(
            "- date: {} (load average {})\n- CPU: {} ({} cores)\n- memory: {}\n- kernel: {}\n- QEMU: {}\n",
            self.date,
            self.load,
            self.cpu_model,
            self.cores,
            fmt_size_approx(self.memory_bytes),
            self.kernel,
            self.qemu
        )
    }
}

/// The filesystem holding a directory.
#[derive(Debug, Clone, Serialize)]
pub struct FsInfo {
    /// The directory.
    pub path: String,
    /// Filesystem type (`stat -f -c %T`).
    pub fstype: String,
    /// Bytes available to unprivileged users.
    pub free_bytes: u64,
}

impl FsInfo {
    /// The filesystem of `dir`.
    pub fn of(dir: &Path) -> FsInfo {
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        let free_bytes = nix::sys::statvfs::statvfs(dir).map_or(0, |s| {
            (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64)
        });
        FsInfo {
            path: dir.display().to_string(),
            fstype: command_line(Command::new("stat").args(["-f", "-c", "%T"]).arg(dir)),
            free_bytes,
        }
    }
}

/// VmRSS (resident memory) in bytes from the text of a /proc/<pid>/status file.
pub fn vm_rss_bytes(status: &str) -> Option<u64> {
    field(status, "VmRSS")?
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// The `key: value` line's value in a /proc file.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// The first line a command prints, or `unknown`.
fn command_line(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723)),
            "2000-02-29T01:02:03Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_737_599)),
            "2026-11-26T23:59:59Z"
        );
    }

    #[test]
    fn proc_fields() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC\nMemTotal:       24000000 kB\n";
        assert_eq!(field(text, "model name").as_deref(), Some("AMD EPYC"));
        assert_eq!(field(text, "MemTotal").as_deref(), Some("24000000 kB"));
        assert_eq!(field(text, "flags"), None);
        let status = "Name:\tiri\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t5\n";
        assert_eq!(vm_rss_bytes(status), Some(12345 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tzombie\n"), None);
        assert_eq!(vm_rss_bytes("VmRSS:\t12 MB\n"), None);
    }
}
