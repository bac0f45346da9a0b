//! Time: the wall clock, the one backoff every retry loop uses, and UTC
//! calendar dates (days, months) without a date crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A duration in whole milliseconds, saturating far beyond any real setting.
pub fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Exponential backoff with jitter, the one every retry loop uses (upstream
/// forwards, ClickHouse inserts and migrations, spool reads): the first
/// delay is about `base`, each next one doubles, none exceeds `max`. The
/// delays come from `backon`'s exponential backoff (jitter adds up to one
/// delay again, so a crowd of retriers spreads out); this type only clamps
/// them to `max` and starts over on [`reset`](Self::reset).
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        let max = max.max(base);
        Backoff {
            base,
            max,
            delays: Self::delays(base, max),
        }
    }

    fn delays(base: Duration, max: Duration) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::default()
            .with_min_delay(base)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts over from `base` (after a success).
    pub fn reset(&mut self) {
        self.delays = Self::delays(self.base, self.max);
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`). `month` is 1..=12, `day` 1..=31 (not checked here).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (m, d) = (i64::from(month), i64::from(day));
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month 1..=12, day 1..=31) of a day number (Howard Hinnant's
/// `civil_from_days`), the inverse of [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The UTC month (`year * 12 + month - 1`) of a millisecond timestamp.
pub fn month_of(ts_ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ts_ms.div_euclid(DAY_MS));
    y * 12 + i64::from(m) - 1
}

/// A UTC calendar day, written `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i64);

impl Day {
    /// Days since 1970-01-01.
    pub fn number(self) -> i64 {
        self.0
    }

    /// Its first millisecond since the epoch.
    pub fn start_ms(self) -> i64 {
        self.0 * DAY_MS
    }
}

/// Why a day did not parse. The message does not repeat the text: the
/// error of the flag it was given to shows it (`invalid value 'x' for
/// '--from <DAY>': ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a date: expected YYYY-MM-DD between 1970-01-01 and 2105-12-31")]
pub struct DayError(pub String);

impl std::str::FromStr for Day {
    type Err = DayError;

    fn from_str(s: &str) -> Result<Day, DayError> {
        let bad = || DayError(s.to_string());
        let mut it = s.trim().splitn(3, '-');
        let mut num = |digits: usize| {
            it.next()
                .filter(|p| p.len() == digits && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<i64>().ok())
                .ok_or_else(bad)
        };
        let (y, m, d) = (num(4)?, num(2)?, num(2)?);
        if !(1970..=2105).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return Err(bad());
        }
        let day = days_from_civil(y, m as u32, d as u32);
        // 2024-02-30 would be March 1st: refuse dates that do not exist.
        if civil_from_days(day) != (y, m as u32, d as u32) {
            return Err(bad());
        }
        Ok(Day(day))
    }
}

impl std::fmt::Display for Day {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (y, m, d) = civil_from_days(self.0);
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

/// A duration as people write it and `humantime` reads it back: the largest
/// units first, zero parts left out (`365d`, `1h 30m`, `1500ms` as `1s 500ms`,
/// `0s`). `humantime::format_duration` counts in months and years of 30.44 and
/// 365.25 days, so it prints `365d` as `11months 30days 3h 50m 24s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(&str, u128); 7] = [
            ("d", 86_400_000_000_000),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
            ("ns", 1),
        ];
        let mut left = self.0.as_nanos();
        if left == 0 {
            return f.write_str("0s");
        }
        let mut first = true;
        for (unit, size) in UNITS {
            let n = left / size;
            if n > 0 {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{n}{unit}")?;
                first = false;
                left %= size;
            }
        }
        Ok(())
    }
}

/// A wait for a log line: whole milliseconds (a jittered backoff's
/// nanoseconds say nothing).
pub fn human_wait(d: Duration) -> HumanDuration {
    HumanDuration(Duration::from_millis(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_people_write_them_and_parse_back() {
        for (d, text) in [
            (Duration::from_secs(365 * 86_400), "365d"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_secs(5_400), "1h 30m"),
            (Duration::from_millis(1_500), "1s 500ms"),
            (Duration::from_millis(4), "4ms"),
            (Duration::from_secs(25), "25s"),
            (Duration::ZERO, "0s"),
            (Duration::new(90_061, 2_003), "1d 1h 1m 1s 2us 3ns"),
        ] {
            assert_eq!(HumanDuration(d).to_string(), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), d, "{text}");
        }
        for nanos in (0..u64::MAX / 3).step_by(usize::MAX / 5_003) {
            let d = Duration::from_nanos(nanos);
            let text = HumanDuration(d).to_string();
            assert_eq!(humantime::parse_duration(&text).unwrap(), d, "{text}");
        }
        assert_eq!(
            human_wait(Duration::new(1, 234_567_891)).to_string(),
            "1s 234ms"
        );
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 3, 1), 19_783);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(0), 1970 * 12);
        // 2024-02-29T23:59:59.999Z and 2024-03-01T00:00:00Z.
        assert_eq!(month_of(1_709_251_199_999), 2024 * 12 + 1);
        assert_eq!(month_of(1_709_251_200_000), 2024 * 12 + 2);
        assert_eq!(month_of(-1), 1969 * 12 + 11);
    }

    #[test]
    fn days_parse_and_print() {
        let day: Day = "2024-03-01".parse().unwrap();
        assert_eq!(day.number(), 19_783);
        assert_eq!(day.to_string(), "2024-03-01");
        assert_eq!("1970-01-01".parse::<Day>().unwrap(), Day(0));
        for bad in [
            "2024-13-01",
            "2024-02-30",
            "yesterday",
            "24-03-01",
            "2024-3-1",
            "",
        ] {
            assert!(bad.parse::<Day>().is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_within_bounds_and_resets() {
        let (base, max) = (Duration::from_millis(100), Duration::from_millis(700));
        let mut b = Backoff::new(base, max);
        let first = b.next_delay();
        assert!(first >= base && first <= 2 * base, "{first:?}");
        let later: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= max), "{later:?}");
        assert!(later[5..].iter().all(|d| *d >= Duration::from_millis(400)));
        b.reset();
        assert!(b.next_delay() <= 2 * base);
    }
}
