//! Request ids in Coze's `X-Tt-Logid` style: `YYYYMMDDhhmmss` (UTC) + 18 uppercase hex digits.

/// Formats a log id for `unix_ms` with 72 random bits. Written digit by digit into one
/// 32-byte string (it is made for every request; `format!` with widths costs several times
/// more).
pub fn new_logid(unix_ms: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let secs = unix_ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut out = [b'0'; 32];
    // Decimal fields: (value, width); years beyond 9999 keep their last four digits.
    let fields = [
        (y.rem_euclid(10_000) as u64, 4),
        (u64::from(m), 2),
        (u64::from(d), 2),
        (rem / 3600, 2),
        ((rem / 60) % 60, 2),
        (rem % 60, 2),
    ];
    let mut at = 0;
    for (value, width) in fields {
        let mut v = value;
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        at += width;
    }
    let mut r: u128 = rand::random::<u128>();
    for slot in out[14..].iter_mut().rev() {
        *slot = HEX[(r & 0xF) as usize];
        r >>= 4;
    }
    // ASCII digits only, so this never falls back.
    std::str::from_utf8(&out)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same text the straightforward `format!` writes.
    #[test]
    fn matches_the_format_spelling() {
        for ms in [0, 1_795_239_134_000, 951_782_400_000, 4_102_444_799_999] {
            let id = new_logid(ms);
            let secs = ms / 1000;
            let (y, m, d) = civil_from_days((secs / 86_400) as i64);
            let rem = secs % 86_400;
            let prefix = format!(
                "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
                rem / 3600,
                (rem / 60) % 60,
                rem % 60
            );
            assert_eq!(&id[..14], prefix, "{ms}");
        }
    }

    #[test]
    fn formats_utc_timestamp_prefix() {
        // 2026-11-21T05:32:14Z
        let id = new_logid(1_795_239_134_000);
        assert_eq!(&id[..14], "20261121053214");
        assert_eq!(id.len(), 32);
        assert!(
            id[14..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
    }
}
