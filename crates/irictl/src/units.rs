// SPDX-License-Identifier: Apache-2.0
//! Durations and byte quantities: parsing flag values and formatting table cells.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses a Go-style duration such as `10s`, `1h30m`, `500ms` or `1.5h` (plus `d` for days).
///
/// A bare number is taken as seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let invalid = || format!("invalid duration {text:?} (examples: 10s, 1m30s, 2h, 500ms)");
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(invalid()),
        };
        total += number * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid())
}

const BINARY_SUFFIXES: [(&str, u32); 6] = [("Ki", 1), ("Mi", 2), ("Gi", 3), ("Ti", 4), ("Pi", 5), ("Ei", 6)];
const DECIMAL_SUFFIXES: [(&str, u32); 7] = [
    ("k", 1),
    ("K", 1),
    ("M", 2),
    ("G", 3),
    ("T", 4),
    ("P", 5),
    ("E", 6),
];

/// Parses a byte quantity: a plain integer (`1073741824`) or a Kubernetes-style quantity with a
/// binary (`10Gi`, `512Mi`, `1.5Ti`) or decimal (`10G`, `500M`) suffix. The result must be a
/// whole number of bytes that fits an `int64`.
pub fn parse_quantity(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let invalid = |why: &str| format!("invalid quantity {text:?}: {why} (examples: 1073741824, 10Gi, 500M)");
    let (number, multiplier): (&str, u128) = BINARY_SUFFIXES
        .iter()
        .find_map(|(suffix, power)| text.strip_suffix(suffix).map(|n| (n, 1024u128.pow(*power))))
        .or_else(|| {
            DECIMAL_SUFFIXES
                .iter()
                .find_map(|(suffix, power)| text.strip_suffix(suffix).map(|n| (n, 1000u128.pow(*power))))
        })
        .unwrap_or((text, 1));
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_only = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) || fraction.len() > 18 {
        return Err(invalid("not a number"));
    }
    let scale = 10u128.pow(fraction.len() as u32);
    let whole: u128 = whole.parse().map_err(|_| invalid("too large"))?;
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| invalid("not a number"))?
    };
    let scaled = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(fraction))
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| invalid("too large"))?;
    if scaled % scale != 0 {
        return Err(invalid("not a whole number of bytes"));
    }
    i64::try_from(scaled / scale).map_err(|_| invalid("too large"))
}

/// Formats a byte count as an exact binary quantity (`10Gi`) when it is a whole multiple of a
/// binary unit, else as the plain number.
pub fn format_bytes(bytes: i64) -> String {
    if bytes > 0 {
        for (suffix, power) in BINARY_SUFFIXES.iter().rev() {
            let unit = 1024i64.pow(*power);
            if bytes % unit == 0 {
                return format!("{}{suffix}", bytes / unit);
            }
        }
    }
    bytes.to_string()
}

/// Formats a duration the way kubectl prints ages (`duration.HumanDuration`): `45s`, `3m20s`,
/// `15m`, `2h10m`, `20h`, `3d4h`, `40d`, `2y30d`, `9y`.
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let minutes = seconds / 60;
    let hours = minutes / 60;
    let days = hours / 24;
    let with_rest = |major: u64, major_unit: &str, minor: u64, minor_unit: &str| {
        if minor == 0 {
            format!("{major}{major_unit}")
        } else {
            format!("{major}{major_unit}{minor}{minor_unit}")
        }
    };
    if seconds < 60 * 2 {
        format!("{seconds}s")
    } else if minutes < 10 {
        with_rest(minutes, "m", seconds % 60, "s")
    } else if minutes < 60 * 3 {
        format!("{minutes}m")
    } else if hours < 8 {
        with_rest(hours, "h", minutes % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        with_rest(days, "d", hours % 24, "h")
    } else if hours < 24 * 365 * 2 {
        format!("{days}d")
    } else if hours < 24 * 365 * 8 {
        with_rest(days / 365, "y", days % 365, "d")
    } else {
        format!("{}y", days / 365)
    }
}

/// The age of something created at `timestamp`, given in units per second (`1_000_000_000` for
/// the nanoseconds of `ObjectMetadata.created_at`, `1` for the seconds of `event_time`).
///
/// Returns `<unknown>` for an unset (zero or negative) timestamp.
pub fn age(timestamp: i64, units_per_second: i64) -> String {
    if timestamp <= 0 {
        return "<unknown>".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let then = i128::from(timestamp) * (1_000_000_000 / i128::from(units_per_second));
    let elapsed = i128::try_from(now).unwrap_or(i128::MAX) - then;
    if elapsed < -1_000_000_000 {
        return "<invalid>".into();
    }
    let elapsed = u64::try_from(elapsed.max(0) / 1_000_000_000).unwrap_or(u64::MAX);
    human_duration(Duration::from_secs(elapsed))
}

/// The current time in Unix seconds.
pub fn now_unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60m"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        for bad in ["", "h", "10x", "1h30", "-1s", "1..5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1073741824"), Ok(1 << 30));
        assert_eq!(parse_quantity("10Gi"), Ok(10 << 30));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("2k"), Ok(2000));
        for bad in ["", "Gi", "1.5", "ten", "-1Gi", "100Ei", "1.0000000001Ki"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_formatting() {
        assert_eq!(format_bytes(10 << 30), "10Gi");
        assert_eq!(format_bytes(1536), "1536");
        assert_eq!(format_bytes(3 << 29), "1536Mi");
        assert_eq!(format_bytes(0), "0");
    }

    #[test]
    fn kubectl_ages() {
        let s = Duration::from_secs;
        assert_eq!(human_duration(s(5)), "5s");
        assert_eq!(human_duration(s(119)), "119s");
        assert_eq!(human_duration(s(200)), "3m20s");
        assert_eq!(human_duration(s(180)), "3m");
        assert_eq!(human_duration(s(45 * 60)), "45m");
        assert_eq!(human_duration(s(2 * 3600 + 600)), "130m");
        assert_eq!(human_duration(s(4 * 3600 + 600)), "4h10m");
        assert_eq!(human_duration(s(20 * 3600)), "20h");
        assert_eq!(human_duration(s(4 * 86400)), "4d");
        assert_eq!(human_duration(s(3 * 86400 + 4 * 3600)), "3d4h");
        assert_eq!(human_duration(s(40 * 86400)), "40d");
        assert_eq!(human_duration(s(3 * 365 * 86400)), "3y");
        assert_eq!(age(0, 1), "<unknown>");
        assert_eq!(age(now_unix_seconds() - 5, 1), "5s");
    }
}
