//! The value syntax every flag of both binaries shares: durations (`250ms`, `1.5s`, `30s`,
//! `1h`) and sizes (`64KiB`, `16MiB`, or a plain number of bytes).
//!
//! Pure parsing for clap's `value_parser`: a bad value gets an error that says what is
//! expected, and nothing here reads the environment or a file.

use std::time::Duration;

/// Parses a duration with its unit: `250ms`, `1.5s`, `30s`, `2m`, `1h`, `1h 30m`
/// (humantime's syntax; `us`, `ms`, `s`, `m`, `h`, `d` and their long forms).
///
/// # Errors
/// A message naming the value and the expected syntax, for a bare number (`30`: seconds or
/// milliseconds?), an unknown unit or a malformed number.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!(
            "{text:?} has no unit: write it as {trimmed}s, {trimmed}ms, ... (units: ms, s, m, h)"
        ));
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| format!("{text:?} is not a duration ({e}); examples: 250ms, 1.5s, 30s, 1h"))
}

/// Parses a size in bytes: a plain number (`65536`) or a number with a unit, binary (`64KiB`,
/// `16MiB`, `1GiB`, also `Ki`, `Mi`) or decimal (`4MB` is 4,000,000). Case-insensitive; a
/// space before the unit is allowed; fractions are allowed with a unit (`1.5MiB`).
///
/// # Errors
/// A message naming the value and the expected syntax, or saying it is too large.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let bytes: bytesize::ByteSize = trimmed
        .parse()
        .map_err(|_| format!("{text:?} is not a size; examples: 65536, 64KiB, 16MiB, 1GiB"))?;
    // bytesize saturates instead of failing on overflow.
    if bytes.as_u64() == u64::MAX {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.as_u64())
}

/// [`parse_bytes`] for a `usize` field.
///
/// # Errors
/// As [`parse_bytes`], or when the size does not fit this machine's `usize`.
pub fn parse_bytes_usize(text: &str) -> Result<usize, String> {
    let bytes = parse_bytes(text)?;
    usize::try_from(bytes).map_err(|_| format!("{text:?} is too large for this machine"))
}

/// Formats a byte count the way `--help` shows defaults: `16MiB` when it is a whole number of
/// KiB, MiB or GiB, else the plain number.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (factor, unit) in UNITS {
        if bytes >= factor && bytes % factor == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_one_syntax() {
        let check = |text: &str, expected: Duration| {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        };
        check("250ms", Duration::from_millis(250));
        check("1.5s", Duration::from_millis(1500));
        check("30s", Duration::from_secs(30));
        check("2m", Duration::from_secs(120));
        check("1h", Duration::from_secs(3600));
        check("500us", Duration::from_micros(500));
        check("0s", Duration::ZERO);
        for bad in ["30", "1.5", "", "ms", "10 parsecs", "-1s", "1x"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        assert!(parse_duration("30").expect_err("bare").contains("30s"));
    }

    #[test]
    fn sizes_take_units() {
        let check = |text: &str, expected: u64| {
            assert_eq!(parse_bytes(text), Ok(expected), "{text}");
        };
        check("65536", 65536);
        check("64KiB", 64 << 10);
        check("16MiB", 16 << 20);
        check("16 MiB", 16 << 20);
        check("16mib", 16 << 20);
        check("1Mi", 1 << 20);
        check("1.5MiB", 3 << 19);
        check("4MB", 4_000_000);
        for bad in ["", "MiB", "-1", "12 parsecs", "1e3", "99999999999EiB"] {
            let err = parse_bytes(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn sizes_format_humanly() {
        assert_eq!(format_bytes(16 << 20), "16MiB");
        assert_eq!(format_bytes(64 << 10), "64KiB");
        assert_eq!(format_bytes(2 << 30), "2GiB");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(0), "0");
        for bytes in [1 << 10, 3 << 20, 5 << 30, 12345] {
            assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        }
    }
}
