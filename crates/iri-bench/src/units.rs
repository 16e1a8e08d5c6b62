// SPDX-License-Identifier: Apache-2.0
//! Byte sizes on the command line and in output: `1GiB`, `1TiB`, `512MiB`, `4KiB` (binary
//! units; `K`, `M`, `G`, `T` and `Ki`... are accepted as the same binary units) or plain bytes.

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;
/// One TiB.
pub const TIB: u64 = 1 << 40;

/// Parses a size such as `1TiB`, `16MiB`, `4k` or `1048576`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 1GiB, 512MiB, 1TiB, 4096)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1,
        "k" => KIB,
        "m" => MIB,
        "g" => GIB,
        "t" => TIB,
        _ => return Err(format!("{text:?}: unknown unit (use KiB, MiB, GiB or TiB)")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A size in the largest binary unit that divides it (`1 TiB`, `14 GiB`, `1536 MiB`), else in
/// bytes.
pub fn fmt_size(bytes: u64) -> String {
    for (unit, name) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} B")
}

/// A size rounded to one decimal in the largest fitting binary unit (`45.3 GiB`).
pub fn fmt_size_approx(bytes: u64) -> String {
    for (unit, name) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit {
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("1TiB"), Ok(TIB));
        assert_eq!(parse_size("16MiB"), Ok(16 * MIB));
        assert_eq!(parse_size("4k"), Ok(4 * KIB));
        assert_eq!(parse_size("2 G"), Ok(2 * GIB));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1PiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(fmt_size(TIB), "1 TiB");
        assert_eq!(fmt_size(14 * GIB), "14 GiB");
        assert_eq!(fmt_size(1536 * MIB), "1536 MiB");
        assert_eq!(fmt_size(1000), "1000 B");
        assert_eq!(fmt_size_approx(GIB + GIB / 2), "1.5 GiB");
    }
}
