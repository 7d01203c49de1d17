//! Timestamps in the few text forms the daemons write, in UTC, without a calendar library:
//! RFC 3339 for humans, manifests and JSON, LDAP generalized time for `reqStart`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch; 0 for a clock before 1970.
pub fn unix_seconds(time: SystemTime) -> u64 {
    since_epoch(time).as_secs()
}

/// `YYYY-mm-ddTHH:MM:SSZ`.
pub fn rfc3339(time: SystemTime) -> String {
    let mut text = String::with_capacity(20);
    push_civil(&mut text, time);
    text.push('Z');
    text
}

/// `YYYY-mm-ddTHH:MM:SS.uuuuuuZ`, for change records that need sub-second order.
///
/// Written digit by digit: the jsonl and nats modules stamp every change with it, and the
/// formatting machinery's three strings per call cost `-i` more than the clock itself.
pub fn rfc3339_micros(time: SystemTime) -> String {
    let mut text = String::with_capacity(27);
    push_civil(&mut text, time);
    text.push('.');
    push_digits(&mut text, u64::from(since_epoch(time).subsec_micros()), 6);
    text.push('Z');
    text
}

/// `YYYYmmddHHMMSSZ`, the `reqStart` format UCS writes into `cn=translog`.
pub fn generalized_time(time: SystemTime) -> String {
    rfc3339(time).replace(['-', ':', 'T'], "")
}

/// A clock before the epoch or after year 9999 is clamped, so a wildly wrong clock gives a
/// wrong but well-formed timestamp instead of an error.
fn since_epoch(time: SystemTime) -> Duration {
    const LAST: Duration = Duration::new(253_402_300_799, 999_999_999);
    time.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(LAST)
}

/// Appends `YYYY-mm-ddTHH:MM:SS`.
fn push_civil(text: &mut String, time: SystemTime) {
    let secs = since_epoch(time).as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    push_digits(text, year, 4);
    text.push('-');
    push_digits(text, month, 2);
    text.push('-');
    push_digits(text, day, 2);
    text.push('T');
    push_digits(text, rem / 3600, 2);
    text.push(':');
    push_digits(text, rem % 3600 / 60, 2);
    text.push(':');
    push_digits(text, rem % 60, 2);
}

/// Appends the last `width` decimal digits of `value`, zero-padded (callers pass values
/// that fit: the clock is clamped to year 9999).
fn push_digits(text: &mut String, value: u64, width: u32) {
    for place in (0..width).rev() {
        let digit = value / 10u64.pow(place) % 10;
        text.push(char::from(b'0' + digit as u8));
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_in_utc() {
        assert_eq!(generalized_time(UNIX_EPOCH), "19700101000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_706_702_400);
        assert_eq!(generalized_time(t), "20240131120000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_599);
        assert_eq!(generalized_time(leap), "20000229115959Z");
        assert_eq!(rfc3339(leap), "2000-02-29T11:59:59Z");
        let micros = leap + Duration::from_micros(1_234);
        assert_eq!(rfc3339_micros(micros), "2000-02-29T11:59:59.001234Z");
        assert_eq!(unix_seconds(leap), 951_825_599);
    }

    #[test]
    fn digits_match_the_formatting_machinery() {
        let mut secs: u64 = 0;
        while secs < 253_402_300_800 {
            let time = UNIX_EPOCH + Duration::new(secs, (secs % 1_000_000) as u32 * 997);
            let (year, month, day) = civil_from_days(secs / 86_400);
            let rem = secs % 86_400;
            let expected = format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60,
                since_epoch(time).subsec_micros()
            );
            assert_eq!(rfc3339_micros(time), expected);
            assert_eq!(rfc3339(time), format!("{}Z", &expected[..19]));
            secs += 12_347 + secs / 16;
        }
    }

    #[test]
    fn wrong_clocks_are_clamped() {
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339_micros(far), "9999-12-31T23:59:59.999999Z");
    }
}
