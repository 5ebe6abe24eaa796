//! Reading back the timestamps Triage writes, without chrono's general
//! parser.
//!
//! chrono writes a `DateTime<Utc>` as RFC 3339 with a `Z` and 0, 3, 6 or 9
//! fraction digits, and reads one back with a parser for any RFC 3339 text
//! (any offset, relaxed separators), which was about a tenth of the work of
//! decoding a stored event. [`deserialize`] reads
//! `YYYY-MM-DDTHH:MM:SS[.fraction]Z` itself and hands anything else to
//! chrono, so what is accepted, how it is read, and the error for what is
//! not, are chrono's.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, Utc};
use serde::Deserializer;
use serde::de::{Error, Visitor};

/// Reads a timestamp as chrono's `Deserialize` for `DateTime<Utc>` does.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    deserializer.deserialize_str(TimestampVisitor)
}

struct TimestampVisitor;

impl Visitor<'_> for TimestampVisitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // chrono's wording.
        formatter.write_str("an RFC 3339 formatted date and time string")
    }

    fn visit_str<E: Error>(self, text: &str) -> Result<DateTime<Utc>, E> {
        parse(text).map_err(E::custom)
    }
}

/// `text` as chrono reads it, `Z` forms directly.
pub(crate) fn parse(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match parse_utc(text.as_bytes()) {
        Some(timestamp) => Ok(timestamp),
        None => text
            .parse::<DateTime<FixedOffset>>()
            .map(|timestamp| timestamp.with_timezone(&Utc)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f]Z` with 1 to 9 fraction digits; `None` for any
/// other text, and for values chrono would have to judge (leap seconds,
/// impossible dates).
fn parse_utc(text: &[u8]) -> Option<DateTime<Utc>> {
    let text = text.strip_suffix(b"Z")?;
    if text.len() < 19 || text[4] != b'-' || text[7] != b'-' || text[10] != b'T' || text[13] != b':' || text[16] != b':'
    {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        text[range].iter().try_fold(0u32, |value, &byte| {
            byte.is_ascii_digit().then(|| value * 10 + u32::from(byte - b'0'))
        })
    };
    let nanos = match &text[19..] {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            let value = number(20..text.len())?;
            value * 10u32.pow(9 - digits.len() as u32)
        }
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(number(0..4)? as i32, number(5..7)?, number(8..10)?)?;
    let time = NaiveTime::from_hms_nano_opt(number(11..13)?, number(14..16)?, number(17..19)?, nanos)?;
    Some(date.and_time(time).and_utc())
}

#[cfg(test)]
mod tests {
    use chrono::{SecondsFormat, TimeZone};
    use proptest::prelude::*;

    use super::*;

    fn chrono_reads(text: &str) -> Result<DateTime<Utc>, String> {
        serde_json::from_value::<DateTime<Utc>>(serde_json::Value::String(text.to_owned())).map_err(|e| e.to_string())
    }

    fn ours(text: &str) -> Result<DateTime<Utc>, String> {
        deserialize(serde_json::Value::String(text.to_owned())).map_err(|e| e.to_string())
    }

    #[test]
    fn what_chrono_writes_is_read_directly() {
        let at = Utc.with_ymd_and_hms(2026, 4, 1, 9, 30, 5).unwrap() + chrono::Duration::nanoseconds(123_456_789);
        for format in [
            SecondsFormat::Secs,
            SecondsFormat::Millis,
            SecondsFormat::Micros,
            SecondsFormat::Nanos,
        ] {
            let text = at.to_rfc3339_opts(format, true);
            let read = parse_utc(text.as_bytes()).expect("the Z form is read directly");
            assert_eq!(Ok(read), chrono_reads(&text), "{text}");
        }
        // chrono's own serialization (AutoSi).
        let text = serde_json::to_value(at).unwrap();
        assert_eq!(ours(text.as_str().unwrap()), Ok(at));
    }

    #[test]
    fn other_forms_and_bad_text_are_chrono_s_to_judge() {
        for text in [
            "2026-04-01T09:30:05+02:00",
            "2026-04-01 09:30:05Z",
            "2026-04-01t09:30:05z",
            "2016-12-31T23:59:60Z",
            "2026-02-30T09:30:05Z",
            "2026-04-01T09:30:05.1234567891Z",
            "2026-04-01T09:30:05.Z",
            "2026-04-01T24:00:00Z",
            "2026-04-01T09:30Z",
            "+2026-04-01T09:30:05Z",
            "2026-04-01T09:30:05",
            "",
            "Z",
            "not a time",
        ] {
            assert_eq!(ours(text), chrono_reads(text), "{text:?}");
        }
    }

    proptest! {
        #[test]
        fn any_timestamp_chrono_writes_reads_back_the_same(
            seconds in -62_135_596_800i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
            format in prop_oneof![
                Just(SecondsFormat::Secs),
                Just(SecondsFormat::Millis),
                Just(SecondsFormat::Micros),
                Just(SecondsFormat::Nanos),
                Just(SecondsFormat::AutoSi),
            ],
            use_z in any::<bool>(),
        ) {
            let at = Utc.timestamp_opt(seconds, nanos).unwrap();
            let text = at.to_rfc3339_opts(format, use_z);
            prop_assert_eq!(ours(&text), chrono_reads(&text));
        }

        #[test]
        fn near_misses_read_as_chrono_reads_them(
            text in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,11})?[Zz]?",
        ) {
            prop_assert_eq!(ours(&text), chrono_reads(&text));
        }
    }
}
