//! The money rule: what a resource's rate samples cost per bucket, and the
//! correction rows that bring a bucket's expense rows to a new value.

use crate::config::{Grain, RollupConfig};

/// What the money rule needs.
#[derive(Debug, Clone, Copy)]
pub struct MoneyRule {
    pub bucket_ms: i64,
    pub max_gap_ms: i64,
    pub step_ms: i64,
}

impl MoneyRule {
    pub fn from_config(cfg: &RollupConfig) -> MoneyRule {
        MoneyRule {
            bucket_ms: match cfg.grain {
                Grain::Day => 86_400_000,
                Grain::Hour => 3_600_000,
            },
            max_gap_ms: cfg.max_gap.as_millis() as i64,
            step_ms: cfg.step.as_millis() as i64,
        }
    }

    /// The cost of bucket `b` (its start is `b * bucket_ms`), from the
    /// resource's samples sorted by time with unique timestamps, covering at
    /// least `[start - max_gap, end)`. `has_earlier`: a sample exists before
    /// the first one given. `None` if no sample falls in the bucket.
    pub fn bucket_cost(&self, samples: &[(i64, f64)], b: i64, has_earlier: bool) -> Option<f64> {
        let start = b * self.bucket_ms;
        let end = start + self.bucket_ms;
        let mut prev: Option<i64> = None;
        let mut cost = 0.0;
        let mut any = false;
        for &(t, r) in samples {
            if t >= end {
                break;
            }
            if t >= start {
                let dt = match prev {
                    Some(p) => (t - p).min(self.max_gap_ms),
                    None if has_earlier => self.max_gap_ms,
                    None => self.step_ms,
                };
                cost += r * dt as f64 / 3_600_000.0;
                any = true;
            }
            prev = Some(t);
        }
        any.then_some(cost)
    }
}

/// Rows turning a bucket's current state (`SUM(cost*sign)`, `SUM(sign)`)
/// into exactly one live row worth `new`. Empty if it already is.
pub fn correction(existing: Option<(f64, i64)>, new: f64) -> Vec<(f64, i8)> {
    let (sum, signs) = existing.unwrap_or((0.0, 0));
    if signs == 1 && same(sum, new) {
        return Vec::new();
    }
    let mut rows = Vec::new();
    let cancel = signs != 0 || sum != 0.0;
    if cancel {
        rows.push((sum, -1));
    }
    // Pad with zero-cost rows so that the signs add up to exactly 1 (only
    // after something wrote this bucket twice; normally 0).
    let pad = i64::from(cancel) - signs;
    let pad = pad.clamp(-1000, 1000);
    for _ in 0..pad.abs() {
        rows.push((0.0, if pad > 0 { 1 } else { -1 }));
    }
    rows.push((new, 1));
    rows
}

/// Rows cancelling a bucket's current state entirely (`SUM(sign)` and
/// `SUM(cost*sign)` both 0 afterwards). Empty if nothing is live: no signs
/// and a sum within float noise of 0 (pairs summed in another order).
pub fn cancellation(existing: Option<(f64, i64)>) -> Vec<(f64, i8)> {
    let (sum, signs) = existing.unwrap_or((0.0, 0));
    if signs == 0 && sum.abs() <= 1e-9 {
        return Vec::new();
    }
    let mut rows = vec![(sum, -1)];
    // After (sum, -1) the signs add up to signs - 1: pad back to 0.
    let pad = (1 - signs).clamp(-1000, 1000);
    for _ in 0..pad.abs() {
        rows.push((0.0, if pad > 0 { 1 } else { -1 }));
    }
    rows
}

/// Equal up to float noise of summing the same rows in another order.
fn same(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: MoneyRule = MoneyRule {
        bucket_ms: 3_600_000,
        max_gap_ms: 300_000,
        step_ms: 60_000,
    };

    #[test]
    fn first_sample_uses_step_then_time_since_previous() {
        // 2 USD/h at 0, 60 s, 180 s: 60 s (step) + 60 s + 120 s.
        let s = [(0, 2.0), (60_000, 2.0), (180_000, 2.0)];
        let c = RULE.bucket_cost(&s, 0, false).unwrap();
        assert!((c - 2.0 * 240.0 / 3600.0).abs() < 1e-15);
        // Something earlier exists (beyond the lead-in): first dt = max_gap.
        let c = RULE.bucket_cost(&s, 0, true).unwrap();
        assert!((c - 2.0 * 480.0 / 3600.0).abs() < 1e-15);
    }

    #[test]
    fn gaps_are_capped_and_lead_in_sets_dt_only() {
        // Previous bucket's last sample 30 s before this bucket.
        let s = [
            (3_570_000, 100.0),
            (3_600_000, 1.0),
            (3_600_000 + 7_200_000 - 1, 1.0),
        ];
        let c = RULE.bucket_cost(&s, 1, true).unwrap();
        assert!((c - 30.0 / 3600.0).abs() < 1e-15, "{c}");
        // Bucket 2's only sample comes 2 h after the previous one: max_gap.
        let c = RULE.bucket_cost(&s, 2, true).unwrap();
        assert!((c - 300.0 / 3600.0).abs() < 1e-15, "capped at max_gap: {c}");
        assert_eq!(RULE.bucket_cost(&s, 3, true), None, "nothing in bucket 3");
    }

    #[test]
    fn corrections_leave_exactly_one_live_row() {
        assert_eq!(correction(None, 5.0), vec![(5.0, 1)]);
        assert_eq!(correction(Some((5.0, 1)), 5.0), vec![]);
        assert_eq!(correction(Some((5.0, 1)), 7.0), vec![(5.0, -1), (7.0, 1)]);
        for (sum, signs) in [(10.0, 2), (0.0, 0), (3.0, 0), (-1.0, -1), (4.0, 3)] {
            let rows = correction(Some((sum, signs)), 7.0);
            let s: i64 = signs + rows.iter().map(|r| i64::from(r.1)).sum::<i64>();
            let c: f64 = sum + rows.iter().map(|r| r.0 * f64::from(r.1)).sum::<f64>();
            assert_eq!(s, 1, "{sum} {signs}");
            assert!((c - 7.0).abs() < 1e-12, "{sum} {signs}");
        }
    }

    #[test]
    fn cancellations_leave_nothing_live() {
        assert_eq!(cancellation(None), vec![]);
        assert_eq!(cancellation(Some((1e-15, 0))), vec![]);
        assert_eq!(cancellation(Some((5.0, 1))), vec![(5.0, -1)]);
        for (sum, signs) in [(5.0, 1), (10.0, 2), (3.0, 0), (-1.0, -1), (4.0, 3)] {
            let rows = cancellation(Some((sum, signs)));
            let s: i64 = signs + rows.iter().map(|r| i64::from(r.1)).sum::<i64>();
            let c: f64 = sum + rows.iter().map(|r| r.0 * f64::from(r.1)).sum::<f64>();
            assert_eq!(s, 0, "{sum} {signs}");
            assert!(c.abs() < 1e-12, "{sum} {signs}");
        }
    }
}
